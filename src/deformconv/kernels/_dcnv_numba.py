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
from deformconv.kernels._simd import (
    LANES,
    vadd,
    vfloor,
    vge,
    vload,
    vload2,
    vlt,
    vmax,
    vmin,
    vmul,
    vmuladd,
    vselect,
    vsplat,
    vstore,
    vsub,
    vsum4,
)
from deformconv.kernels.dcnv_reference import kernel_points

__all__ = ["backward", "forward"]

#: A group's channels are split into blocks (down to this many channels) until the
#: backward has at least :data:`_MIN_TASKS` tasks; shapes alone decide the split.
_MIN_BLOCK = 8
_MIN_TASKS = 16

#: Output rows per forward task (a task allocates its scratch once).
_ROWS_PER_TASK = 16

_jit: Callable[[Any], Any] = numba.njit(
    parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy"
)


# Fields of the per-point table that :func:`_points` fills, eight points at a time.
_RY0, _RY1, _RX0, _RX1 = 0, 1, 2, 3  # the corners' rows and columns, clamped into the map
_W00, _W01, _W10, _W11 = 4, 5, 6, 7  # the corners' weights m·w_q (0 for a corner outside)
_OK = 8  # 1 for a point inside (-1 <= y < H and -1 <= x < W), else 0
_LY, _LX = 9, 10  # fractional parts
_V00, _V01, _V10, _V11 = 11, 12, 13, 14  # corner validity (0/1)
_M = 15  # the mask (0 for a point outside)
_FIELDS = 16


@numba.njit(inline="always")
def _points(table, col, by, bx, ky, kx, oy, ox, m, scale, fh, fw, one):  # pragma: no cover
    """Fill ``table[:, col : col + 8]`` for eight points (vectors of positions' parts).

    A point's position is ``b + (k + o)·scale``. Lanes outside the map (NaN included:
    the comparisons are False) are replaced by -1 before the floor, so no NaN, infinite
    or huge value reaches a corner; their mask is 0 and ``_OK`` is 0.
    """
    vone = vsplat(one)
    vzero = vsub(vone, vone)
    vneg = vsub(vzero, vone)
    vh = vsplat(fh)
    vw = vsplat(fw)
    yy = vadd(by, vmul(vadd(ky, oy), scale))
    xx = vadd(bx, vmul(vadd(kx, ox), scale))
    ok = vmul(vmul(vge(yy, vneg), vlt(yy, vh)), vmul(vge(xx, vneg), vlt(xx, vw)))
    yy = vselect(ok, yy, vneg)
    xx = vselect(ok, xx, vneg)
    m = vselect(ok, m, vzero)
    y0 = vfloor(yy)  # exact integers in [-1, H - 1]
    x0 = vfloor(xx)
    ly = vsub(yy, y0)
    lx = vsub(xx, x0)
    hy = vsub(vone, ly)
    hx = vsub(vone, lx)
    # Row y0 exists iff y0 >= 0, row y0 + 1 iff y0 + 1 <= H - 1 (as 0/1 by a min).
    vy0 = vmin(vadd(y0, vone), vone)
    vy1 = vmin(vsub(vsub(vh, vone), y0), vone)
    vx0 = vmin(vadd(x0, vone), vone)
    vx1 = vmin(vsub(vsub(vw, vone), x0), vone)
    v00 = vmul(vy0, vx0)
    v01 = vmul(vy0, vx1)
    v10 = vmul(vy1, vx0)
    v11 = vmul(vy1, vx1)
    vstore(table, _RY0, col, vmax(y0, vzero))
    vstore(table, _RY1, col, vmin(vadd(y0, vone), vsub(vh, vone)))
    vstore(table, _RX0, col, vmax(x0, vzero))
    vstore(table, _RX1, col, vmin(vadd(x0, vone), vsub(vw, vone)))
    vstore(table, _W00, col, vmul(vmul(vmul(hy, hx), v00), m))
    vstore(table, _W01, col, vmul(vmul(vmul(hy, lx), v01), m))
    vstore(table, _W10, col, vmul(vmul(vmul(ly, hx), v10), m))
    vstore(table, _W11, col, vmul(vmul(vmul(ly, lx), v11), m))
    vstore(table, _OK, col, ok)
    vstore(table, _LY, col, ly)
    vstore(table, _LX, col, lx)
    vstore(table, _V00, col, v00)
    vstore(table, _V01, col, v01)
    vstore(table, _V10, col, v10)
    vstore(table, _V11, col, v11)
    vstore(table, _M, col, m)


