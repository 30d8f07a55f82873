"""Fast CPU DCNv3/DCNv4 core: channels-last Numba kernels, forward and backward.

The core has no weights, so there is no GEMM: every output value is a gather-accumulate
``out[r, g·C_g + c] = Σ_p m_p · Σ_q w_q · x[corner_q, g·C_g + c]``. In channels-last
layout the C_g channels of a corner are contiguous, so the inner loops run over them in
vectors; the corners, their weights and the mask are found once per (pixel, group,
point) and shared by the group's channels.

Points, eight at a time. For one output row, the G·P points' offsets and masks are
contiguous; :func:`_points` takes eight of them at once (the offsets' x and y split
from one 16-wide load) and fills a small table: the corners' clamped rows and columns,
the four weights ``m·w_q``, the fractional parts, the corners' 0/1 validity and whether
the point is inside the map. The row's last G·P mod 8 points are loaded on into the
next row (lanes that are ignored), or, in the last row, from a padded copy.

Forward (parallel over blocks of output rows): per (row, group), sixteen channels at a
time in two vector accumulators held across the group's points inside the map (then
eight, then one at a time). Each row is written once.

When a group's channels (a backward task's block) are a multiple of 8, as in every
InternImage layer, a faster pass takes over, with the same sums. Its cost is the
latency of the scattered loads of ``x``, so it keeps many of them in flight: the table
also holds the corners' element offsets (64-bit, computed in vectors), the points are
walked without a branch (a point outside the map has in-bounds corners and a select
drops its terms; a mispredicted branch, which random offsets make common, would discard
the loads in flight), and while it walks a group it prefetches the next group's
corners, whose offsets the table already holds.

Backward (parallel over tasks (image, range of groups, block of channels)): a task
zeroes its part of ``grad_input``, then walks the image's output rows in order and,
per point inside the map, makes one pass over its channels, eight at a time, that

- adds ``m·w_q·grad_out`` to ``grad_input`` at the four corners, restricted to its own
  channels of its own image: no two tasks write the same element (no atomics);
- accumulates ``d_q = Σ_c grad_out[c] · x[corner_q, c]`` in eight lanes per corner.

The lanes of eight points are then summed at once (an 8x8 transpose-and-add, each sum
in the same fixed tree), and the mask and offset gradients of eight points follow from
the d_q in vectors, written straight into their (N·L, G·P·2) and (N·L, G·P) rows. A task
covers whole rows of ``x`` and ``grad_input`` (all groups) unless there are fewer than
:data:`_MIN_TASKS` images: a group's channels alone are a short piece of each row, and
those pieces, a power of two apart in memory, would compete for a few cache sets. Groups
are split into ranges first, then a group's channels into blocks; each block writes
its own partial of the offset and mask gradients, summed afterwards in a fixed order.

Numba runs LLVM without its SLP vectoriser, and the loop vectoriser leaves a
floating-point reduction scalar unless fastmath allows reordering it. The kernels
therefore spell their vectors out with the intrinsics of :mod:`deformconv.kernels._simd`
(an LLVM ``<8 x float>`` value; loads, stores, arithmetic, floor, compares, selects and
lane shuffles), emitted in the order written, with no FMA contraction: the results are
those of the scalar loops, bit for bit.

The split depends on shapes only (never on the thread count) and every sum runs in a
fixed order, so results are bitwise reproducible whatever the number of threads.

Safety: a position is tested with comparisons that are False for NaN (``y >= -1 and
y < H and ...``, in the compute dtype, where H is exact) and the lanes that fail are
replaced by -1 (a select) before the floor, so NaN, infinite and huge offsets never
form an index: they read 0 and get zero gradients. Corner indices are clamped into the
map (a corner outside gets weight 0), so every read and write is in bounds (a vector
covers 8 channels of the task's block); indices are 64-bit.

float16/bfloat16 are computed in float32; float64 in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic
from torch import Tensor

from deformconv.kernels import _numba_threads
from deformconv.kernels._simd import (
    LANES,
    lanes_pointer,
    vadd,
    vload,
    vload2,
    vmul,
    vmuladd,
    vselect,
    vsplat,
    vstore,
    vstore2,
    vsub,
    vsum4,
    vsum8,
)
from deformconv.kernels._taps import (
    FIELDS,
    LX,
    LY,
    OK,
    V00,
    V01,
    V10,
    V11,
    W00,
    W01,
    W10,
    W11,
    M,
    corner_rows,
    vtaps,
)  # fmt: skip
from deformconv.kernels.dcnv_reference import kernel_points

__all__ = ["backward", "forward"]

#: The backward's tasks cover whole images, split into ranges of groups, then a group's
#: channels into blocks (down to this many channels), until there are at least
#: :data:`_MIN_TASKS` tasks; shapes alone decide the split.
_MIN_BLOCK = 8
_MIN_TASKS = 8

#: Output rows per forward task (a task allocates its scratch once).
_ROWS_PER_TASK = 16

_jit: Callable[[Any], Any] = numba.njit(
    parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy"
)


@intrinsic
def _vstore_corners(
    typingctx: Any, tab: Any, col: Any, ry0: Any, ry1: Any, rx0: Any, rx1: Any, row: Any, pix: Any
) -> Any:
    """``tab[0:4, col : col + 8]``: the corners' element offsets ``ry·row + rx·pix``, 64-bit.

    For (ry0, rx0), (ry0, rx1), (ry1, rx0), (ry1, rx1); the rows and columns (exact
    integers, clamped into the map) are converted lane-wise, then multiplied and added
    in 64-bit integer vectors.
    """
    sig = types.none(tab, col, ry0, ry1, rx0, rx1, row, pix)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vty = ir.VectorType(ir.IntType(64), LANES)
        i32 = ir.IntType(32)
        zeros = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)

        def splat(value: Any) -> Any:
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, i32(0))
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

        row, pix = splat(args[6]), splat(args[7])
        ys = [builder.mul(builder.fptosi(v, vty), row) for v in args[2:4]]
        xs = [builder.mul(builder.fptosi(v, vty), pix) for v in args[4:6]]
        for q, (y, x) in enumerate((y, x) for y in ys for x in xs):
            at = context.get_constant(types.intp, q)
            ptr = lanes_pointer(context, builder, sig.args[0], args[0], at, args[1])
            builder.store(builder.add(y, x), builder.bitcast(ptr, vty.as_pointer()), align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx: Any, a: Any, r: Any, c: Any) -> Any:
    """A hint to bring the cache line of ``a[r, c]`` into the caches (never faults)."""
    sig = types.none(a, r, c)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.bitcast(lanes_pointer(context, builder, sig.args[0], *args), i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always")
def _points(
    table, corners, col, by, bx, ky, kx, oy, ox, m, scale, fh, fw, one, width, chans
):  # pragma: no cover
    """Fill ``table[:, col : col + 8]`` and ``corners[:, col : col + 8]`` for eight points.

    ``corners`` gets the four corners' element offsets in a channels-last image of
    ``width`` columns and ``chans`` channels (see :func:`_vstore_corners`).

    A point's position is ``b + (k + o)·scale``; the table as :func:`vtaps` fills it.
    """
    yy = vadd(by, vmul(vadd(ky, oy), scale))
    xx = vadd(bx, vmul(vadd(kx, ox), scale))
    ry0, ry1, rx0, rx1 = vtaps(table, col, yy, xx, m, fh, fw, one)
    _vstore_corners(corners, col, ry0, ry1, rx0, rx1, width * chans, chans)


@numba.njit(inline="always")
def _gather(x, out, r, c0, c_g, table, j_lo, n_p, pix, width):  # pragma: no cover
    """``out[r, c0 : c0 + c_g] = Σ_j Σ_q w_q(j) · x[corner_q(j), c0 : c0 + c_g]``.

    Over the points ``j_lo : j_lo + n_p`` inside the map. Sixteen channels at a time in
    two vector accumulators held across the points (then eight, then one at a time),
    each point's four products summed left to right and added to the accumulator.
    """
    lanes = np.uint64(LANES)
    two = lanes + lanes
    n = np.uint64(c_g)
    pair_end = n // two * two
    full = n // lanes * lanes
    zero = out.dtype.type(0)
    vzero = vsplat(zero)
    for k in range(np.uint64(0), full, lanes):
        pair = k < pair_end
        if pair and k % two != np.uint64(0):
            continue  # the second half of a pair, done with the first
        c = c0 + k
        a0 = vzero
        a1 = vzero
        for j in range(j_lo, j_lo + n_p):
            if table[OK, j] == 0:
                continue
            i0, i1, i2, i3 = corner_rows(table, j, pix, width)
            u0, u1 = vsplat(table[W00, j]), vsplat(table[W01, j])
            u2, u3 = vsplat(table[W10, j]), vsplat(table[W11, j])
            s0 = vmuladd(vmul(u0, vload(x, i0, c)), u1, vload(x, i1, c))
            a0 = vadd(a0, vmuladd(vmuladd(s0, u2, vload(x, i2, c)), u3, vload(x, i3, c)))
            if pair:
                d = c + lanes
                s1 = vmuladd(vmul(u0, vload(x, i0, d)), u1, vload(x, i1, d))
                a1 = vadd(a1, vmuladd(vmuladd(s1, u2, vload(x, i2, d)), u3, vload(x, i3, d)))
        vstore(out, r, c, a0)
        if pair:
            vstore(out, r, c + lanes, a1)
    if full < n:  # the last c_g % 8 channels, accumulated in out
        for k in range(full, n):
            out[r, c0 + k] = zero
        for j in range(j_lo, j_lo + n_p):
            if table[OK, j] == 0:
                continue
            i0, i1, i2, i3 = corner_rows(table, j, pix, width)
            w0, w1, w2, w3 = table[W00, j], table[W01, j], table[W10, j], table[W11, j]
            for k in range(full, n):
                c = c0 + k
                out[r, c] += w0 * x[i0, c] + w1 * x[i1, c] + w2 * x[i2, c] + w3 * x[i3, c]


@numba.njit(inline="always")
def _gather_fast(xf, of, ro, xo, n, table, corners, j_lo, n_p):  # pragma: no cover
    """:func:`_gather` for ``n`` channels, a multiple of 8, without a branch per point.

    ``of[0, ro : ro + n] = Σ_j Σ_q w_q(j) · xf[0, xo + corner_q(j) : … + n]``, with the
    corners' element offsets precomputed. Every point is loaded (a point outside the map
    has in-bounds corners) and a select drops the outside ones' terms: whether a point is
    inside is random, and a mispredicted branch would empty the queue of loads in flight.
    The sums are :func:`_gather`'s.
    """
    lanes = np.int64(LANES)
    vzero = vsplat(of.dtype.type(0))
    k = np.int64(0)
    while k + 2 * lanes <= n:
        a0 = vzero
        a1 = vzero
        for j_ in range(j_lo, j_lo + n_p):
            j = np.uint64(j_)
            if k == 0:
                w = j + np.uint64(n_p)
                for q in range(4):
                    _prefetch(xf, 0, xo + n + corners[q, w])
            c = xo + k
            i0, i1 = c + corners[0, j], c + corners[1, j]
            i2, i3 = c + corners[2, j], c + corners[3, j]
            p0, p1 = vload(xf, 0, i0), vload(xf, 0, i1)
            p2, p3 = vload(xf, 0, i2), vload(xf, 0, i3)
            q0, q1 = vload(xf, 0, i0 + lanes), vload(xf, 0, i1 + lanes)
            q2, q3 = vload(xf, 0, i2 + lanes), vload(xf, 0, i3 + lanes)
            u0, u1 = vsplat(table[W00, j]), vsplat(table[W01, j])
            u2, u3 = vsplat(table[W10, j]), vsplat(table[W11, j])
            ok = vsplat(table[OK, j])
            s0 = vmuladd(vmul(u0, p0), u1, p1)
            a0 = vadd(a0, vselect(ok, vmuladd(vmuladd(s0, u2, p2), u3, p3), vzero))
            s1 = vmuladd(vmul(u0, q0), u1, q1)
            a1 = vadd(a1, vselect(ok, vmuladd(vmuladd(s1, u2, q2), u3, q3), vzero))
        vstore(of, 0, ro + k, a0)
        vstore(of, 0, ro + k + lanes, a1)
        k += 2 * lanes
    if k < n:  # eight channels left
        a0 = vzero
        for j_ in range(j_lo, j_lo + n_p):
            j = np.uint64(j_)
            c = xo + k
            u0, u1 = vsplat(table[W00, j]), vsplat(table[W01, j])
            u2, u3 = vsplat(table[W10, j]), vsplat(table[W11, j])
            s0 = vmuladd(
                vmul(u0, vload(xf, 0, c + corners[0, j])), u1, vload(xf, 0, c + corners[1, j])
            )
            s0 = vmuladd(s0, u2, vload(xf, 0, c + corners[2, j]))
            s0 = vmuladd(s0, u3, vload(xf, 0, c + corners[3, j]))
            a0 = vadd(a0, vselect(vsplat(table[OK, j]), s0, vzero))
        vstore(of, 0, ro + k, a0)


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
    chans = x.shape[1]
    xf = x.reshape(1, x.size)
    of = out.reshape(1, out.size)
    fast = c_g % LANES == 0
    for t in numba.prange((rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        table = np.empty((FIELDS, full + LANES), kx.dtype)
        corners = np.zeros((4, full + LANES + n_gp), np.int64)
        tail_off = np.zeros((1, 2 * LANES), kx.dtype)  # the last n_gp % 8 points, padded
        tail_mask = np.zeros((1, LANES), kx.dtype)
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
                _points(table, corners, j, by, bx, vload(ky, 0, j), vload(kx, 0, j), oy, ox,
                        vload(mask, r, j), vscale, fh, fw, one, width, chans)  # fmt: skip
            if full < n_gp:  # the row's last points: lanes past them are ignored
                if (r + 1) * n_gp + LANES - (n_gp - full) <= rows * n_gp:
                    ox, oy = vload2(off, r, 2 * full)  # reads on into the next row
                    m = vload(mask, r, full)
                else:  # the last row: through a padded copy
                    for j in range(full, n_gp):
                        tail_off[0, 2 * (j - full)] = off[r, 2 * j]
                        tail_off[0, 2 * (j - full) + 1] = off[r, 2 * j + 1]
                        tail_mask[0, j - full] = mask[r, j]
                    ox, oy = vload2(tail_off, 0, 0)
                    m = vload(tail_mask, 0, 0)
                _points(table, corners, full, by, bx, vload(ky, 0, full), vload(kx, 0, full),
                        oy, ox, m, vscale, fh, fw, one, width, chans)  # fmt: skip
            if fast:
                for g in range(group):
                    _gather_fast(xf, of, r * chans + g * c_g, pix * chans + g * c_g, c_g,
                                 table, corners, g * n_p, n_p)  # fmt: skip
                continue
            for g in range(group):
                _gather(x, out, np.uint64(r), np.uint64(g * c_g), c_g, table, g * n_p, n_p,
                        pix, width)  # fmt: skip


@numba.njit(inline="always")
def _scatter_fast(
    xf, gof, gxf, ro, xo, n, table, corners, lane_sums, cols, v_lo, n_p, c_g
):  # pragma: no cover
    """The backward's pass over points ``v_lo : v_lo + n_p`` (one group), for ``n`` channels.

    ``n`` is a multiple of 8. Sixteen channels at a time (then eight), for every point
    in turn: the lanes of ``d_q = Σ_c grad_out[c] · x[corner_q, c]`` accumulated into
    ``lane_sums`` and ``w_q·grad_out`` added to ``gxf`` at the four corners, each
    corner's read-modify-write before the next (corners may share a row). As in
    :func:`_gather_fast`, no branch per point: a point outside the map sees a zero
    ``grad_out`` (a select), so it adds exact zeros, and its lane sums are dropped later.
    The sums are those of the generic loop in :func:`_backward`.
    """
    lanes = np.int64(LANES)
    vzero = vsplat(gof.dtype.type(0))
    k = np.int64(0)
    while k < n:
        pair = k + 2 * lanes <= n
        go0 = vload(gof, 0, ro + k)
        go1 = vload(gof, 0, ro + k + lanes) if pair else vzero
        c = xo + k
        for v_ in range(v_lo, v_lo + n_p):
            v = np.uint64(v_)
            if k == 0:
                w = v + np.uint64(n_p)
                for q in range(4):
                    _prefetch(xf, 0, xo + c_g + corners[q, w])
            ok = vsplat(table[OK, v])
            g0 = vselect(ok, go0, vzero)
            i0, i1 = c + corners[0, v], c + corners[1, v]
            i2, i3 = c + corners[2, v], c + corners[3, v]
            p0, p1 = vload(xf, 0, i0), vload(xf, 0, i1)
            p2, p3 = vload(xf, 0, i2), vload(xf, 0, i3)
            if k == 0:
                s0 = s1 = s2 = s3 = vzero
            else:
                s0, s1 = vload(lane_sums, v, 0), vload(lane_sums, cols + v, 0)
                s2, s3 = vload(lane_sums, 2 * cols + v, 0), vload(lane_sums, 3 * cols + v, 0)
            s0, s1 = vmuladd(s0, g0, p0), vmuladd(s1, g0, p1)
            s2, s3 = vmuladd(s2, g0, p2), vmuladd(s3, g0, p3)
            u0, u1 = vsplat(table[W00, v]), vsplat(table[W01, v])
            u2, u3 = vsplat(table[W10, v]), vsplat(table[W11, v])
            if pair:
                g1 = vselect(ok, go1, vzero)
                d = lanes
                s0 = vmuladd(s0, g1, vload(xf, 0, i0 + d))
                s1 = vmuladd(s1, g1, vload(xf, 0, i1 + d))
                s2 = vmuladd(s2, g1, vload(xf, 0, i2 + d))
                s3 = vmuladd(s3, g1, vload(xf, 0, i3 + d))
            vstore(gxf, 0, i0, vmuladd(vload(gxf, 0, i0), u0, g0))
            vstore(gxf, 0, i1, vmuladd(vload(gxf, 0, i1), u1, g0))
            vstore(gxf, 0, i2, vmuladd(vload(gxf, 0, i2), u2, g0))
            vstore(gxf, 0, i3, vmuladd(vload(gxf, 0, i3), u3, g0))
            if pair:
                d = lanes
                vstore(gxf, 0, i0 + d, vmuladd(vload(gxf, 0, i0 + d), u0, g1))
                vstore(gxf, 0, i1 + d, vmuladd(vload(gxf, 0, i1 + d), u1, g1))
                vstore(gxf, 0, i2 + d, vmuladd(vload(gxf, 0, i2 + d), u2, g1))
                vstore(gxf, 0, i3 + d, vmuladd(vload(gxf, 0, i3 + d), u3, g1))
            vstore(lane_sums, v, 0, s0)
            vstore(lane_sums, cols + v, 0, s1)
            vstore(lane_sums, 2 * cols + v, 0, s2)
            vstore(lane_sums, 3 * cols + v, 0, s3)
        k += 2 * lanes if pair else lanes


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
    per_range,
):  # pragma: no cover
    # off: (N·L, G·P·2), mask: (N·L, G·P); gout: (N·L, C); gx: (N·H·W, C), written
    # whole; g_off: (B, N·L, G·P·2) and g_mask: (B, N·L, G·P) partials, one per channel
    # block of ``block`` channels. Task (image, range of ``per_range`` groups, block)
    # owns gx[image's pixels, its channels] and g_off[block, image's rows, its groups'
    # columns]. kx, ky, geo: as the forward's.
    c_g = x.shape[1] // group
    n_gp = mask.shape[1]
    n_p = n_gp // group
    length = h_out * w_out
    n_rows = gout.shape[0]
    n_img = n_rows // length if length > 0 else 0
    n_blocks = g_off.shape[0]
    n_ranges = (group + per_range - 1) // per_range
    one = x.dtype.type(1)
    zero = one - one
    fh = x.dtype.type(height)  # exact: maps have fewer than 2**24 rows and columns
    fw = x.dtype.type(width)
    vzero = vsplat(zero)
    vscale = vsplat(scale)
    lanes = np.uint64(LANES)
    s_h, s_w, b_h, b_w = geo[0], geo[1], geo[2], geo[3]
    chans = x.shape[1]
    xf = x.reshape(1, x.size)
    gof = gout.reshape(1, gout.size)
    gxf = gx.reshape(1, gx.size)
    for t in numba.prange(n_img * n_ranges * n_blocks):
        b = t // (n_ranges * n_blocks)
        g_lo = (t // n_blocks) % n_ranges * per_range
        g_hi = min(group, g_lo + per_range)
        blk = t % n_blocks
        cnt = np.uint64(min(block, c_g - blk * block))
        full = cnt // lanes * lanes
        pix = b * height * width
        j_lo = g_lo * n_p  # the task's points in a row: j_lo + (0 .. n_pts - 1)
        n_pts = (g_hi - g_lo) * n_p
        cols = (n_pts + LANES - 1) // LANES * LANES
        table = np.empty((FIELDS, cols), kx.dtype)
        corners = np.zeros((4, cols + n_pts), np.int64)
        lane_sums = np.empty((4 * cols, LANES), kx.dtype)  # per (corner, point)
        dots = np.empty((4, cols), kx.dtype)  # d_q per point
        grads = np.empty((3, LANES), kx.dtype)
        tail_off = np.zeros((1, 2 * LANES), kx.dtype)  # a row's last points, padded
        tail_mask = np.zeros((1, LANES), kx.dtype)
        g_off_b = g_off[blk]
        g_mask_b = g_mask[blk]
        for i in range(pix, pix + height * width):  # this task's part of gx, zeroed
            iu = np.uint64(i)
            for g in range(g_lo, g_hi):
                cu = np.uint64(g * c_g + blk * block)
                for k in range(np.uint64(0), full, lanes):
                    vstore(gx, iu, cu + k, vzero)
                for k in range(full, cnt):
                    gx[iu, cu + k] = zero
        for l_ in range(length):
            r = b * length + l_
            ru = np.uint64(r)
            ho = l_ // w_out
            wo = l_ - ho * w_out
            by = vsplat(x.dtype.type(ho * s_h + b_h))
            bx = vsplat(x.dtype.type(wo * s_w + b_w))
            for v in range(0, n_pts, LANES):
                j = j_lo + v
                if r * n_gp + j + LANES <= n_rows * n_gp:  # may read on into the next row
                    ox, oy = vload2(off, r, 2 * j)
                    m = vload(mask, r, j)
                else:  # the last row's last points: through a padded copy
                    for e in range(n_gp - j):
                        tail_off[0, 2 * e] = off[r, 2 * (j + e)]
                        tail_off[0, 2 * e + 1] = off[r, 2 * (j + e) + 1]
                        tail_mask[0, e] = mask[r, j + e]
                    ox, oy = vload2(tail_off, 0, 0)
                    m = vload(tail_mask, 0, 0)
                _points(table, corners, v, by, bx, vload(ky, 0, j), vload(kx, 0, j), oy, ox,
                        m, vscale, fh, fw, one, width, chans)  # fmt: skip
            fast = full == cnt
            for gi in range(g_lo, g_hi if fast else g_lo):
                cg = gi * c_g + blk * block
                _scatter_fast(xf, gof, gxf, r * chans + cg, pix * chans + cg, np.int64(cnt),
                              table, corners, lane_sums, cols, (gi - g_lo) * n_p, n_p,
                              c_g)  # fmt: skip
            for v in range(0 if fast else n_pts):  # the generic pass
                if table[OK, v] == 0:
                    for q in range(4):
                        vstore(lane_sums, q * cols + v, 0, vzero)
                        dots[q, v] = zero
                    continue
                cu = np.uint64((g_lo + v // n_p) * c_g + blk * block)
                a00, a01, a10, a11 = corner_rows(table, v, pix, width)
                w00 = table[W00, v]
                w01 = table[W01, v]
                w10 = table[W10, v]
                w11 = table[W11, v]
                # One pass over the block's channels, eight at a time: the four dot
                # products d_q = Σ grad_out·x[corner_q] in lane-wise partial sums, and
                # the scatter into gx. Each corner's read-modify-write completes before
                # the next: corners may share a row.
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
                if full == cnt:  # lane sums later, eight points at a time
                    vstore(lane_sums, v, 0, s00)
                    vstore(lane_sums, cols + v, 0, s01)
                    vstore(lane_sums, 2 * cols + v, 0, s10)
                    vstore(lane_sums, 3 * cols + v, 0, s11)
                    continue
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
                dots[0, v] = d00
                dots[1, v] = d01
                dots[2, v] = d10
                dots[3, v] = d11
            for v in range(0, n_pts, LANES):
                if full == cnt:
                    for q in range(4):
                        for e in range(n_pts, v + LANES):  # lanes past the points: zeros
                            vstore(lane_sums, q * cols + e, 0, vzero)
                        vstore(dots, q, v, vsum8(lane_sums, q * cols + v))
                _point_grads(dots, table, v, vscale, vzero, one, grads)
                j = j_lo + v
                if v + LANES <= n_pts:
                    vstore(g_mask_b, ru, j, vload(grads, 0, 0))
                    vstore2(g_off_b, ru, 2 * j, vload(grads, 1, 0), vload(grads, 2, 0))
                else:  # the task's last points, lane by lane
                    for e in range(n_pts - v):
                        g_mask_b[ru, j + e] = grads[0, e]
                        g_off_b[ru, 2 * (j + e)] = grads[1, e]
                        g_off_b[ru, 2 * (j + e) + 1] = grads[2, e]


@numba.njit(inline="always")
def _point_grads(dots, table, v, scale, vzero, one, grads):  # pragma: no cover
    """Mask and offset gradients of points ``v : v + 8`` into ``grads`` (3, 8).

    From the corners' dot products ``dots`` (4, ·); 0 for points outside the map.
    """
    vone = vsplat(one)
    d00 = vmul(vload(dots, 0, v), vload(table, V00, v))
    d01 = vmul(vload(dots, 1, v), vload(table, V01, v))
    d10 = vmul(vload(dots, 2, v), vload(table, V10, v))
    d11 = vmul(vload(dots, 3, v), vload(table, V11, v))
    ly = vload(table, LY, v)
    lx = vload(table, LX, v)
    hy = vsub(vone, ly)
    hx = vsub(vone, lx)
    gm = vmuladd(vmul(vmul(hy, hx), d00), vmul(hy, lx), d01)
    gm = vmuladd(vmuladd(gm, vmul(ly, hx), d10), vmul(ly, lx), d11)
    ms = vmul(vload(table, M, v), scale)
    gy = vmul(vmuladd(vmul(hy, vsub(d01, d00)), ly, vsub(d11, d10)), ms)
    gx = vmul(vmuladd(vmul(hx, vsub(d10, d00)), lx, vsub(d11, d01)), ms)
    ok = vload(table, OK, v)
    vstore(grads, 0, 0, vselect(ok, gm, vzero))
    vstore(grads, 1, 0, vselect(ok, gy, vzero))
    vstore(grads, 2, 0, vselect(ok, gx, vzero))


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


def _task_split(n: int, group: int, c_g: int) -> tuple[int, int]:
    """Groups and channels per backward task: whole images, split while there are few tasks.

    A task walks whole rows of x and gx (all groups) where it can: a group's channels
    alone are a short piece of each row, and their rows, a power of two apart in
    memory, would compete for a few cache sets. Groups are split first, then channels.
    """
    per_range = group
    while n * -(-group // per_range) < _MIN_TASKS and per_range > 1:
        per_range = -(-per_range // 2)
    block = c_g
    while n * -(-group // per_range) * -(-c_g // block) < _MIN_TASKS and block >= 2 * _MIN_BLOCK:
        block = -(-block // 2)
    return per_range, max(1, block)


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
    if p.rows > 0 and p.x.shape[0] == 0:  # an empty input map (padding alone): samples read 0
        out.zero_()
    elif p.rows > 0:
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
    per_range, block = _task_split(p.n, group, c_g)
    n_blocks = -(-c_g // block)
    gout = grad_output.detach().to(p.dtype).contiguous().reshape(p.rows, p.channels)
    # an empty input map (padding alone gives the output): no sample reads a pixel
    launch = p.rows > 0 and p.x.shape[0] > 0
    gx = torch.empty_like(p.x) if launch else torch.zeros_like(p.x)  # the kernel zeroes it
    g_off = p.x.new_empty(n_blocks, *p.off.shape)
    g_mask = p.x.new_empty(n_blocks, *p.mask.shape)
    if launch:
        _numba_threads.launch(
            _backward, *p.common(), gout.numpy(), gx.numpy(), g_off.numpy(), g_mask.numpy(),
            *p.sizes(), *p.points_per_row(), p.scale, block, per_range,
        )  # fmt: skip
    else:
        g_off.zero_()
        g_mask.zero_()
    grad_off, grad_m = g_off[0], g_mask[0]
    for i in range(1, n_blocks):  # a fixed order: reproducible
        grad_off = grad_off + g_off[i]
        grad_m = grad_m + g_mask[i]
    return (
        gx.reshape(input.shape).to(input.dtype),
        grad_off.reshape(offset.shape).to(offset.dtype),
        grad_m.reshape(mask.shape).to(mask.dtype),
    )
