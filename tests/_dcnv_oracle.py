"""A deliberately naive float64 loop implementation of the DCNv3/DCNv4 core.

Written from the equation of InternImage's ``dcnv3_core_pytorch`` / OpenGVLab's CUDA
kernels, sharing no code with the package; used only as a test oracle.

For output pixel (h, w), group g and kernel point p (x-major: i_x outer, i_y inner,
the centre skipped when ``remove_center``)::

    loc_x = w·s_w - pad_w + c_w + (i_x·d_w - c_w + Δx)·offset_scale,  c_w = d_w·(K_w-1)//2
    out[n, h, w, g·C_g + c] = Σ_p mask[n, h, w, g·P + p] · bilinear(x[n, :, :, g·C_g + c], loc)

with offset channel (g·P + p)·2 holding Δx and the next Δy; a bilinear corner outside
the map reads 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _bilinear(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """img (H, W, C) at (y, x); each corner outside the map reads 0."""
    h, w, c = img.shape
    if not (math.isfinite(y) and math.isfinite(x)) or y <= -1 or y >= h or x <= -1 or x >= w:
        return np.zeros(c)
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = np.zeros(c)
    for yy, xx, wt in (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x0 + 1, (1 - ly) * lx),
        (y0 + 1, x0, ly * (1 - lx)),
        (y0 + 1, x0 + 1, ly * lx),
    ):
        if 0 <= yy < h and 0 <= xx < w:
            total += wt * img[yy, xx]
    return total


def naive_dcnv3(
    input,
    offset,
    mask,
    kernel_size=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    group=1,
    offset_scale=1.0,
    remove_center=False,
) -> torch.Tensor:
    """The DCNv3 core in float64 loops: input (N, H, W, C) -> (N, H_out, W_out, C)."""
    x = input.detach().double().numpy()
    off = offset.detach().double().numpy()
    m = mask.detach().double().numpy()
    n_batch, _, _, channels = x.shape
    _, h_out, w_out, _ = off.shape
    (k_h, k_w), (s_h, s_w), (p_h, p_w), (d_h, d_w) = kernel_size, stride, padding, dilation
    c_g = channels // group
    c_h, c_w = d_h * (k_h - 1) // 2, d_w * (k_w - 1) // 2
    points = [
        (i_x, i_y)
        for i_x in range(k_w)
        for i_y in range(k_h)
        if not (remove_center and i_x == k_w // 2 and i_y == k_h // 2)
    ]
    n_p = len(points)
    out = np.zeros((n_batch, h_out, w_out, channels))
    for n in range(n_batch):
        for h in range(h_out):
            for w in range(w_out):
                for g in range(group):
                    chans = slice(g * c_g, (g + 1) * c_g)
                    for p, (i_x, i_y) in enumerate(points):
                        dx = off[n, h, w, (g * n_p + p) * 2]
                        dy = off[n, h, w, (g * n_p + p) * 2 + 1]
                        loc_x = w * s_w - p_w + c_w + (i_x * d_w - c_w + dx) * offset_scale
                        loc_y = h * s_h - p_h + c_h + (i_y * d_h - c_h + dy) * offset_scale
                        val = _bilinear(x[n, :, :, chans], loc_y, loc_x)
                        out[n, h, w, chans] += m[n, h, w, g * n_p + p] * val
    return torch.from_numpy(out)


def naive_dcnv4(
    input,
    offset_mask,
    kernel_size=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    group=1,
    offset_scale=1.0,
    remove_center=False,
) -> torch.Tensor:
    """DCNv4: per group 2P offsets then P mask values; trailing channels ignored."""
    k_h, k_w = kernel_size
    n_p = k_h * k_w - int(remove_center)
    om = offset_mask.detach().double()
    n, h_out, w_out, _ = om.shape
    per_group = om[..., : group * 3 * n_p].reshape(n, h_out, w_out, group, 3 * n_p)
    offset = per_group[..., : 2 * n_p].reshape(n, h_out, w_out, -1)
    mask = per_group[..., 2 * n_p :].reshape(n, h_out, w_out, -1)
    return naive_dcnv3(
        input,
        offset,
        mask,
        kernel_size,
        stride,
        padding,
        dilation,
        group,
        offset_scale,
        remove_center,
    )


def grid_sample_dcnv3(
    input,
    offset,
    mask,
    kernel_size=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    group=1,
    offset_scale=1.0,
) -> torch.Tensor:
    """InternImage's construction with ``F.grid_sample``: pad, normalised grid, sample.

    The input is zero-padded; a kernel point sits at ``(c + 0.5 + w·s)/W_p`` plus
    ``(i_x·d - c)/W_p · offset_scale`` plus ``Δx · offset_scale / W_p`` in grid_sample's
    [0, 1] coordinates (align_corners=False), W_p the padded width. No remove_center.
    """
    import torch.nn.functional as F

    (k_h, k_w), (s_h, s_w), (p_h, p_w), (d_h, d_w) = kernel_size, stride, padding, dilation
    x = F.pad(input, (0, 0, p_w, p_w, p_h, p_h))
    n, hp, wp, channels = x.shape
    _, h_out, w_out, _ = offset.shape
    c_h, c_w = d_h * (k_h - 1) // 2, d_w * (k_w - 1) // 2
    ref_y = (c_h + 0.5 + torch.arange(h_out, dtype=x.dtype) * s_h) / hp
    ref_x = (c_w + 0.5 + torch.arange(w_out, dtype=x.dtype) * s_w) / wp
    gx, gy = torch.meshgrid(
        (torch.arange(k_w, dtype=x.dtype) * d_w - c_w) / wp,
        (torch.arange(k_h, dtype=x.dtype) * d_h - c_h) / hp,
        indexing="ij",
    )  # (K_w, K_h): x-major points
    p = k_h * k_w
    off = offset.reshape(n, h_out, w_out, group, p, 2)
    loc_x = ref_x[None, None, :, None, None] + gx.reshape(p) * offset_scale
    loc_y = ref_y[None, :, None, None, None] + gy.reshape(p) * offset_scale
    loc_x = loc_x + off[..., 0] * offset_scale / wp
    loc_y = loc_y + off[..., 1] * offset_scale / hp
    grid = torch.stack([2 * loc_x - 1, 2 * loc_y - 1], -1)  # (N, H_out, W_out, G, P, 2)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, h_out * w_out, p, 2)
    planes = x.permute(0, 3, 1, 2).reshape(n * group, channels // group, hp, wp)
    samples = F.grid_sample(
        planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (N·G, C_g, L, P)
    m = mask.reshape(n, h_out * w_out, group, p).permute(0, 2, 1, 3).reshape(n * group, 1, -1, p)
    out = (samples * m).sum(-1).reshape(n, channels, h_out, w_out)
    return out.permute(0, 2, 3, 1)