@numba.njit(inline="always")
def _corner_rows(table, j, pix, width):  # pragma: no cover
    """The flat input rows of point ``j``'s four corners (the table's values are exact)."""
    w = np.int64(width)
    y0 = np.int64(table[_RY0, j]) * w + pix
    y1 = np.int64(table[_RY1, j]) * w + pix
    x0 = np.int64(table[_RX0, j])
    x1 = np.int64(table[_RX1, j])
    return np.uint64(y0 + x0), np.uint64(y0 + x1), np.uint64(y1 + x0), np.uint64(y1 + x1)


@numba.njit(inline="always")
def _gather(x, out, r, c0, c_g, corner, table, sel, n_valid):  # pragma: no cover
    """``out[r, c0 : c0 + c_g] = Σ_i Σ_q w_q(sel[i]) · x[corner[i, q], c0 : c0 + c_g]``.

    Sixteen channels at a time in two vector accumulators held across the points (then
    eight, then one at a time), each point's four products summed left to right and
    added to the accumulator.
    """
    lanes = np.uint64(LANES)
    two = lanes + lanes
    n = np.uint64(c_g)
    pair_end = n // two * two
    full = n // lanes * lanes
    zero = table[0, 0] - table[0, 0]
    vzero = vsplat(zero)
    for k in range(np.uint64(0), full, lanes):
        pair = k < pair_end
        if pair and k % two != np.uint64(0):
            continue  # the second half of a pair, done with the first
        c = c0 + k
        a0 = vzero
        a1 = vzero
        for i in range(n_valid):
            j = sel[i]
            i0, i1, i2, i3 = corner[i, 0], corner[i, 1], corner[i, 2], corner[i, 3]
            u0, u1 = vsplat(table[_W00, j]), vsplat(table[_W01, j])
            u2, u3 = vsplat(table[_W10, j]), vsplat(table[_W11, j])
            s0 = vmuladd(vmul(u0, vload(x, i0, c)), u1, vload(x, i1, c))
            a0 = vadd(a0, vmuladd(vmuladd(s0, u2, vload(x, i2, c)), u3, vload(x, i3, c)))
            if pair:
                d = c + lanes
                s1 = vmuladd(vmul(u0, vload(x, i0, d)), u1, vload(x, i1, d))
                a1 = vadd(a1, vmuladd(vmuladd(s1, u2, vload(x, i2, d)), u3, vload(x, i3, d)))
        vstore(out, r, c, a0)
        if pair:
            vstore(out, r, c + lanes, a1)
    for k in range(full, n):
        c = c0 + k
        acc = zero
        for i in range(n_valid):
            j = sel[i]
            acc += (
                table[_W00, j] * x[corner[i, 0], c] + table[_W01, j] * x[corner[i, 1], c]
                + table[_W10, j] * x[corner[i, 2], c] + table[_W11, j] * x[corner[i, 3], c]
            )  # fmt: skip
        out[r, c] = acc


