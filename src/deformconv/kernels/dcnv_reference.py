"""Pure-PyTorch DCNv3/DCNv4 core: the reference and the fallback on every device.

The core (InternImage's ``DCNv3Function``, OpenGVLab's ``DCNv4Function``) works on
channels-last tensors. For output pixel (h, w), group g and kernel point p::

    out[n, h, w, g·C_g + c] = Σ_p mask[n, h, w, g·P + p] · x_{g·C_g + c}(loc_p)

where ``x_c(loc)`` is bilinear interpolation of channel c (a corner outside the map
reads 0) at::

    loc_x = w·s_w - pad_w + c_w + (i_x·d_w - c_w + Δx)·offset_scale,  c_w = d_w·(K_w - 1) // 2

(``loc_y`` alike). Kernel points are x-major (``p`` runs over ``i_y`` fastest), minus the
centre point when ``remove_center``; offset channel ``(g·P + p)·2`` is Δx and the next
one Δy.

:func:`forward` is differentiable by autograd (twice): it is what eager calls on the
reference backend run. :func:`backward` gives the same gradients from explicit formulas
(it runs inside the custom op, below autograd). Both work on chunks of output pixels
whose gathered samples fit in :data:`WORKSPACE_BYTES`; under autograd the samples of
every chunk are kept for the backward pass, as any autograd graph keeps its operands.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WORKSPACE_BYTES", "backward", "forward", "kernel_points", "sampling_locations"]

#: Cap, in bytes, on the gathered corner samples of one chunk of output pixels.
WORKSPACE_BYTES = 64 * 2**20


def kernel_points(
    kernel_size: tuple[int, int], dilation: tuple[int, int], remove_center: bool
) -> tuple[list[int], list[int]]:
    """The kernel points' (x, y) offsets from the kernel's centre, x-major.

    Args:
        kernel_size: (K_h, K_w).
        dilation: (d_h, d_w).
        remove_center: drop the centre point (odd kernel sizes only).

    Returns:
        ``(px, py)``: lists of P ints, ``px[p] = i_x·d_w - d_w·(K_w-1)//2`` (likewise y),
        ``p`` running over ``i_y`` fastest.

    Example:
        >>> kernel_points((3, 3), (1, 1), remove_center=True)[0]
        [-1, -1, -1, 0, 0, 1, 1, 1]
    """
    (k_h, k_w), (d_h, d_w) = kernel_size, dilation
    c_h, c_w = d_h * (k_h - 1) // 2, d_w * (k_w - 1) // 2
    px, py = [], []
    for i_x in range(k_w):
        for i_y in range(k_h):
            if remove_center and i_x == k_w // 2 and i_y == k_h // 2:
                continue
            px.append(i_x * d_w - c_w)
            py.append(i_y * d_h - c_h)
    return px, py


def sampling_locations(
    offset: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[Tensor, Tensor]:
    """Input coordinates (in pixels) sampled by every kernel point of every output pixel.

    Args:
        offset: (N, H_out, W_out, G·P·2); channel (g·P + p)·2 is Δx, the next one Δy.
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        group: G.
        offset_scale: scale of the kernel's footprint and of the offsets.
        remove_center: the centre point is not among the P points.

    Returns:
        ``(x, y)``, each (N, H_out, W_out, G, P) in ``offset``'s dtype.
    """
    n, h_out, w_out, _ = offset.shape
    px, py = kernel_points(kernel_size, dilation, remove_center)
    dev, dt = offset.device, offset.dtype
    off = offset.reshape(n, h_out, w_out, group, len(px), 2)
    c_h = dilation[0] * (kernel_size[0] - 1) // 2
    c_w = dilation[1] * (kernel_size[1] - 1) // 2
    base_y = torch.arange(h_out, device=dev, dtype=dt) * stride[0] + (c_h - padding[0])
    base_x = torch.arange(w_out, device=dev, dtype=dt) * stride[1] + (c_w - padding[1])
    kx = torch.tensor(px, device=dev, dtype=dt)
    ky = torch.tensor(py, device=dev, dtype=dt)
    x = base_x[None, None, :, None, None] + (kx + off[..., 0]) * offset_scale
    y = base_y[None, :, None, None, None] + (ky + off[..., 1]) * offset_scale
    return x, y


_Corners = tuple[list[Tensor], list[Tensor], list[Tensor], Tensor, tuple[Tensor, ...]]


def _corners(x: Tensor, y: Tensor, height: int, width: int) -> _Corners:
    """Bilinear corners of positions: indices, weights, validity, inside, fractions.

    A position with ``y < -1``, ``y >= H``, ``x < -1`` or ``x >= W`` (or NaN) reads 0;
    otherwise each corner outside the map reads 0. Non-finite positions are replaced
    before an index is formed, so every index lies inside the map.

    Returns:
        ``indices``: four int64 tensors ``row·W + col`` (corners 00, 01, 10, 11 as
        (dy, dx)); ``weights``: their bilinear weights, 0 for corners that read nothing;
        ``valid``: 1 where the corner reads the map, else 0; ``inside``; ``(ly, lx, hy,
        hx)``, the fractional parts and their complements.
    """
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)  # False for NaN
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    indices, weights, valid = [], [], []
    for dy, dx, w in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yi, xi = y0i + dy, x0i + dx
        ok = inside & (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
        indices.append(yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1))
        valid.append(ok.to(w.dtype))
        weights.append(w * valid[-1])
    return indices, weights, valid, inside, (ly, lx, hy, hx)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_rows(rows_total: int, bytes_per_row: int) -> list[tuple[int, int]]:
    step = max(1, WORKSPACE_BYTES // max(1, bytes_per_row))
    # No rows: one empty chunk, so that an empty output is still part of the graph.
    return [(r0, min(rows_total, r0 + step)) for r0 in range(0, rows_total, step)] or [(0, 0)]


def _flat_problem(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[Tensor, _Corners]:
    """The (N·H·W·G, C_g) view of the input and the corners of every (N·L, G, P) sample.

    The corner indices are rows of that view: ``((n·H + y)·W + x)·G + g``.
    """
    n, height, width, channels = input.shape
    c_g = channels // group
    x, y = sampling_locations(
        offset, kernel_size, stride, padding, dilation, group, offset_scale, remove_center
    )
    p = x.shape[-1]
    x, y = x.reshape(-1, group, p), y.reshape(-1, group, p)
    indices, weights, valid, inside, fractions = _corners(x, y, height, width)
    length = offset.shape[1] * offset.shape[2]
    image = torch.arange(n, device=input.device).repeat_interleave(length)[:, None, None]
    g = torch.arange(group, device=input.device)[None, :, None]
    # Row of (pixel, group) in the (N·H·W·G, C_g) view of the channels-last input.
    rows = [(image * (height * width) + i) * group + g for i in indices]
    if height * width == 0:  # an empty map (padding alone gives the output): every corner's
        # weight is 0 and its index would lie before the map; all read one zero row instead
        zero_row = input.reshape(-1, c_g).sum(0, keepdim=True)  # no rows: zeros, in the graph
        return zero_row, ([torch.zeros_like(r) for r in rows], weights, valid, inside, fractions)
    return input.reshape(-1, c_g), (rows, weights, valid, inside, fractions)


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    """DCNv3 core forward (arguments validated; see :func:`deformconv.dcnv3`).

    Args:
        input: (N, H_in, W_in, G·C_g).
        offset: (N, H_out, W_out, G·P·2).
        mask: (N, H_out, W_out, G·P).
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        group: G.
        offset_scale: scale of the kernel's footprint and of the offsets.
        remove_center: the centre point is not among the P points.

    Returns:
        (N, H_out, W_out, G·C_g) in ``input``'s dtype (float16/bfloat16 computed in float32).
    """
    out_dtype = input.dtype
    dt = _compute_dtype(input.dtype)
    input, offset, mask = input.to(dt), offset.to(dt), mask.to(dt)
    n, _, _, channels = input.shape
    _, h_out, w_out, _ = offset.shape
    c_g = channels // group
    x2, (rows, weights, _, _, _) = _flat_problem(
        input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
        remove_center,
    )  # fmt: skip
    p = rows[0].shape[-1]
    total = rows[0].shape[0]
    m = mask.reshape(total, group, p)
    # (R, G, 4·P) rows and weights: one gather and one batched matmul per chunk.
    index = torch.cat(rows, dim=-1)
    weight = torch.cat([w * m for w in weights], dim=-1)
    outs = []
    for r0, r1 in _chunk_rows(total, group * 4 * p * c_g * input.element_size()):
        samples = x2[index[r0:r1]]  # (R, G, 4·P, C_g)
        outs.append((weight[r0:r1, :, None, :] @ samples).squeeze(-2))
    out = torch.cat(outs)
    return out.reshape(n, h_out, w_out, channels).to(out_dtype)


def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`forward` for ``(input, offset, mask)``, from explicit formulas.

    Args:
        grad_output: (N, H_out, W_out, G·C_g).
        input: (N, H_in, W_in, G·C_g).
        offset: (N, H_out, W_out, G·P·2).
        mask: (N, H_out, W_out, G·P).
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        group: G.
        offset_scale: scale of the kernel's footprint and of the offsets.
        remove_center: the centre point is not among the P points.

    Returns:
        ``(grad_input, grad_offset, grad_mask)`` shaped and typed like their arguments.
    """
    dt = _compute_dtype(input.dtype)
    x_in, off, m_in = input.to(dt), offset.to(dt), mask.to(dt)
    if input.shape[1] * input.shape[2] == 0:  # an empty map: no sample reads a pixel
        return torch.zeros_like(input), torch.zeros_like(offset), torch.zeros_like(mask)
    channels = input.shape[-1]
    c_g = channels // group
    x2, (rows, weights, valid, inside, (ly, lx, hy, hx)) = _flat_problem(
        x_in, off, m_in, kernel_size, stride, padding, dilation, group, offset_scale,
        remove_center,
    )  # fmt: skip
    total, _, p = rows[0].shape
    m = m_in.reshape(total, group, p)
    go = grad_output.to(dt).reshape(total, group, 1, c_g)
    grad_x = torch.zeros_like(x2)
    dots = [torch.empty_like(m) for _ in range(4)]
    for r0, r1 in _chunk_rows(total, group * p * c_g * x2.element_size()):
        g_chunk = go[r0:r1]
        for q in range(4):
            idx, w = rows[q][r0:r1], weights[q][r0:r1]
            # d_q = Σ_c grad_out[c] · x[corner q, c]; 0 for corners that read nothing.
            dots[q][r0:r1] = (x2[idx] * g_chunk).sum(-1) * valid[q][r0:r1]
            contrib = (w * m[r0:r1])[..., None] * g_chunk  # (R, G, P, C_g)
            grad_x.index_add_(0, idx.reshape(-1), contrib.reshape(-1, c_g))
    d00, d01, d10, d11 = dots
    grad_m = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
    grad_lx = hy * (d01 - d00) + ly * (d11 - d10)
    grad_ly = hx * (d10 - d00) + lx * (d11 - d01)
    zero = torch.zeros_like(grad_lx)
    scale = m * offset_scale
    grad_off = torch.stack(
        [torch.where(inside, grad_lx * scale, zero), torch.where(inside, grad_ly * scale, zero)],
        dim=-1,
    )
    return (
        grad_x.reshape(input.shape).to(input.dtype),
        grad_off.reshape(offset.shape).to(offset.dtype),
        grad_m.reshape(mask.shape).to(mask.dtype),
    )
