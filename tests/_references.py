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
