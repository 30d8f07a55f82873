"""Deliberately naive float64 loop implementations written from DESIGN.md's equation.

Used only as test oracles: they share no code with the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _bilinear(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """Bilinear sample of img (C, H, W) at (y, x) with the DCNv2 boundary rule."""
    c, h, w = img.shape
    if not (y > -1 and y < h and x > -1 and x < w):  # also rejects NaN
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
            total += wt * img[:, yy, xx]
    return total


def naive_deform_conv2d(
    input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None
) -> torch.Tensor:
    """y(p0) = sum_n w(p_n) m_n(p0) x(p0*stride - padding + p_n*dilation + Δp_n(p0)), in float64."""
    x = input.detach().double().numpy()
    off = offset.detach().double().numpy()
    w = weight.detach().double().numpy()
    m = None if mask is None else mask.detach().double().numpy()
    n_batch, c_in, _, _ = x.shape
    c_out, c_pg, k_h, k_w = w.shape
    groups = c_in // c_pg
    k = k_h * k_w
    n_off = off.shape[1] // (2 * k)
    c_per_off = c_in // n_off
    h_out, w_out = off.shape[2], off.shape[3]
    out = np.zeros((n_batch, c_out, h_out, w_out))
    for n in range(n_batch):
        for ho in range(h_out):
            for wo in range(w_out):
                # columns[c, i, j]: the deformed, modulated sample of input channel c at tap (i, j)
                cols = np.zeros((c_in, k_h, k_w))
                for g in range(n_off):
                    chans = slice(g * c_per_off, (g + 1) * c_per_off)
                    for i in range(k_h):
                        for j in range(k_w):
                            kp = i * k_w + j
                            dy = off[n, 2 * (g * k + kp), ho, wo]
                            dx = off[n, 2 * (g * k + kp) + 1, ho, wo]
                            py = ho * stride[0] - padding[0] + i * dilation[0] + dy
                            px = wo * stride[1] - padding[1] + j * dilation[1] + dx
                            val = _bilinear(x[n, chans], py, px)
                            if m is not None:
                                val = val * m[n, g * k + kp, ho, wo]
                            cols[chans, i, j] = val
                for co in range(c_out):
                    grp = co // (c_out // groups)
                    out[n, co, ho, wo] = np.sum(w[co] * cols[grp * c_pg : (grp + 1) * c_pg])
                    if bias is not None:
                        out[n, co, ho, wo] += float(bias[co])
    return torch.from_numpy(out)


def _bilinear_roi_align(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """Bilinear sample of img (C, H, W) at (y, x) with RoIAlign's (torchvision's) boundary rule.

    Outside [-1, H] x [-1, W] (or NaN) reads 0; otherwise the position is clamped into
    the map (edge replication).
    """
    c, h, w = img.shape
    if not (y >= -1 and y <= h and x >= -1 and x <= w):  # also rejects NaN
        return np.zeros(c)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = math.floor(y), math.floor(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * img[:, y0, x0]
        + (1 - ly) * lx * img[:, y0, x1]
        + ly * (1 - lx) * img[:, y1, x0]
        + ly * lx * img[:, y1, x1]
    )


def naive_deform_roi_pool(
    input,
    rois,
    offset=None,
    output_size=(7, 7),
    spatial_scale=1.0,
    sampling_ratio=0,
    gamma=0.1,
    aligned=True,
    mask=None,
    position_sensitive=False,
) -> torch.Tensor:
    """Deformable (PS) RoI pooling, DCNv1 eq. (5)-(6), in float64 loops.

    y(k, c, i, j) = m_kij / count · Σ_{a,b} x(c, p_ij + γ·Δp̂_ij∘(w, h) + s_ab), with the
    RoIAlign geometry of torchvision (aligned: -0.5 shift; not aligned: size >= 1) and
    offset channel 0 = x, 1 = y.
    """
    x = input.detach().double().numpy()
    r = rois.detach().double().numpy()
    off = None if offset is None else offset.detach().double().numpy()
    m = None if mask is None else mask.detach().double().numpy()
    oh, ow = output_size
    c = x.shape[1]
    c_out = c // (oh * ow) if position_sensitive else c
    out = np.zeros((r.shape[0], c_out, oh, ow))
    shift = 0.5 if aligned else 0.0
    for k in range(r.shape[0]):
        b = int(r[k, 0])
        x1, y1 = r[k, 1] * spatial_scale - shift, r[k, 2] * spatial_scale - shift
        x2, y2 = r[k, 3] * spatial_scale - shift, r[k, 4] * spatial_scale - shift
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        # The adaptive grid stops at 512 samples per RoI side: max(1, 512 // out) per bin.
        gh = sampling_ratio if sampling_ratio > 0 else min(math.ceil(rh / oh), max(1, 512 // oh))
        gw = sampling_ratio if sampling_ratio > 0 else min(math.ceil(rw / ow), max(1, 512 // ow))
        count = max(gh * gw, 1)
        for i in range(oh):
            for j in range(ow):
                dx = 0.0 if off is None else gamma * rw * off[k, 0, i, j]
                dy = 0.0 if off is None else gamma * rh * off[k, 1, i, j]
                if position_sensitive:
                    img = x[b, [(co * oh + i) * ow + j for co in range(c_out)]]
                else:
                    img = x[b]
                acc = np.zeros(c_out)
                for a in range(gh):
                    sy = y1 + dy + i * bh + (a + 0.5) * bh / gh
                    for bb in range(gw):
                        sx = x1 + dx + j * bw + (bb + 0.5) * bw / gw
                        acc += _bilinear_roi_align(img, sy, sx)
                val = acc / count
                if m is not None:
                    val = val * m[k, 0, i, j]
                out[k, :, i, j] = val
    return torch.from_numpy(out)
