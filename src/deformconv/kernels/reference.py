"""Pure-PyTorch deformable convolution: the reference and the fallback on every device.

Differentiable by autograd (so double backward works) and written with
``gather`` + ``matmul`` only, so it runs wherever torch runs and torch.compile
can trace it. It is not fast and it materialises the full column buffer:
the fast kernels exist for speed, this one for truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["deform_conv2d", "sampling_positions", "bilinear_corners"]


def sampling_positions(
    offset: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Absolute input coordinates sampled by every kernel point of every output pixel.

    Args:
        offset: (N, 2·G·K_h·K_w, H_out, W_out) in the torchvision layout.
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).

    Returns:
        ``(y, x)``, each (N, G, K_h·K_w, H_out, W_out):
        ``p0·stride - padding + p_n·dilation + Δp_n``.
    """
    n, _, h_out, w_out = offset.shape
    k_h, k_w = kernel_size
    k = k_h * k_w
    off = offset.reshape(n, offset.shape[1] // (2 * k), k, 2, h_out, w_out)
    dev, dt = offset.device, offset.dtype
    rows = torch.arange(k_h, device=dev, dtype=dt).repeat_interleave(k_w) * dilation[0]
    cols = torch.arange(k_w, device=dev, dtype=dt).repeat(k_h) * dilation[1]
    out_rows = torch.arange(h_out, device=dev, dtype=dt) * stride[0] - padding[0]
    out_cols = torch.arange(w_out, device=dev, dtype=dt) * stride[1] - padding[1]
    base_y = rows[:, None, None] + out_rows[None, :, None]  # (K, H_out, 1)
    base_x = cols[:, None, None] + out_cols[None, None, :]  # (K, 1, W_out)
    return base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]


def bilinear_corners(y: Tensor, x: Tensor, height: int, width: int) -> list[tuple[Tensor, Tensor]]:
    """The four bilinear corners of each position under the DCNv2 boundary rule.

    A position with ``y <= -1``, ``y >= height``, ``x <= -1`` or ``x >= width``
    (or a NaN coordinate) reads 0; otherwise each corner outside the map reads 0.
    Positions exactly on -1 are kept: they read 0 anyway (the inner corner has
    weight 0), and keeping them gives the floor-based one-sided derivative used
    at every other integer position, as torchvision's backward does.
    Non-finite positions are replaced before any index is formed, so every index
    returned lies inside the map.

    Args:
        y: positions' rows, any shape.
        x: positions' columns, same shape as ``y``.
        height: H_in.
        width: W_in.

    Returns:
        Four ``(flat_index, weight)`` pairs, each shaped like ``y``; ``flat_index``
        is ``row·width + col`` (int64, in range) and ``weight`` is 0 for corners
        that read nothing.
    """
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)  # False for NaN too
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    corners = []
    for dy, dx, w in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yi, xi = y0i + dy, x0i + dx
        ok = inside & (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
        index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
        corners.append((index, w * ok.to(w.dtype)))
    return corners


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution (DCNv1, or DCNv2 with ``mask``) in pure PyTorch.

    Arguments are already validated; see :func:`deformconv.deform_conv2d` for
    their shapes. float16/bfloat16 are computed in float32 and cast back.

    Returns:
        (N, C_out, H_out, W_out) in ``input``'s dtype.
    """
    out_dtype = input.dtype
    dt = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    input, offset, weight = input.to(dt), offset.to(dt), weight.to(dt)
    n, c_in, height, width = input.shape
    c_out, c_per_group, k_h, k_w = weight.shape
    groups = c_in // c_per_group
    k = k_h * k_w
    n_off, h_out, w_out = offset.shape[1] // (2 * k), offset.shape[2], offset.shape[3]
    length = h_out * w_out

    y, x = sampling_positions(offset, (k_h, k_w), stride, padding, dilation)
    flat = input.reshape(n, n_off, c_in // n_off, height * width)
    columns = flat.new_zeros(n, n_off, c_in // n_off, k * length)
    for index, w in bilinear_corners(y, x, height, width):
        index = index.reshape(n, n_off, 1, k * length).expand(-1, -1, c_in // n_off, -1)
        columns = columns + torch.gather(flat, 3, index) * w.reshape(n, n_off, 1, k * length)
    if mask is not None:
        columns = columns * mask.to(dt).reshape(n, n_off, 1, k * length)

    # (N, C_in, K, L) -> (N, groups, C_in/groups·K, L): matches weight's (C_in/groups, K_h, K_w).
    columns = columns.reshape(n, groups, c_per_group * k, length)
    out = torch.matmul(weight.reshape(1, groups, c_out // groups, c_per_group * k), columns)
    out = out.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.to(dt).reshape(1, c_out, 1, 1)
    return out.to(out_dtype)
