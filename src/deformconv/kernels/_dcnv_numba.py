"""Fast CPU DCNv3/DCNv4 core: channels-last Numba kernels, forward and backward.

The core has no weights, so there is no GEMM: every output value is a gather-accumulate
``out[r, g·C_g + c] = Σ_p m_p · Σ_q w_q · x[corner_q, g·C_g + c]``. In channels-last
layout the C_g channels of a corner are contiguous, so the inner loops run over them in
vectors; the corners, their weights and the mask are found once per (pixel, group,
point) and shared by the group's channels.

Forward (parallel over output pixels): each pixel writes its own row of the output.

Backward (parallel over tasks (image, group, block of channels)): a task zeroes its part
of ``grad_input``, then walks the image's output pixels in order and, per point, makes
one pass over its channels, eight at a time, that

- adds ``m·w_q·grad_out`` to ``grad_input`` at the four corners, restricted to its own
  channels of its own image: no two tasks write the same element (no atomics);
- accumulates ``d_q = Σ_c grad_out[c] · x[corner_q, c]`` in eight lanes per corner,
  summed at the end in a fixed tree; the mask and offset gradients follow from the
  d_q. When a group's channels are split into several blocks, each block writes its
  own partial and the partials are summed afterwards in a fixed order.

Numba runs LLVM without its SLP vectoriser, and the loop vectoriser leaves a
floating-point reduction scalar unless fastmath allows reordering it. The backward
therefore spells its vectors out with the intrinsics of :mod:`deformconv.kernels._simd` (an
LLVM ``<8 x float>`` value; ``vload``, ``vstore``, ``vmuladd``, ``vsum4``), which emit
plain vector loads, stores, multiplies, adds and shuffles, in the order written. The
backward reads the offsets and the mask, and writes their gradients, group-major
((G, N·L, ·) copies), so that a task's values are contiguous rather than a slice of
every row shared with the other groups' tasks.

The split depends on shapes only (never on the thread count) and every sum runs in a
fixed order, so results are bitwise reproducible whatever the number of threads.

Safety: a position is tested with comparisons that are False for NaN (``y >= -1 and
y < H and ...``, in the compute dtype, where H is exact) before it is floored and
converted to an integer, so NaN, infinite and huge offsets never form an index: they
read 0 and get zero gradients. Corner indices are clamped into the map (a corner outside
gets weight 0), so every read and write is in bounds (a vector covers 8 channels of the
task's block); indices are 64-bit.

float16/bfloat16 are computed in float32; float64 in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from deformconv.kernels import _numba_threads
from deformconv.kernels._simd import LANES, vload, vmuladd, vsplat, vstore, vsum4
from deformconv.kernels.dcnv_reference import kernel_points

__all__ = ["backward", "forward"]

#: A group's channels are split into blocks (down to this many channels) until the
#: backward has at least :data:`_MIN_TASKS` tasks; shapes alone decide the split.
_MIN_BLOCK = 8
_MIN_TASKS = 16

_jit: Callable[[Any], Any] = numba.njit(
    parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy"
)


@numba.njit(inline="always")
def _corners(y, x, height, width, one):  # pragma: no cover
    """Corners of a position with -1 <= y < H and -1 <= x < W (checked by the caller).

    Returns the four flat pixel indices ``row·W + col`` (clamped into the map), the
    fractional parts ``ly, lx`` and the 0/1 validity of each corner.
    """
    y0 = np.floor(y)
    x0 = np.floor(x)
    ly = y - y0
    lx = x - x0
    iy0 = np.int64(y0)  # in [-1, H - 1]: y was range-checked, so the conversion is exact
    ix0 = np.int64(x0)
    # Validity by arithmetic on the exact integers y0 in [-1, H - 1] (min, not a
    # branch): row y0 exists iff y0 >= 0, row y0 + 1 iff y0 + 1 <= H - 1.
    vy0 = min(y0 + one, one)
    vy1 = min((height - one) - y0, one)
    vx0 = min(x0 + one, one)
    vx1 = min((width - one) - x0, one)
    ry0 = max(iy0, 0)
    ry1 = min(iy0 + 1, np.int64(height) - 1)
    rx0 = max(ix0, 0)
    rx1 = min(ix0 + 1, np.int64(width) - 1)
    w = np.int64(width)
    return (
        ry0 * w + rx0, ry0 * w + rx1, ry1 * w + rx0, ry1 * w + rx1,
        ly, lx, vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1,
    )  # fmt: skip


@_jit
def _forward(
    x, off, mask, out, height, width, h_out, w_out, group, kx, ky, geo, scale
):  # pragma: no cover
    # x: (N·H·W, C) channels-last input; off: (N·L, G·P·2); mask: (N·L, G·P);
    # out: (N·L, C). kx, ky: (P,) kernel points relative to the centre.
    # geo: (s_h, s_w, base_h, base_w) with base = c - pad (the sampling grid's origin).
    n_p = kx.shape[0]
    c_g = x.shape[1] // group
    length = h_out * w_out
    one = x.dtype.type(1)
    zero = one - one
    fh = x.dtype.type(height)  # exact: maps have fewer than 2**24 rows and columns
    fw = x.dtype.type(width)
    s_h, s_w, b_h, b_w = geo[0], geo[1], geo[2], geo[3]
    for r in numba.prange(out.shape[0]):
        b = r // length
        l_ = r - b * length
        ho = l_ // w_out
        wo = l_ - ho * w_out
        by = x.dtype.type(ho * s_h + b_h)
        bx = x.dtype.type(wo * s_w + b_w)
        pix = b * height * width
        for c in range(x.shape[1]):
            out[r, c] = zero
        for g in range(group):
            cu = np.uint64(g * c_g)
            for p in range(n_p):
                j = g * n_p + p
                xx = bx + (kx[p] + off[r, 2 * j]) * scale
                yy = by + (ky[p] + off[r, 2 * j + 1]) * scale
                if not (yy >= -one and yy < fh and xx >= -one and xx < fw):  # NaN: False
                    continue
                m = mask[r, j]
                i00, i01, i10, i11, ly, lx, v00, v01, v10, v11 = _corners(yy, xx, fh, fw, one)
                hy = one - ly
                hx = one - lx
                w00 = hy * hx * v00 * m
                w01 = hy * lx * v01 * m
                w10 = ly * hx * v10 * m
                w11 = ly * lx * v11 * m
                a00 = np.uint64(pix + i00)
                a01 = np.uint64(pix + i01)
                a10 = np.uint64(pix + i10)
                a11 = np.uint64(pix + i11)
                ru = np.uint64(r)
                for k in range(np.uint64(c_g)):
                    out[ru, cu + k] += (
                        w00 * x[a00, cu + k] + w01 * x[a01, cu + k]
                        + w10 * x[a10, cu + k] + w11 * x[a11, cu + k]
                    )  # fmt: skip


@_jit
def _backward(
    x,
    off,
    mask,
    gout,
    gx,
    g_off,
    g_mask,
    height,
    width,
    h_out,
    w_out,
    group,
    kx,
    ky,
    geo,
    scale,
    block,
):  # pragma: no cover
    # Group-major off: (G, N·L, P·2) and mask: (G, N·L, P), so that a task reads its
    # group's values contiguously; gout: (N·L, C); gx: (N·H·W, C), written whole;
    # g_off: (B, G, N·L, P·2) and g_mask: (B, G, N·L, P) partials, one per channel
    # block of ``block`` channels. Task (image, group, block) owns gx[image's pixels,
    # block's channels] and g_off[block, group, image's rows].
    n_p = kx.shape[0]
    c_g = x.shape[1] // group
    length = h_out * w_out
    n_img = gout.shape[0] // length if length > 0 else 0
    n_blocks = g_off.shape[0]
    one = x.dtype.type(1)
    zero = one - one
    fh = x.dtype.type(height)  # exact: maps have fewer than 2**24 rows and columns
    fw = x.dtype.type(width)
    vzero = vsplat(zero)
    s_h, s_w, b_h, b_w = geo[0], geo[1], geo[2], geo[3]
    for t in numba.prange(n_img * group * n_blocks):
        b = t // (group * n_blocks)
        g = (t // n_blocks) % group
        blk = t % n_blocks
        c_lo = g * c_g + blk * block
        cnt = np.uint64(min(block, (g + 1) * c_g - c_lo))
        cu = np.uint64(c_lo)
        lanes = np.uint64(LANES)
        full = cnt // lanes * lanes
        pix = b * height * width
        for i in range(pix, pix + height * width):  # this task's part of gx, zeroed
            iu = np.uint64(i)
            for k in range(np.uint64(0), full, lanes):
                vstore(gx, iu, cu + k, vzero)
            for k in range(full, cnt):
                gx[iu, cu + k] = zero
        for l_ in range(length):
            r = b * length + l_
            ru = np.uint64(r)
            ho = l_ // w_out
            wo = l_ - ho * w_out
            by = x.dtype.type(ho * s_h + b_h)
            bx = x.dtype.type(wo * s_w + b_w)
            for p in range(n_p):
                xx = bx + (kx[p] + off[g, r, 2 * p]) * scale
                yy = by + (ky[p] + off[g, r, 2 * p + 1]) * scale
                if not (yy >= -one and yy < fh and xx >= -one and xx < fw):  # NaN: False
                    g_off[blk, g, r, 2 * p] = zero
                    g_off[blk, g, r, 2 * p + 1] = zero
                    g_mask[blk, g, r, p] = zero
                    continue
                m = mask[g, r, p]
                i00, i01, i10, i11, ly, lx, v00, v01, v10, v11 = _corners(yy, xx, fh, fw, one)
                hy = one - ly
                hx = one - lx
                w00 = hy * hx * v00 * m
                w01 = hy * lx * v01 * m
                w10 = ly * hx * v10 * m
                w11 = ly * lx * v11 * m
                a00 = np.uint64(pix + i00)
                a01 = np.uint64(pix + i01)
                a10 = np.uint64(pix + i10)
                a11 = np.uint64(pix + i11)
                # One pass over the block's channels, eight at a time: the four dot
                # products d_q = Σ grad_out·x[corner_q] in lane-wise partial sums
                # (reduced in a fixed tree), and the scatter into gx. Each corner's
                # read-modify-write completes before the next: corners may share a row.
                s00 = s01 = s10 = s11 = vzero
                u00 = vsplat(w00)
                u01 = vsplat(w01)
                u10 = vsplat(w10)
                u11 = vsplat(w11)
                for k in range(np.uint64(0), full, lanes):
                    c = cu + k
                    go = vload(gout, ru, c)
                    s00 = vmuladd(s00, go, vload(x, a00, c))
                    s01 = vmuladd(s01, go, vload(x, a01, c))
                    s10 = vmuladd(s10, go, vload(x, a10, c))
                    s11 = vmuladd(s11, go, vload(x, a11, c))
                    vstore(gx, a00, c, vmuladd(vload(gx, a00, c), u00, go))
                    vstore(gx, a01, c, vmuladd(vload(gx, a01, c), u01, go))
                    vstore(gx, a10, c, vmuladd(vload(gx, a10, c), u10, go))
                    vstore(gx, a11, c, vmuladd(vload(gx, a11, c), u11, go))
                d00, d01, d10, d11 = vsum4(s00, s01, s10, s11)
                for k in range(full, cnt):  # the last cnt % 8 channels, in order
                    c = cu + k
                    go = gout[ru, c]
                    d00 += go * x[a00, c]
                    d01 += go * x[a01, c]
                    d10 += go * x[a10, c]
                    d11 += go * x[a11, c]
                    gx[a00, c] += w00 * go
                    gx[a01, c] += w01 * go
                    gx[a10, c] += w10 * go
                    gx[a11, c] += w11 * go
                d00 *= v00
                d01 *= v01
                d10 *= v10
                d11 *= v11
                g_mask[blk, g, r, p] = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
                ms = m * scale
                g_off[blk, g, r, 2 * p] = (hy * (d01 - d00) + ly * (d11 - d10)) * ms
                g_off[blk, g, r, 2 * p + 1] = (hx * (d10 - d00) + lx * (d11 - d01)) * ms


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Problem:
    """Arguments as flat, contiguous arrays in the compute dtype, plus the geometry."""

    def __init__(
        self,
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
    ) -> None:
        self.dtype = dt = _compute_dtype(input.dtype)
        self.n, self.height, self.width, self.channels = input.shape
        _, self.h_out, self.w_out, _ = offset.shape
        self.group = group
        self.rows = self.n * self.h_out * self.w_out
        self.x = input.detach().to(dt).contiguous().reshape(-1, self.channels)
        self.off = offset.detach().to(dt).contiguous().reshape(self.rows, offset.shape[3])
        self.mask = mask.detach().to(dt).contiguous().reshape(self.rows, mask.shape[3])
        px, py = kernel_points(kernel_size, dilation, remove_center)
        np_dt = np.float64 if dt == torch.float64 else np.float32
        self.kx, self.ky = np.array(px, dtype=np_dt), np.array(py, dtype=np_dt)
        c_h = dilation[0] * (kernel_size[0] - 1) // 2
        c_w = dilation[1] * (kernel_size[1] - 1) // 2
        self.geo = np.array(
            [stride[0], stride[1], c_h - padding[0], c_w - padding[1]], dtype=np.int64
        )
        self.scale = np_dt(offset_scale)

    def common(self) -> tuple[object, ...]:
        return (self.x.numpy(), self.off.numpy(), self.mask.numpy())

    def geometry(self) -> tuple[object, ...]:
        return (
            self.height, self.width, self.h_out, self.w_out, self.group, self.kx, self.ky,
            self.geo, self.scale,
        )  # fmt: skip


def _channel_block(n: int, group: int, c_g: int) -> int:
    """Channels per backward task: all of a group's, split while there are few tasks."""
    block = c_g
    while n * group * -(-c_g // block) < _MIN_TASKS and block >= 2 * _MIN_BLOCK:
        block = -(-block // 2)
    return max(1, block)


@_numba_threads.scoped
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
    """DCNv3 core forward; see :func:`deformconv.kernels.dcnv_reference.forward`.

    Returns:
        (N, H_out, W_out, C), contiguous, in ``input``'s dtype.
    """
    p = _Problem(input, offset, mask, kernel_size, stride, padding, dilation, group,
                 offset_scale, remove_center)  # fmt: skip
    out = torch.empty(p.rows, p.channels, dtype=p.dtype)
    if p.rows > 0:
        _numba_threads.launch(_forward, *p.common(), out.numpy(), *p.geometry())
    return out.reshape(p.n, p.h_out, p.w_out, p.channels).to(input.dtype)


@_numba_threads.scoped
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
    """Gradients for ``(input, offset, mask)``; see ``dcnv_reference.backward``.

    Returns:
        ``(grad_input, grad_offset, grad_mask)``, contiguous, shaped and typed like their
        arguments; bitwise reproducible whatever the thread count.
    """
    p = _Problem(input, offset, mask, kernel_size, stride, padding, dilation, group,
                 offset_scale, remove_center)  # fmt: skip
    c_g = p.channels // group
    block = _channel_block(p.n, group, c_g)
    n_blocks = -(-c_g // block)
    gout = grad_output.detach().to(p.dtype).contiguous().reshape(p.rows, p.channels)
    n_p = len(p.kx)
    off = p.off.reshape(p.rows, group, 2 * n_p).transpose(0, 1).contiguous()
    mask_g = p.mask.reshape(p.rows, group, n_p).transpose(0, 1).contiguous()
    gx = torch.empty_like(p.x) if p.rows > 0 else torch.zeros_like(p.x)  # the kernel zeroes it
    g_off = p.x.new_empty(n_blocks, *off.shape)
    g_mask = p.x.new_empty(n_blocks, *mask_g.shape)
    if p.rows > 0:
        _numba_threads.launch(
            _backward, p.x.numpy(), off.numpy(), mask_g.numpy(), gout.numpy(), gx.numpy(),
            g_off.numpy(), g_mask.numpy(), *p.geometry(), block,
        )  # fmt: skip
    grad_off, grad_m = g_off[0], g_mask[0]
    for i in range(1, n_blocks):  # a fixed order: reproducible
        grad_off = grad_off + g_off[i]
        grad_m = grad_m + g_mask[i]
    grad_off = grad_off.transpose(0, 1)  # back to (N·L, G, P·2)
    grad_m = grad_m.transpose(0, 1)
    return (
        gx.reshape(input.shape).to(input.dtype),
        grad_off.reshape(offset.shape).to(offset.dtype),
        grad_m.reshape(mask.shape).to(mask.dtype),
    )