@_jit
def _forward(
    x, off, mask, out, height, width, h_out, w_out, group, kx, ky, geo, scale
):  # pragma: no cover
    # x: (N·H·W, C) channels-last input; off: (N·L, G·P·2); mask: (N·L, G·P);
    # out: (N·L, C). kx, ky: (1, ≥ G·P + 8) the kernel points relative to the centre,
    # tiled over the groups and padded. geo: (s_h, s_w, base_h, base_w) with
    # base = c - pad (the sampling grid's origin).
    c_g = x.shape[1] // group
    n_gp = mask.shape[1]
    n_p = n_gp // group
    length = h_out * w_out
    rows = out.shape[0]
    one = x.dtype.type(1)
    fh = x.dtype.type(height)  # exact: maps have fewer than 2**24 rows and columns
    fw = x.dtype.type(width)
    vscale = vsplat(scale)
    full = n_gp // LANES * LANES
    s_h, s_w, b_h, b_w = geo[0], geo[1], geo[2], geo[3]
    for t in numba.prange((rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        table = np.empty((_FIELDS, full + LANES), kx.dtype)
        tail_off = np.zeros((1, 2 * LANES), kx.dtype)  # the last n_gp % 8 points, padded
        tail_mask = np.zeros((1, LANES), kx.dtype)
        corner = np.empty((n_p, 4), np.uint64)  # the valid points of one (row, group)
        sel = np.empty(n_p, np.int64)
        for r in range(t * _ROWS_PER_TASK, min(rows, (t + 1) * _ROWS_PER_TASK)):
            b = r // length
            l_ = r - b * length
            ho = l_ // w_out
            wo = l_ - ho * w_out
            by = vsplat(x.dtype.type(ho * s_h + b_h))
            bx = vsplat(x.dtype.type(wo * s_w + b_w))
            pix = b * height * width
            for j in range(0, full, LANES):
                ox, oy = vload2(off, r, 2 * j)
                _points(table, j, by, bx, vload(ky, 0, j), vload(kx, 0, j), oy, ox,
                        vload(mask, r, j), vscale, fh, fw, one)  # fmt: skip
            if full < n_gp:
                for j in range(full, n_gp):
                    tail_off[0, 2 * (j - full)] = off[r, 2 * j]
                    tail_off[0, 2 * (j - full) + 1] = off[r, 2 * j + 1]
                    tail_mask[0, j - full] = mask[r, j]
                ox, oy = vload2(tail_off, 0, 0)
                _points(table, full, by, bx, vload(ky, 0, full), vload(kx, 0, full), oy, ox,
                        vload(tail_mask, 0, 0), vscale, fh, fw, one)  # fmt: skip
            for g in range(group):
                n_valid = 0
                for j in range(g * n_p, (g + 1) * n_p):
                    if table[_OK, j] != 0:
                        (
                            corner[n_valid, 0],
                            corner[n_valid, 1],
                            corner[n_valid, 2],
                            corner[n_valid, 3],
                        ) = _corner_rows(table, j, pix, width)
                        sel[n_valid] = j
                        n_valid += 1
                _gather(x, out, np.uint64(r), np.uint64(g * c_g), c_g, corner, table, sel,
                        n_valid)  # fmt: skip


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
    bx_l,
    by_l,
    scale,
    block,
):  # pragma: no cover
    # Group-major off: (G, N·L·P·2) and mask: (G, N·L·P), so that a task reads its
    # group's values contiguously; gout: (N·L, C); gx: (N·H·W, C), written whole;
    # g_off: (B, G, N·L·P·2) and g_mask: (B, G, N·L·P) partials, one per channel
    # block of ``block`` channels. Task (image, group, block) owns gx[image's pixels,
    # block's channels] and g_off[block, group, image's rows]. kx, ky, bx_l, by_l:
    # (1, ≥ L·P + 8) the kernel points and the sampling grid's base per (pixel, point).
    c_g = x.shape[1] // group
    length = h_out * w_out
    n_img = gout.shape[0] // length if length > 0 else 0
    n_p = mask.shape[1] // gout.shape[0]  # the kernel runs with N·L > 0
    n_blocks = g_off.shape[0]
    n_flat = mask.shape[1]
    one = x.dtype.type(1)
    zero = one - one
    fh = x.dtype.type(height)  # exact: maps have fewer than 2**24 rows and columns
    fw = x.dtype.type(width)
    vzero = vsplat(zero)
    vscale = vsplat(scale)
    chunk = LANES * n_p  # points of LANES pixels: a whole number of vectors
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
        table = np.empty((_FIELDS, chunk), kx.dtype)
        tail_off = np.zeros((1, 2 * LANES), kx.dtype)  # the image's last points, padded
        tail_mask = np.zeros((1, LANES), kx.dtype)
        gu = np.uint64(g)
        for i in range(pix, pix + height * width):  # this task's part of gx, zeroed
            iu = np.uint64(i)
            for k in range(np.uint64(0), full, lanes):
                vstore(gx, iu, cu + k, vzero)
            for k in range(full, cnt):
                gx[iu, cu + k] = zero
        for l_lo in range(0, length, LANES):
            l_hi = min(length, l_lo + LANES)
            f_lo = (b * length + l_lo) * n_p  # the chunk's first point in the flat rows
            for v in range(0, (l_hi - l_lo) * n_p, LANES):
                j = f_lo + v
                q = l_lo * n_p + v  # the point's index within an image
                if j + LANES <= n_flat:
                    ox, oy = vload2(off, g, 2 * j)
                    m = vload(mask, g, j)
                else:  # the last points of the last image: through a padded copy
                    for e in range(n_flat - j):
                        tail_off[0, 2 * e] = off[g, 2 * (j + e)]
                        tail_off[0, 2 * e + 1] = off[g, 2 * (j + e) + 1]
                        tail_mask[0, e] = mask[g, j + e]
                    ox, oy = vload2(tail_off, 0, 0)
                    m = vload(tail_mask, 0, 0)
                _points(table, v, vload(by_l, 0, q), vload(bx_l, 0, q), vload(ky, 0, q),
                        vload(kx, 0, q), oy, ox, m, vscale, fh, fw, one)  # fmt: skip
            for l_ in range(l_lo, l_hi):
                r = b * length + l_
                ru = np.uint64(r)
                for p in range(n_p):
                    j = (l_ - l_lo) * n_p + p
                    jf = np.uint64(r * n_p + p)  # the point in the flat rows
                    if table[_OK, j] == 0:
                        g_off[blk, gu, 2 * jf] = zero
                        g_off[blk, gu, 2 * jf + 1] = zero
                        g_mask[blk, gu, jf] = zero
                        continue
                    a00, a01, a10, a11 = _corner_rows(table, j, pix, width)
                    w00 = table[_W00, j]
                    w01 = table[_W01, j]
                    w10 = table[_W10, j]
                    w11 = table[_W11, j]
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
                    d00 *= table[_V00, j]
                    d01 *= table[_V01, j]
                    d10 *= table[_V10, j]
                    d11 *= table[_V11, j]
                    ly = table[_LY, j]
                    lx = table[_LX, j]
                    hy = one - ly
                    hx = one - lx
                    g_mask[blk, gu, jf] = (
                        hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
                    )
                    ms = table[_M, j] * scale
                    g_off[blk, gu, 2 * jf] = (hy * (d01 - d00) + ly * (d11 - d10)) * ms
                    g_off[blk, gu, 2 * jf + 1] = (hx * (d10 - d00) + lx * (d11 - d01)) * ms


@_jit
def _split_groups(src, dst):  # pragma: no cover
    # src: (R, G·k) → dst: (G, R·k), group-major.
    group = dst.shape[0]
    k = src.shape[1] // group
    for r in numba.prange(src.shape[0]):
        for g in range(group):
            for i in range(k):
                dst[g, r * k + i] = src[r, g * k + i]


@_jit
def _merge_groups(src, dst):  # pragma: no cover
    # src: (B, G, R·k) partials → dst: (R, G·k), their sum in the order of the blocks.
    n_blocks = src.shape[0]
    group = src.shape[1]
    k = dst.shape[1] // group
    for r in numba.prange(dst.shape[0]):
        for g in range(group):
            for i in range(k):
                acc = src[0, g, r * k + i]
                for blk in range(1, n_blocks):
                    acc = acc + src[blk, g, r * k + i]
                dst[r, g * k + i] = acc


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
        self.np_dtype = np.float64 if dt == torch.float64 else np.float32
        self.kx, self.ky = np.array(px, dtype=self.np_dtype), np.array(py, dtype=self.np_dtype)
        c_h = dilation[0] * (kernel_size[0] - 1) // 2
        c_w = dilation[1] * (kernel_size[1] - 1) // 2
        self.stride = stride
        self.base = (c_h - padding[0], c_w - padding[1])  # the sampling grid's origin
        self.scale = self.np_dtype(offset_scale)

    def common(self) -> tuple[object, ...]:
        return (self.x.numpy(), self.off.numpy(), self.mask.numpy())

    def sizes(self) -> tuple[object, ...]:
        return (self.height, self.width, self.h_out, self.w_out, self.group)

    def _padded(self, values: np.ndarray) -> np.ndarray:
        """(1, len + 8): the kernels load eight entries from any index below len."""
        out = np.zeros((1, len(values) + LANES), dtype=self.np_dtype)
        out[0, : len(values)] = values
        return out

    def points_per_row(self) -> tuple[object, ...]:
        """The kernel points tiled over the groups, and ``(s_h, s_w, base_h, base_w)``."""
        geo = np.array([*self.stride, *self.base], dtype=np.int64)
        return (self._padded(np.tile(self.kx, self.group)),
                self._padded(np.tile(self.ky, self.group)), geo)  # fmt: skip

    def points_per_image(self) -> tuple[object, ...]:
        """Per (output pixel, point) of an image: the kernel point and the grid's base."""
        n_p = len(self.kx)
        ho = np.arange(self.h_out).repeat(self.w_out) * self.stride[0] + self.base[0]
        wo = np.tile(np.arange(self.w_out), self.h_out) * self.stride[1] + self.base[1]
        return (
            self._padded(np.tile(self.kx, self.h_out * self.w_out)),
            self._padded(np.tile(self.ky, self.h_out * self.w_out)),
            self._padded(wo.repeat(n_p)), self._padded(ho.repeat(n_p)),
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
        _numba_threads.launch(
            _forward, *p.common(), out.numpy(), *p.sizes(), *p.points_per_row(), p.scale
        )
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
    gx = torch.empty_like(p.x) if p.rows > 0 else torch.zeros_like(p.x)  # the kernel zeroes it
    grad_off = torch.empty_like(p.off) if p.rows > 0 else torch.zeros_like(p.off)
    grad_m = torch.empty_like(p.mask) if p.rows > 0 else torch.zeros_like(p.mask)
    if p.rows > 0:
        off = p.x.new_empty(group, p.rows * 2 * n_p)
        mask_g = p.x.new_empty(group, p.rows * n_p)
        g_off = p.x.new_empty(n_blocks, *off.shape)
        g_mask = p.x.new_empty(n_blocks, *mask_g.shape)
        _numba_threads.launch(_split_groups, p.off.numpy(), off.numpy())
        _numba_threads.launch(_split_groups, p.mask.numpy(), mask_g.numpy())
        _numba_threads.launch(
            _backward, p.x.numpy(), off.numpy(), mask_g.numpy(), gout.numpy(), gx.numpy(),
            g_off.numpy(), g_mask.numpy(), *p.sizes(), *p.points_per_image(), p.scale, block,
        )  # fmt: skip
        _numba_threads.launch(_merge_groups, g_off.numpy(), grad_off.numpy())
        _numba_threads.launch(_merge_groups, g_mask.numpy(), grad_m.numpy())
    return (
        gx.reshape(input.shape).to(input.dtype),
        grad_off.reshape(offset.shape).to(offset.dtype),
        grad_m.reshape(mask.shape).to(mask.dtype),
    )
