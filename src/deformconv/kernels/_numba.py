"""Fast CPU deformable convolution: Numba kernels around BLAS GEMMs.

Forward, per chunk of output pixels (rows):

1. ``_im2col`` (parallel over rows): for every output pixel and kernel point the four
   bilinear corners are found once per offset group (for eight pixels at once in
   vectors where eight follow each other in one image), then blended (times the mask) over
   the group's channels, read from a channels-last copy of the input (contiguous, so the
   channel loop vectorises) and written to a column buffer of shape
   (rows, groups, K_h·K_w, C_in/groups): one row per output pixel, each weight group's
   columns contiguous.
2. the GEMM ``columns · Wᵀ`` into (rows, C_out), copied to NCHW: for float32 one
   oneDNN product (a matrix product for one weight group, a 1x1 convolution over all
   groups for several) with the bias fused (:mod:`deformconv.kernels._onednn`; twice
   MKL's speed on a Zen 5 EPYC), else one BLAS
   GEMM per weight group. A BLAS chunk inside one image with no more pixels than output
   channels (small-batch inference of deep layers) computes ``W · columnsᵀ`` instead,
   which is the image's (C_out, pixels) block of the NCHW output: BLAS writes it in place
   (row stride H_out·W_out), bias included, and this orientation is the faster GEMM there.

Backward, per chunk: ``_im2col`` again (columns are recomputed, not stored),
``grad_W += columnsᵀ · grad_rows`` and ``grad_columns = grad_rows · W`` (GEMMs, each in
oneDNN where its size pays for it, see :mod:`deformconv.kernels._onednn`), then
``_col2im`` scatters ``grad_columns`` into a channels-last ``grad_input`` and, in the same
pass, computes the offset and mask gradients from the four dot products
``sum_c grad_column[c] · x[corner, c]``. ``_col2im`` runs in parallel over tasks (image,
offset group, block of at most ``CHANNEL_BLOCK`` channels): a task owns a disjoint slice of
``grad_input`` and its own partial offset/mask gradient, and the partials are summed
afterwards in a fixed order. A chunk with fewer than ``MIN_COL2IM_TASKS`` tasks (a slice
of one image with few channels) also splits the tasks' rows into parts, each scattering
into its own copy of ``grad_input``, summed in order at the end. No two threads write
the same memory and the task split does not depend on the thread count, so the results
are bitwise reproducible.

Each kernel is a serial ``cache=True`` body over a range of rows or tasks and a
``parallel=True`` wrapper that only splits the range into one part per thread (``_im2col``,
``_col2im``): Numba's parfor passes then analyse a loop of one call instead of the whole
body. Large calls' bodies (``_im2col_rows8``, ``_col2im_tasks8``) find eight pixels'
bilinear taps at once in vectors; small calls' (``_im2col_rows``, ``_col2im_tasks``) one
pixel's at a time, bitwise the same. A call with fewer than :data:`PARALLEL_MIN_COLUMNS`
column elements runs the small body directly on the calling thread: no launch cost, and a
first small call compiles only the small bodies.
``_corners`` is called, not inlined at Numba's level (``_corners_fn``): Numba types and
lowers it once, and LLVM inlines the call. Results do not depend on the split: every row
and every task is computed by the same code, independently of the others.

Vectorisation with ``fastmath=False`` (so NaN tests and IEEE semantics hold): inner-loop
indices are unsigned, which removes Numba's negative-index wraparound (it blocked LLVM's
vectoriser), and reductions use interleaved partial sums combined in a fixed tree.

Memory: the column workspace (and, in backward, the grad-column workspace) is processed
in chunks of rows whose size stays under :data:`WORKSPACE_BYTES`; whole images per chunk
when they fit, otherwise slices of one image. The workspace block is kept per Python
thread and reused by the next call (no page faults on fresh memory every call).

Safety: a sample position is tested with comparisons that are False for NaN
(``y >= -1 and y < H and ...``) before it is floored and converted to an integer, so NaN,
infinite and huge offsets never form an index: they read 0 and get zero gradients, as in
``kernels/reference.py``. Corner indices are clamped into the map (a corner outside gets
weight 0), so every read and write is in bounds. All indices are Numba's 64-bit integers:
the largest flat offset formed is ``row · (K_h·K_w·C_in)`` or ``((n·H + y)·W + x)·C_in``,
below the tensor's element count, which fits in int64 for any tensor that fits in memory
(tensors above 2**31 elements index correctly).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from deformconv.kernels import _numba_threads, _onednn
from deformconv.kernels._chunks import plan_chunks
from deformconv.kernels._layout import (
    _channels_last_into,
    _rows_as_maps,
    _rows_into_maps,
    _scratch,
    _transpose_each,
    channels_last_rows,
    is_channels_last,
)
from deformconv.kernels._simd import (
    LANES,
    WIDE,
    vadd,
    vload,
    vloadas,
    vmul,
    vmuladd,
    vsplat,
    vsplatas,
    vsplatw,
    vstore,
    vsum4,
)  # fmt: skip
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
)

_numba_threads.configure()  # before the first parallel kernel runs

__all__ = [
    "CHANNELS_LAST", "CHANNEL_BLOCK", "MIN_COL2IM_TASKS", "WORKSPACE_BYTES", "backward",
    "forward",
]  # fmt: skip

#: The kernels read a channels-last ``input``, ``weight`` and ``grad_output`` as they are,
#: with no copy into NCHW first (a channels-last weight is in the columns' order); the
#: output, ``grad_input`` and ``grad_weight`` come back in their arguments' memory format
#: (see ``ops/_library.py``).
CHANNELS_LAST = True

#: Cap, in bytes, on the column workspace of one chunk (forward: the columns; backward: the
#: columns plus the grad columns). Peak extra memory is about this cap plus the output (or
#: the gradients) and channels-last copies of the input and of ``grad_output``.
WORKSPACE_BYTES = 256 * 2**20

#: Channels per ``_col2im`` task (per offset group). A fixed number, independent of the
#: thread count, so that the order of every floating-point sum is fixed.
CHANNEL_BLOCK = 64

#: Fewest ``_col2im`` tasks per backward chunk: a chunk with fewer (a slice of one image
#: whose channels fit one block, as in a 64-channel detection layer) splits each task's
#: rows into parts, each scattering into its own copy of ``grad_input``; the copies are
#: summed in order at the end. A fixed number, independent of the thread count.
MIN_COL2IM_TASKS = 2

#: Calls with fewer column elements (rows · row width) than this run the serial kernel
#: body on the calling thread: below it a parallel launch costs more than it saves, and
#: small problems never compile the parallel wrappers.
PARALLEL_MIN_COLUMNS = 2**16

# The kernels (typed as Any: Numba's stubs do not describe dispatcher calls): serial
# bodies over a range of work items, and ``parallel=True`` wrappers that only split that
# range across threads (see the module docstring).
_options: dict[str, Any] = {"nogil": True, "fastmath": False, "error_model": "numpy"}
_jit: Callable[[Any], Any] = numba.njit(parallel=True, cache=True, **_options)
_serial_jit: Callable[[Any], Any] = numba.njit(cache=True, **_options)


@numba.njit(inline="always")
def _corners(y, x, height, width, one):  # pragma: no cover
    """Bilinear corners of a position with -1 <= y < H and -1 <= x < W (checked by caller).

    Returns the clamped (always in-range) corner rows and columns, the fractional parts
    ``ly, lx`` and the 0/1 validity of the four corners, all in the dtype of ``one``.
    """
    y0 = np.floor(y)
    x0 = np.floor(x)
    ly = y - y0
    lx = x - x0
    iy0 = np.int64(y0)  # in [-1, H - 1]: y was range-checked, so the conversion is exact
    ix0 = np.int64(x0)
    zero = one - one
    vy0 = one if iy0 >= 0 else zero
    vy1 = one if iy0 + 1 < height else zero
    vx0 = one if ix0 >= 0 else zero
    vx1 = one if ix0 + 1 < width else zero
    ry0 = max(iy0, 0)
    ry1 = min(iy0 + 1, height - 1)
    rx0 = max(ix0, 0)
    rx1 = min(ix0 + 1, width - 1)
    return ry0, ry1, rx0, rx1, ly, lx, vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1


# ``_corners`` as a called function for this module's kernels: Numba types and lowers it
# once, where ``inline="always"`` copies and retypes it at every call site (LLVM inlines
# the call). Same code, so the same results.
_corners_fn = numba.njit(**_options)(_corners.py_func)


@numba.njit(inline="always")
def _flat_offsets(off, mask):  # pragma: no cover
    """``off`` (N, G, K, 2, L) as (N·G·K·2, L) rows and ``mask`` (N, G, K, L) as (N·G·K, L).

    Views for :func:`_taps8`: image b, offset group g, kernel point k has its Δy and Δx in
    rows 2·rm and 2·rm + 1 and its mask in row rm, rm = (b·G + g)·K + k.
    """
    n, n_off, n_k, _, length = off.shape
    flat_mask = mask.reshape(mask.shape[0] * mask.shape[1] * mask.shape[2], mask.shape[3])
    return off.reshape(n * n_off * n_k * 2, length), flat_mask


@numba.njit(inline="always")
def _taps8(base_y, base_x, off2, mask2, has_mask, k, rm, p_l, fh, fw, one, tab):  # pragma: no cover
    """The taps of the eight output pixels p_l .. p_l + 8 at kernel point k, into ``tab``.

    ``off2``, ``mask2``: :func:`_flat_offsets`; ``rm``: the pixels' row there. The table as
    :func:`~deformconv.kernels._taps.vtaps` fills it: bitwise the scalar path's values
    (:func:`_corners`); a point outside the map gets weights 0 at the corner (0, 0), as the
    scalar path's 0 at the image's first pixel.
    """
    yy = vadd(vload(base_y, k, p_l), vload(off2, 2 * rm, p_l))
    xx = vadd(vload(base_x, k, p_l), vload(off2, 2 * rm + 1, p_l))
    m = vload(mask2, rm, p_l) if has_mask else vsplat(one)
    vtaps(tab, 0, yy, xx, m, fh, fw, one)


@numba.njit(inline="always")
def _blend(
    x, cols, r, kc, i00, i01, i10, i11, w00, w01, w10, w11, lo, hi, runs
):  # pragma: no cover
    """``cols[r, run's columns] = Σ_q w_q · x[i_q, run's channels]`` for runs lo .. hi."""
    for q in range(lo, hi):  # runs inside one weight group (see _runs_table)
        cu = runs[0, q]
        cnt = runs[1, q]
        col = runs[2, q] + kc
        for j in range(cnt):
            cols[r, col + j] = (
                w00 * x[i00, cu + j] + w01 * x[i01, cu + j]
                + w10 * x[i10, cu + j] + w11 * x[i11, cu + j]
            )  # fmt: skip


@_serial_jit
def _im2col_rows(
    x,
    height,
    width,
    off,
    mask,
    has_mask,
    base_y,
    base_x,
    cols,
    row0,
    c_pg,
    first,
    runs,
    r_lo,
    r_hi,
):  # pragma: no cover
    # x: (N·H·W, C_in), the channels-last input with pixels flattened. off: (N, G, K, 2, L).
    # mask: (N, G, K, L) or a dummy. base_y, base_x: (K, L) sampling grid without offsets.
    # cols: (R, groups·K·C_pg) for the global rows row0 .. row0 + R (row = n·L + l); channel
    # c of kernel point k goes to column (c // C_pg)·K·C_pg + k·C_pg + c % C_pg. Fills the
    # local rows r_lo .. r_hi, one pixel at a time (small calls, and what _im2col_rows8
    # leaves: kept apart so that a first small call compiles no vector path). Offset
    # group g's channel runs: first[g] .. first[g + 1] of runs (_runs_table).
    # Inner-loop indices are unsigned (all are >= 0): Numba then skips its negative-index
    # wraparound and LLVM vectorises the channel loop.
    n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
    one = x.dtype.type(1)
    for r in range(r_lo, r_hi):
        b = (row0 + r) // length
        p_l = (row0 + r) - b * length
        pix = b * height * width
        for k in range(n_k):
            kc = np.uint64(k * c_pg)
            for g in range(n_off):
                y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                w00 = w01 = w10 = w11 = one - one
                i00 = i01 = i10 = i11 = np.uint64(pix)
                if y >= -1 and y < height and xx >= -1 and xx < width:  # False for NaN
                    m = mask[b, g, k, p_l] if has_mask else one
                    ry0, ry1, rx0, rx1, ly, lx, v00, v01, v10, v11 = _corners_fn(
                        y, xx, height, width, one
                    )
                    hy = one - ly
                    hx = one - lx
                    w00 = hy * hx * v00 * m
                    w01 = hy * lx * v01 * m
                    w10 = ly * hx * v10 * m
                    w11 = ly * lx * v11 * m
                    i00 = np.uint64(pix + ry0 * width + rx0)
                    i01 = np.uint64(pix + ry0 * width + rx1)
                    i10 = np.uint64(pix + ry1 * width + rx0)
                    i11 = np.uint64(pix + ry1 * width + rx1)
                # Outside the map every weight is 0 (the row reads 0; the indices are valid).
                _blend(
                    x, cols, r, kc, i00, i01, i10, i11, w00, w01, w10, w11,
                    first[g], first[g + 1], runs,
                )  # fmt: skip


@numba.njit(inline="always")
def _blend8(x, cols, r, tab, pix, width, cu, cnt, col, like):  # pragma: no cover
    """One channel run (channels cu .. cu + cnt, columns col ..) of the rows r .. r + 8.

    :func:`_blend`'s sums from the eight rows' taps in ``tab``: whole vectors as wide as
    ``like`` (the same products and adds in the same order, so bitwise the same), then
    one channel at a time. Kept apart from the run loop so that nothing the stores could
    alias (the runs table, the taps) is read in the channel loop.
    """
    full = cnt - cnt % WIDE
    for i in range(LANES):
        i00, i01, i10, i11 = corner_rows(tab, i, pix, width)
        w00, w01, w10, w11 = tab[W00, i], tab[W01, i], tab[W10, i], tab[W11, i]
        s00, s01 = vsplatas(w00, like), vsplatas(w01, like)
        s10, s11 = vsplatas(w10, like), vsplatas(w11, like)
        row = r + i
        for j in range(0, full, WIDE):
            c = cu + j
            v = vadd(
                vadd(
                    vadd(vmul(s00, vloadas(x, i00, c, like)), vmul(s01, vloadas(x, i01, c, like))),
                    vmul(s10, vloadas(x, i10, c, like)),
                ),
                vmul(s11, vloadas(x, i11, c, like)),
            )
            vstore(cols, row, col + j, v)
        for j in range(full, cnt):
            c = cu + j
            cols[row, col + j] = (
                w00 * x[i00, c] + w01 * x[i01, c] + w10 * x[i10, c] + w11 * x[i11, c]
            )


@_serial_jit
def _im2col_rows8(
    x,
    height,
    width,
    off,
    mask,
    has_mask,
    base_y,
    base_x,
    cols,
    row0,
    c_pg,
    first,
    runs,
    r_lo,
    r_hi,
):  # pragma: no cover
    # _im2col_rows for large calls: eight pixels of one image at a time where they follow
    # each other in the rows (their taps found in vectors, _taps8, and their channels
    # blended in wide vectors, _blend8: bitwise the one-pixel path's columns), the other
    # rows by _im2col_rows.
    n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
    one = x.dtype.type(1)
    like = vsplatw(one)
    off2, mask2 = _flat_offsets(off, mask)
    tab = np.empty((FIELDS, LANES), dtype=x.dtype)
    fh = x.dtype.type(height)
    fw = x.dtype.type(width)
    r = r_lo
    while r < r_hi:
        b = (row0 + r) // length
        p_l = (row0 + r) - b * length
        if r + LANES > r_hi or p_l + LANES > length:  # the image's or the range's last rows
            end = min(r_hi, r + length - p_l)
            _im2col_rows(
                x, height, width, off, mask, has_mask, base_y, base_x, cols, row0, c_pg,
                first, runs, r, end,
            )  # fmt: skip
            r = end
            continue
        pix = b * height * width
        for k in range(n_k):
            kc = k * c_pg
            for g in range(n_off):
                rm = (b * n_off + g) * n_k + k
                _taps8(base_y, base_x, off2, mask2, has_mask, k, rm, p_l, fh, fw, one, tab)
                for q in range(first[g], first[g + 1]):  # runs inside one weight group
                    _blend8(
                        x, cols, r, tab, pix, width, np.int64(runs[0, q]),
                        np.int64(runs[1, q]), np.int64(runs[2, q]) + kc, like,
                    )  # fmt: skip
        r += LANES


@_jit
def _im2col(
    x, height, width, off, mask, has_mask, base_y, base_x, cols, row0, c_pg, first, runs, parts
):  # pragma: no cover
    # parts: the thread count (an argument: a call to numba.get_num_threads() in the
    # kernel would keep Numba from caching it).
    n = cols.shape[0]
    for part in numba.prange(parts):
        p = np.int64(part)  # prange's index is unsigned in the parallel build
        _im2col_rows8(
            x, height, width, off, mask, has_mask, base_y, base_x, cols, row0, c_pg, first, runs,
            n * p // parts, n * (p + 1) // parts,
        )  # fmt: skip


@numba.njit(inline="always")
def _dot4(a, ra, ca, b, r0, r1, r2, r3, cb, cnt):  # pragma: no cover
    """Four dot products sum_j a[ra, ca + j] · b[r_q, cb + j] (j < cnt) in one pass.

    Four interleaved partial sums per product (so LLVM vectorises without fastmath),
    combined in a fixed tree: a fixed summation order, hence reproducible results.
    """
    zero = a.dtype.type(0)
    p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = zero
    s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
    four = np.uint64(4)
    full = cnt // four * four
    o1 = np.uint64(1)
    o2 = np.uint64(2)
    o3 = np.uint64(3)
    for j in range(np.uint64(0), full, four):
        g0 = a[ra, ca + j]
        g1 = a[ra, ca + j + o1]
        g2 = a[ra, ca + j + o2]
        g3 = a[ra, ca + j + o3]
        p0 += g0 * b[r0, cb + j]
        p1 += g1 * b[r0, cb + j + o1]
        p2 += g2 * b[r0, cb + j + o2]
        p3 += g3 * b[r0, cb + j + o3]
        q0 += g0 * b[r1, cb + j]
        q1 += g1 * b[r1, cb + j + o1]
        q2 += g2 * b[r1, cb + j + o2]
        q3 += g3 * b[r1, cb + j + o3]
        s0 += g0 * b[r2, cb + j]
        s1 += g1 * b[r2, cb + j + o1]
        s2 += g2 * b[r2, cb + j + o2]
        s3 += g3 * b[r2, cb + j + o3]
        t0 += g0 * b[r3, cb + j]
        t1 += g1 * b[r3, cb + j + o1]
        t2 += g2 * b[r3, cb + j + o2]
        t3 += g3 * b[r3, cb + j + o3]
    for j in range(full, cnt):
        g0 = a[ra, ca + j]
        p0 += g0 * b[r0, cb + j]
        q0 += g0 * b[r1, cb + j]
        s0 += g0 * b[r2, cb + j]
        t0 += g0 * b[r3, cb + j]
    return (
        (p0 + p2) + (p1 + p3),
        (q0 + q2) + (q1 + q3),
        (s0 + s2) + (s1 + s3),
        (t0 + t2) + (t1 + t3),
    )


@numba.njit(inline="always")
def _axpy(a, ra, ca, y, ry, cy, cnt, alpha):  # pragma: no cover
    """y[ry, cy + j] += alpha · a[ra, ca + j] for j < cnt."""
    for j in range(cnt):
        y[ry, cy + j] += alpha * a[ra, ca + j]


_LANES = np.uint64(LANES)


@numba.njit(inline="always")
def _fused_vectors(
    g, r, col, x, gx, i00, i01, i10, i11, cu, full, w00, w01, w10, w11, want_gx, want_dots
):  # pragma: no cover
    """Channels j < ``full`` (a multiple of 8) of one grad-column run, in 8-lane vectors.

    ``gx[i_q, cu + j] += w_q · g[r, col + j]`` for the four corners q (in the order
    00, 01, 10, 11, as the scalar loop: corners that share a clamped pixel add in the
    same order), and returns the four dot products ``sum_j g[r, col + j] · x[i_q, cu + j]``
    (lane j % 8 accumulates its channels, lanes summed in a fixed tree).
    """
    zero = g.dtype.type(0)
    a00 = a01 = a10 = a11 = vsplat(zero)
    s00, s01, s10, s11 = vsplat(w00), vsplat(w01), vsplat(w10), vsplat(w11)
    for j in range(np.uint64(0), full, _LANES):
        gv = vload(g, r, col + j)
        if want_dots:
            a00 = vmuladd(a00, gv, vload(x, i00, cu + j))
            a01 = vmuladd(a01, gv, vload(x, i01, cu + j))
            a10 = vmuladd(a10, gv, vload(x, i10, cu + j))
            a11 = vmuladd(a11, gv, vload(x, i11, cu + j))
        if want_gx:
            vstore(gx, i00, cu + j, vmuladd(vload(gx, i00, cu + j), s00, gv))
            vstore(gx, i01, cu + j, vmuladd(vload(gx, i01, cu + j), s01, gv))
            vstore(gx, i10, cu + j, vmuladd(vload(gx, i10, cu + j), s10, gv))
            vstore(gx, i11, cu + j, vmuladd(vload(gx, i11, cu + j), s11, gv))
    return vsum4(a00, a01, a10, a11)


def _make_col2im_tasks(rows8: bool) -> Any:
    """The serial col2im body; ``rows8``: take rows eight at a time (large calls).

    One source, two kernels cached apart (Numba keys a closure by its constants): the
    one-row kernel, where ``rows8`` False prunes the vector path, is what small calls
    compile, so a first small call compiles no vector code.
    """

    def _col2im_tasks(
        x,
        height,
        width,
        off,
        mask,
        has_mask,
        base_y,
        base_x,
        gcols,
        row0,
        c_pg,
        gx,
        g_off,
        g_mask,
        block,
        n_blocks,
        n_parts,
        first,
        runs,
        want_gx,
        want_off,
        t_lo,
        t_hi,
    ):  # pragma: no cover
        # Runs tasks t_lo .. t_hi of the chunk (a task: see below).
        # x: (N·H·W, C_in) channels-last input. gx: (n_parts, N·H·W, C_in) channels-last
        # grad_input partials (accumulated into; summed by the caller).
        # want_gx / want_off False: skip the input gradient / the offset and mask gradients
        # (gx / g_off and g_mask are then dummies, never written).
        # gcols: (R, groups·K·C_pg) grad columns of the global rows row0 .. row0 + R (layout of
        # _im2col). g_off: (B_c, N, G, K, 2, L) and g_mask: (B_c, N, G, K, L): one partial per
        # channel block of ``block`` channels (B_c = ceil(C_per / block)), written for every row
        # of the chunk.
        # Task (image, offset group, channel block, part) owns gx[part, image's pixels,
        # block's channels] and g_off[block, image, group, part's rows]: no two tasks write
        # the same element. Part q of n_parts takes the q-th of n_parts equal runs of the
        # image's rows in the chunk. Task t is (image b_first + t // (G·B_c·n_parts), group
        # (t // (B_c·n_parts)) % G, block (t // n_parts) % B_c, part t % n_parts).
        # A task takes its rows eight at a time where it can, their taps found in vectors for
        # every kernel point first (_taps8), then samples in the same (row, k) order as the
        # one-row path, so the sums are the same.
        n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
        rows = gcols.shape[0]
        b_first = row0 // length
        one = x.dtype.type(1)
        zero = one - one
        if rows8:
            off2, mask2 = _flat_offsets(off, mask)
            tabs = np.empty((n_k, FIELDS, LANES), dtype=x.dtype)  # eight rows' taps, all k
            fh = x.dtype.type(height)
            fw = x.dtype.type(width)
        for t in range(t_lo, t_hi):
            part = t % n_parts
            b = b_first + t // (n_off * n_blocks * n_parts)
            g = (t // (n_blocks * n_parts)) % n_off
            blk = (t // n_parts) % n_blocks
            i_lo = max(row0, b * length) - row0  # the image's rows in the chunk
            i_hi = min(row0 + rows, (b + 1) * length) - row0
            r_lo = i_lo + (i_hi - i_lo) * part // n_parts
            r_hi = i_lo + (i_hi - i_lo) * (part + 1) // n_parts
            gxp = gx[part]
            pix = b * height * width
            q_lo = first[g * n_blocks + blk]  # the task's channel runs (_runs_table)
            q_hi = first[g * n_blocks + blk + 1]
            r = r_lo
            while r < r_hi:
                p_l = (row0 + r) - b * length
                # (rows8 is a constant: False prunes every vector part at compile time)
                eight = False
                if rows8:
                    eight = r + LANES <= r_hi  # (a task's rows lie in one image)
                    if eight:
                        for k in range(n_k):
                            rm = (b * n_off + g) * n_k + k
                            _taps8(base_y, base_x, off2, mask2, has_mask, k, rm, p_l, fh, fw,
                                   one, tabs[k])  # fmt: skip
                for i in range(LANES if eight else 1):
                    for k in range(n_k):
                        inside = False
                        ly = lx = m = v00 = v01 = v10 = v11 = zero
                        i00 = i01 = i10 = i11 = np.uint64(pix)
                        if rows8:
                            if eight:
                                tab = tabs[k]
                                inside = tab[OK, i] != zero
                                ly, lx, m = tab[LY, i], tab[LX, i], tab[M, i]
                                v00, v01 = tab[V00, i], tab[V01, i]
                                v10, v11 = tab[V10, i], tab[V11, i]
                                i00, i01, i10, i11 = corner_rows(tab, i, pix, width)
                        if not eight:
                            y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                            xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                            inside = y >= -1 and y < height and xx >= -1 and xx < width  # ¬NaN
                            if inside:
                                m = mask[b, g, k, p_l] if has_mask else one
                                ry0, ry1, rx0, rx1, ly, lx, v00, v01, v10, v11 = _corners_fn(
                                    y, xx, height, width, one
                                )
                                i00 = np.uint64(pix + ry0 * width + rx0)
                                i01 = np.uint64(pix + ry0 * width + rx1)
                                i10 = np.uint64(pix + ry1 * width + rx0)
                                i11 = np.uint64(pix + ry1 * width + rx1)
                        rr = r + i
                        pl = p_l + i
                        if not inside:
                            if want_off:
                                g_off[blk, b, g, k, 0, pl] = zero
                                g_off[blk, b, g, k, 1, pl] = zero
                                g_mask[blk, b, g, k, pl] = zero
                            continue
                        hy = one - ly
                        hx = one - lx
                        w00 = hy * hx * v00 * m
                        w01 = hy * lx * v01 * m
                        w10 = ly * hx * v10 * m
                        w11 = ly * lx * v11 * m
                        # d_q = sum_c gc · x_q over this task's channels; then the offset and
                        # mask gradients follow from the four dot products.
                        d00 = d01 = d10 = d11 = zero
                        kc = np.uint64(k * c_pg)
                        for q in range(q_lo, q_hi):  # runs inside one weight group
                            cu = runs[0, q]
                            cnt = runs[1, q]
                            col = runs[2, q] + kc
                            # Whole vectors: one pass reads each grad column once for the four
                            # dot products and the four scatters.
                            full = cnt // _LANES * _LANES
                            if full > 0:
                                e00, e01, e10, e11 = _fused_vectors(
                                    gcols, rr, col, x, gxp, i00, i01, i10, i11, cu, full,
                                    w00, w01, w10, w11, want_gx, want_off,
                                )  # fmt: skip
                                d00 += e00
                                d01 += e01
                                d10 += e10
                                d11 += e11
                            col += full
                            cu += full
                            rest = cnt - full
                            if want_off:
                                e00, e01, e10, e11 = _dot4(
                                    gcols, rr, col, x, i00, i01, i10, i11, cu, rest
                                )
                                d00 += e00
                                d01 += e01
                                d10 += e10
                                d11 += e11
                            if want_gx:
                                _axpy(gcols, rr, col, gxp, i00, cu, rest, w00)
                                _axpy(gcols, rr, col, gxp, i01, cu, rest, w01)
                                _axpy(gcols, rr, col, gxp, i10, cu, rest, w10)
                                _axpy(gcols, rr, col, gxp, i11, cu, rest, w11)
                        if not want_off:
                            continue
                        d00 *= v00
                        d01 *= v01
                        d10 *= v10
                        d11 *= v11
                        acc_m = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
                        acc_y = hx * (d10 - d00) + lx * (d11 - d01)
                        acc_x = hy * (d01 - d00) + ly * (d11 - d10)
                        g_off[blk, b, g, k, 0, pl] = acc_y * m
                        g_off[blk, b, g, k, 1, pl] = acc_x * m
                        g_mask[blk, b, g, k, pl] = acc_m
                r += LANES if eight else 1

    return _serial_jit(_col2im_tasks)


_col2im_tasks = _make_col2im_tasks(False)
_col2im_tasks8 = _make_col2im_tasks(True)


@_jit
def _col2im(
    x,
    height,
    width,
    off,
    mask,
    has_mask,
    base_y,
    base_x,
    gcols,
    row0,
    c_pg,
    gx,
    g_off,
    g_mask,
    block,
    n_blocks,
    n_parts,
    first,
    runs,
    want_gx,
    want_off,
    n_tasks,
    parts,
):  # pragma: no cover
    for part in numba.prange(parts):
        p = np.int64(part)  # prange's index is unsigned in the parallel build
        _col2im_tasks8(
            x, height, width, off, mask, has_mask, base_y, base_x, gcols, row0, c_pg, gx,
            g_off, g_mask, block, n_blocks, n_parts, first, runs, want_gx, want_off,
            n_tasks * p // parts,
            n_tasks * (p + 1) // parts,
        )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _runs_table(
    c_in: int, n_off: int, c_pg: int, n_k: int, block: int, n_blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    """The runs of channels inside one weight group, of every (offset group, block).

    Block ``i = g·n_blocks + blk`` (channels ``g·C_per + blk·block`` onwards, at most
    ``block`` of offset group g's) has runs ``first[i] .. first[i + 1]``; run q is channels
    ``runs[0, q] .. + runs[1, q]``, whose columns start at ``runs[2, q] + k·C_pg`` for
    kernel point k. Found once here (cached, read only), not by a division per sample,
    and not by code the kernels would compile.
    """
    c_per = c_in // n_off
    first, chan, count, col = [0], [], [], []
    for g in range(n_off):
        for blk in range(n_blocks):
            c = g * c_per + blk * block
            c_hi = min(c + block, (g + 1) * c_per)
            while c < c_hi:
                wg = c // c_pg
                cnt = min(c_hi, (wg + 1) * c_pg) - c
                chan.append(c)
                count.append(cnt)
                col.append(c + wg * (n_k - 1) * c_pg)
                c += cnt
            first.append(len(chan))
    runs = np.array([chan, count, col], dtype=np.uint64).reshape(3, len(chan))
    return np.array(first, dtype=np.int64), runs


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(
    n: int, length: int, bytes_per_row: int, cap: int | None = None
) -> list[tuple[int, int]]:
    """Global row ranges [r0, r1) of at most ``cap`` (``WORKSPACE_BYTES``) bytes each.

    A chunk holds whole images when one image fits, otherwise a slice of one image.
    """
    cap = WORKSPACE_BYTES if cap is None else cap
    return [
        (b0 * length + l0, (b1 - 1) * length + l1)
        for b0, b1, l0, l1 in plan_chunks(n, length, bytes_per_row, cap)
    ]


#: Forward chunks aim at this size, so the columns are still in cache when the GEMM
#: reads them, but hold at least ``_FORWARD_MIN_ROWS`` rows (up to
#: ``_FORWARD_MAX_CHUNK_BYTES``), so wide layers' GEMMs stay tall.
_FORWARD_CHUNK_BYTES = 4 * 2**20
_FORWARD_MIN_ROWS = 1024
_FORWARD_MAX_CHUNK_BYTES = 16 * 2**20


def _forward_chunk_bytes(row_bytes: int) -> int:
    """Workspace bytes per forward chunk (see ``_FORWARD_CHUNK_BYTES``)."""
    wanted = max(_FORWARD_CHUNK_BYTES, _FORWARD_MIN_ROWS * row_bytes)
    return min(WORKSPACE_BYTES, _FORWARD_MAX_CHUNK_BYTES, wanted)


#: Backward chunks (columns and grad columns) aim at this size, so that ``im2col``, the
#: two GEMMs and ``col2im`` pass a chunk on while it is still in the last-level cache. A
#: chunk then often holds a slice of one image, and ``_col2im`` runs one task per
#: channel block of it; blocks are never split below ``CHANNEL_BLOCK`` to make more
#: tasks (every task repeats each sample's setup and streams the chunk's grad columns).
#: Measured forward + backward, 2 threads, against 64 MiB chunks that held enough images
#: for two tasks: the detection layer (64 channels, 128×128) 61–62 → 47–60 ms at batch 2
#: and 35–36 → 27–30 ms at batch 1; ResNet-50's res3 24–25 → 22–23 ms, res4 19–21 →
#: 18–20 ms, res5 unchanged (batch 8). A chunk holds at least ``_BACKWARD_MIN_ROWS`` rows
#: (so the weight gradient's product stays tall enough for oneDNN): with 8 MiB chunks
#: alone res4 (two images a chunk) took 25 ms instead of 20. Against 16 MiB chunks, 8 MiB
#: took the detection layer from 48 to 42 ms at batch 2, from 25 to 22-23 at batch 1.
_BACKWARD_CHUNK_BYTES = 8 * 2**20
_BACKWARD_MIN_ROWS = 1024


def _backward_chunk_bytes(row_bytes: int) -> int:
    """Workspace bytes per backward chunk (see ``_BACKWARD_CHUNK_BYTES``)."""
    return min(WORKSPACE_BYTES, max(_BACKWARD_CHUNK_BYTES, _BACKWARD_MIN_ROWS * row_bytes))


_cache = threading.local()


def _workspace(rows: int, width: int, count: int, dtype: torch.dtype) -> list[Tensor]:
    """``count`` (rows, width) buffers from one block kept per Python thread between calls.

    Reusing the block saves page-faulting fresh memory on every call (several ms for a
    workspace of tens of MiB); the block never exceeds the largest workspace used so far,
    itself at most about ``WORKSPACE_BYTES``.
    """
    numel = rows * width * count
    block = getattr(_cache, "block", None)
    if block is None or block.dtype != dtype or block.numel() < numel:
        _cache.block = None  # free the old block before allocating the new one
        block = _cache.block = torch.empty(numel, dtype=dtype)
    return list(block[:numel].view(count, rows, width).unbind(0))


@functools.lru_cache(maxsize=64)
def _base_grid(
    k_h: int,
    k_w: int,
    h_out: int,
    w_out: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(K, L) rows and columns sampled without offsets.

    Computed in ``dtype`` as the reference does, so positions (and floors) match it.
    Cached per geometry (small: 2·K·L elements); the kernels only read them.
    """
    ky = (torch.arange(k_h, dtype=dtype) * dilation[0]).repeat_interleave(k_w)
    kx = (torch.arange(k_w, dtype=dtype) * dilation[1]).repeat(k_h)
    oy = (torch.arange(h_out, dtype=dtype) * stride[0] - padding[0]).repeat_interleave(w_out)
    ox = (torch.arange(w_out, dtype=dtype) * stride[1] - padding[1]).repeat(h_out)
    return (ky[:, None] + oy[None, :]).contiguous(), (kx[:, None] + ox[None, :]).contiguous()


def _gemm(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """``out = a · b (+ bias)``; ``out`` may be a strided view (BLAS writes it in place)."""
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _parallel(columns: int) -> bool:
    """Whether a kernel call over ``columns`` column elements runs on several threads."""
    return columns >= PARALLEL_MIN_COLUMNS and numba.get_num_threads() > 1


def _weight_matrix(weight: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """(C_out, C_pg, K_h, K_w) -> (groups, C_out/groups, K·C_pg), in ``dtype``.

    Each output channel's weights in the columns' order. Only (C_pg, K) swaps, within one
    output channel's weights (in cache); the GEMMs read it transposed where they need to.
    Written into the thread's kept scratch: a deep layer's weight is megabytes of pages
    that would fault on every call.
    """
    c_out, c_pg, k_h, k_w = weight.shape
    cog, k = c_out // groups, k_h * k_w
    out = _scratch("dense_w", groups * cog, k * c_pg, dtype).view(groups, cog, k * c_pg)
    w = weight.detach().to(dtype).contiguous().view(c_out, c_pg, k)
    _transpose_each(w, out.view(c_out, k, c_pg))
    return out


def _weight_outweighs(p: _Problem, rows: int) -> bool:
    """Whether a weight group is four times larger than ``rows`` rows of its columns.

    Then reordering the few columns costs less than reordering the weight (deep layers at
    batch 1), unless the weight is in their order already (channels-last).
    """
    return 4 * rows <= p.c_out // p.groups and not p.weight_in_column_order


def _few_pixel_operands(p: _Problem, cols: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """``(W, columnsᵀ)`` of weight group g in one (K, C_pg) order.

    The columns' order when they are the larger operand; the weight's own order when it
    is four times larger than the columns (deep layers at batch 1): a strided copy of
    the columns then costs less than reordering the weight.
    """
    rows = cols.shape[0]
    if not _weight_outweighs(p, rows):
        return p.w_mat[g], p.group_columns(cols, g).t()
    cols_t = p.group_columns(cols, g).view(rows, p.k, p.c_pg).permute(2, 1, 0)
    return p.w_own(g), cols_t.reshape(p.c_pg * p.k, rows)


def _onednn_operands(p: _Problem, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``(columns, weight rows)`` of :func:`_onednn.forward_rows` in one (K, C_pg) order.

    As in :func:`_few_pixel_operands`: the columns' order, unless the weight is four times
    larger than them; then the columns are copied into the weight's own order (a res5
    layer at batch 1: 0.9 MB of columns instead of 9.4 MB of weight).
    """
    rows = cols.shape[0]
    if not _weight_outweighs(p, rows):
        return cols, p.w_rows
    own = cols.view(rows, p.groups, p.k, p.c_pg).transpose(2, 3).reshape(rows, -1)
    return own, p.weight.reshape(p.c_out, p.c_pg * p.k).contiguous()


def _grad_rows(grad_output: Tensor, p: _Problem, with_sums: bool) -> tuple[Tensor, Tensor | None]:
    """(N·L, C_out): ``grad_output`` channels-last (scratch; group g's are columns g·cog...).

    With ``with_sums``, also the per-channel sums (the bias gradient, float64), taken in
    the same pass in an order fixed by the shapes; else None.
    """
    rows = _scratch("dense_go", p.n * p.length, p.c_out, p.dtype)
    return rows, _channels_last_into(rows, grad_output, with_sums)


class _Problem:
    """Inputs in the compute dtype and layout the kernels use, plus the geometry."""

    def __init__(
        self,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        self.dtype = dt = _compute_dtype(input.dtype)
        self.n, self.c_in = input.shape[0], input.shape[1]
        self.c_out, self.c_pg, k_h, k_w = weight.shape
        self.groups = self.c_in // self.c_pg
        self.k = k_h * k_w
        self.h_out, self.w_out = offset.shape[2], offset.shape[3]
        self.length = self.h_out * self.w_out
        self.n_off = offset.shape[1] // (2 * self.k)
        self.height, self.width = input.shape[2], input.shape[3]
        # (N·H·W, C_in): channels-last; a channels-last input's own memory, else a copy in
        # a scratch buffer the thread keeps (no page faults)
        pixels = self.n * self.height * self.width
        rows = channels_last_rows(input, dt)
        if rows is None:
            rows = _scratch("dense_x", pixels, self.c_in, dt)
            _channels_last_into(rows, input)
        self.x2 = rows
        self.x = self.x2.view(self.n, self.height, self.width, self.c_in)
        shape = (self.n, self.n_off, self.k, 2, self.length)
        self.off = offset.detach().to(dt).contiguous().reshape(shape)
        self.has_mask = mask is not None
        self.mask = (
            mask.detach().to(dt).contiguous().reshape(self.n, self.n_off, self.k, self.length)
            if mask is not None
            else self.x.new_zeros(1, 1, 1, 1)
        )
        self.base_y, self.base_x = _base_grid(
            k_h, k_w, self.h_out, self.w_out, stride, padding, dilation, dt
        )
        self.weight = weight.detach().to(dt)

    @functools.cached_property
    def w_mat(self) -> Tensor:
        """(groups, C_out/groups, K·C_pg): the weight in the columns' order.

        A channels-last weight is in that order already (a view, no copy).
        """
        if self.weight_in_column_order:
            cog = self.c_out // self.groups
            return self.weight.permute(0, 2, 3, 1).reshape(self.groups, cog, -1)
        return _weight_matrix(self.weight, self.groups, self.dtype)

    @property
    def weight_in_column_order(self) -> bool:
        """Whether the weight is channels-last: (C_out, K_h, K_w, C_pg) in memory."""
        return is_channels_last(self.weight)

    @property
    def w_rows(self) -> Tensor:
        """(C_out, K·C_pg): :attr:`w_mat` with the groups' output channels in one list."""
        return self.w_mat.view(self.c_out, -1)

    def w_own(self, g: int) -> Tensor:
        """(C_out/groups, C_pg·K): group g's weight in its own layout (a view)."""
        cog = self.c_out // self.groups
        return self.weight.reshape(self.groups, cog, self.c_pg * self.k)[g]

    @property
    def group_width(self) -> int:
        """One weight group's columns in a row: K·C_pg."""
        return self.k * self.c_pg

    @property
    def row_width(self) -> int:
        return self.groups * self.group_width

    def _common(self) -> tuple[object, ...]:
        return (
            self.x2.numpy(), self.height, self.width, self.off.numpy(), self.mask.numpy(),
            self.has_mask, self.base_y.numpy(), self.base_x.numpy(),
        )  # fmt: skip

    def im2col(self, cols: Tensor, r0: int) -> None:
        """Fill ``cols`` (R, groups·K·C_pg) for the global rows r0 .. r0 + R."""
        if self.height * self.width == 0:  # an empty map: every sample reads 0
            cols.zero_()
            return
        c_per = self.c_in // self.n_off
        runs = _runs_table(self.c_in, self.n_off, self.c_pg, self.k, c_per, 1)
        args = (*self._common(), cols.numpy(), r0, self.c_pg, *runs)
        if _parallel(cols.numel()):
            _numba_threads.launch(_im2col, *args, numba.get_num_threads())
        else:
            small = cols.numel() < PARALLEL_MIN_COLUMNS  # one pixel at a time: less to compile
            (_im2col_rows if small else _im2col_rows8)(*args, 0, cols.shape[0])

    def col2im(
        self,
        gcols: Tensor,
        r0: int,
        gx: Tensor | None,
        g_off: Tensor | None,
        g_mask: Tensor | None,
        block: int,
        n_blocks: int,
        n_parts: int,
    ) -> None:
        """Scatter ``gcols`` into ``gx`` and write the offset / mask gradient partials.

        ``gx``: (n_parts, N·H·W, C_in), one input-gradient partial per run of rows (see
        :func:`_col2im_tasks`), or None: no input gradient; ``g_off`` None: no offset or
        mask gradient.
        """
        if self.height * self.width == 0:  # an empty map: no gradient reaches a sample
            for t in (g_off, g_mask):
                if t is not None:
                    t.zero_()
            return
        dummy = np.zeros((1,) * 6, dtype=self.x2.numpy().dtype)
        gx3 = dummy[0, 0, 0] if gx is None else gx.numpy()
        n_tasks = self.images(r0, gcols.shape[0]) * self.n_off * n_blocks * n_parts
        args = (
            *self._common(), gcols.numpy(), r0, self.c_pg, gx3,
            dummy if g_off is None else g_off.numpy(),
            dummy[0] if g_mask is None else g_mask.numpy(), block, n_blocks, n_parts,
            *_runs_table(self.c_in, self.n_off, self.c_pg, self.k, block, n_blocks),
            gx is not None, g_off is not None,
        )  # fmt: skip
        if _parallel(gcols.numel()):
            _numba_threads.launch(_col2im, *args, n_tasks, numba.get_num_threads())
        else:
            small = gcols.numel() < PARALLEL_MIN_COLUMNS  # one row at a time: less to compile
            (_col2im_tasks if small else _col2im_tasks8)(*args, 0, n_tasks)

    def images(self, r0: int, rows: int) -> int:
        """How many images the global rows r0 .. r0 + rows (rows > 0) touch."""
        return (r0 + rows - 1) // self.length - r0 // self.length + 1

    def group_columns(self, cols: Tensor, g: int) -> Tensor:
        """(R, K·C_pg) view of weight group g's columns (row stride = row_width)."""
        width = self.group_width
        return cols[:, g * width : (g + 1) * width]


def _rows_of_chunk(p: _Problem, chunk: Tensor, bias: Tensor | None, dst: Tensor) -> None:
    """A chunk's output rows ``columns · Wᵀ (+ bias)`` into ``dst`` (R, C_out) rows."""
    cog = p.c_out // p.groups
    if _onednn.pays_for_output(p.dtype, chunk.shape[0], p.group_width, cog, p.groups):
        dst.copy_(_onednn.forward_rows(*_onednn_operands(p, chunk), bias, p.groups))
        return
    for g in range(p.groups):  # BLAS writes the group's columns of the rows in place
        c_lo, c_hi = g * cog, (g + 1) * cog
        b_g = None if bias is None else bias[c_lo:c_hi]
        _gemm(p.group_columns(chunk, g), p.w_mat[g].t(), b_g, dst[:, c_lo:c_hi])


@_numba_threads.scoped
def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution forward; see :func:`deformconv.deform_conv2d` for shapes.

    Returns:
        (N, C_out, H_out, W_out) in ``input``'s dtype (computed in float64 for float64
        inputs, float32 otherwise); channels-last for a channels-last input (the GEMMs
        write its rows in place of a transpose), else contiguous.
    """
    from deformconv.kernels import _numba_direct  # narrow groups: direct, no column buffer

    groups = input.shape[1] // weight.shape[1]
    if _numba_direct.prefers_direct(input.shape[1], weight.shape[0], groups):
        return _numba_direct.forward(input, offset, mask, weight, bias, stride, padding, dilation)
    p = _Problem(input, offset, mask, weight, stride, padding, dilation)
    cog = p.c_out // p.groups
    # A channels-last output's memory holds the GEMMs' rows as they are: no transpose.
    out_rows = None
    if is_channels_last(input):
        out_rows = torch.empty(p.n * p.length, p.c_out, dtype=p.dtype)
        out = out_rows.view(p.n, p.h_out, p.w_out, p.c_out).permute(0, 3, 1, 2)
    else:
        out = torch.empty(p.n, p.c_out, p.h_out, p.w_out, dtype=p.dtype)
    out_maps = out.view(p.n, p.c_out, p.length) if out_rows is None else None
    b = None if bias is None else bias.detach().to(p.dtype).reshape(p.c_out, 1)
    row_bytes = p.row_width * p.x.element_size()
    chunks = _chunks(p.n, p.length, row_bytes, _forward_chunk_bytes(row_bytes))
    rows = max((r1 - r0 for r0, r1 in chunks), default=0)
    (cols,) = _workspace(rows, p.row_width, 1, p.dtype)
    for r0, r1 in chunks:
        chunk = cols[: r1 - r0]
        p.im2col(chunk, r0)
        if out_rows is not None:
            _rows_of_chunk(p, chunk, None if b is None else b[:, 0], out_rows[r0:r1])
            continue
        assert out_maps is not None
        n0, n1 = r0 // p.length, -(-r1 // p.length)  # the images of the chunk
        l0 = r0 - n0 * p.length  # 0 unless the chunk is a slice of one image
        # all groups in one call, bias fused
        if _onednn.pays_for_output(p.dtype, r1 - r0, p.group_width, cog, p.groups):
            rows_all = _onednn.forward_rows(
                *_onednn_operands(p, chunk), None if b is None else b[:, 0], p.groups
            )
            _rows_into_maps(rows_all, out_maps, n0, l0)
            continue
        for g in range(p.groups):
            c_lo, c_hi = g * cog, (g + 1) * cog
            b_g = None if b is None else b[c_lo:c_hi]
            dst = out_maps[n0:n1, c_lo:c_hi, l0 : l0 + (r1 - r0) // (n1 - n0)]
            if n1 - n0 == 1 and r1 - r0 <= cog:
                # Few pixels, many channels: W · columnsᵀ is the NCHW output's
                # (C_out, pixels) block (row stride L), so BLAS writes it in place.
                _gemm(*_few_pixel_operands(p, chunk, g), b_g, dst[0])
            else:  # columns · Wᵀ, the faster GEMM for many pixels, then to NCHW
                rows_g = torch.mm(p.group_columns(chunk, g), p.w_mat[g].t())
                maps = rows_g.view(n1 - n0, dst.shape[2], cog).transpose(1, 2)
                dst.copy_(maps) if b_g is None else torch.add(maps, b_g, out=dst)
    return out.to(input.dtype)


@_numba_threads.scoped
def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a deformable convolution.

    Args:
        grad_output: (N, C_out, H_out, W_out).
        input: (N, C_in, H_in, W_in).
        offset: (N, 2·G·K_h·K_w, H_out, W_out).
        mask: (N, G·K_h·K_w, H_out, W_out) or None.
        weight: (C_out, C_in/groups, K_h, K_w).
        bias: (C_out,) or None.
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        needs_grad: which of ``(input, offset, mask, weight, bias)`` need a gradient;
            only those are computed (the input gradient's scatter, the offset and mask
            reductions and the weight GEMM are skipped when not needed).

    Returns:
        ``(grad_input, grad_offset, grad_mask, grad_weight, grad_bias)`` with the shapes
        and dtypes of their arguments; None where the argument is None or its gradient
        is not needed.
    """
    from deformconv.kernels import _numba_direct  # narrow groups: direct, no column buffer

    groups = input.shape[1] // weight.shape[1]
    if _numba_direct.prefers_direct(input.shape[1], weight.shape[0], groups):
        args = (grad_output, input, offset, mask, weight, bias, stride, padding, dilation)
        return _numba_direct.backward(*args, needs_grad=needs_grad)
    want_x, want_off, want_m, want_w, want_b = needs_grad
    want_off = want_off or (want_m and mask is not None)  # one pass gives both
    p = _Problem(input, offset, mask, weight, stride, padding, dilation)
    cog = p.c_out // p.groups
    g_rows, g_sums = _grad_rows(grad_output, p, bias is not None and want_b)
    c_per = p.c_in // p.n_off
    row_bytes = 2 * p.row_width * p.x.element_size()
    cap = _backward_chunk_bytes(row_bytes)
    chunks = _chunks(p.n, p.length, row_bytes, cap)
    block = max(1, min(c_per, CHANNEL_BLOCK))
    n_blocks = max(1, -(-c_per // block))
    # A chunk with fewer col2im tasks than MIN_COL2IM_TASKS splits each task's rows into
    # parts, each with its own input-gradient partial (chunk-dependent, not thread-dependent).
    n_parts = [
        -(-MIN_COL2IM_TASKS // (p.images(r0, r1 - r0) * p.n_off * n_blocks)) for r0, r1 in chunks
    ]
    n_gx = max(n_parts, default=1)
    gx = None
    if want_x:
        gx = _scratch("dense_gx", n_gx * p.x2.shape[0], p.c_in, p.dtype).zero_()
        gx = gx.view(n_gx, p.x2.shape[0], p.c_in)
    gw_mat = None  # written by the first chunk (beta 0), zero when there is none
    if want_w:
        gw_mat = _scratch("dense_gw", p.c_out, p.group_width, p.dtype)
        gw_mat = gw_mat.view(p.groups, cog, p.group_width)
        if not chunks:
            gw_mat.zero_()
    g_off = p.x.new_empty(n_blocks, *p.off.shape) if want_off else None
    g_mask = p.x.new_empty(n_blocks, p.n, p.n_off, p.k, p.length) if want_off else None
    want_cols = gx is not None or g_off is not None
    rows = max((r1 - r0 for r0, r1 in chunks), default=0)
    cols, gcols = _workspace(rows, p.row_width, 2, p.dtype)
    for (r0, r1), parts in zip(chunks, n_parts, strict=True):
        chunk, g_chunk = cols[: r1 - r0], g_rows[r0:r1]
        if gw_mat is not None:
            p.im2col(chunk, r0)
        dnn_w = gw_mat is not None and _onednn.pays_for_weight(
            p.dtype, r1 - r0, p.c_out, p.group_width, p.groups
        )
        dnn_cols = want_cols and _onednn.pays_for_columns(
            p.dtype, r1 - r0, p.group_width, cog, p.groups
        )
        g_columns = None
        if dnn_cols:
            g_columns = _onednn.backward_rows(g_chunk, chunk, p.w_rows, p.groups)
        if dnn_w and gw_mat is not None:
            gw_all = gw_mat.view(p.c_out, -1)
            _onednn.weight_rows_into(gw_all, g_chunk, chunk, p.groups, accumulate=r0 > 0)
        elif gw_mat is not None:
            beta = 0.0 if r0 == 0 else 1.0  # beta 0: ignores (never reads) the buffer
            for g in range(p.groups):
                g_rows_g = g_chunk[:, g * cog : (g + 1) * cog]
                gw_mat[g].addmm_(g_rows_g.t(), p.group_columns(chunk, g), beta=beta)
        if not want_cols:
            continue
        if g_columns is None:
            g_columns = gcols[: r1 - r0]
            for g in range(p.groups):
                g_rows_g = g_chunk[:, g * cog : (g + 1) * cog]
                torch.mm(g_rows_g, p.w_mat[g], out=p.group_columns(g_columns, g))
        gx_parts = None if gx is None else gx[:parts]
        p.col2im(g_columns, r0, gx_parts, g_off, g_mask, block, n_blocks, parts)
    grad_input: Tensor | None = None
    grad_offset: Tensor | None = None
    grad_mask: Tensor | None = None
    grad_weight: Tensor | None = None
    grad_bias: Tensor | None = None
    if g_off is not None and g_mask is not None:
        # Partials summed in a fixed order: bitwise reproducible.
        grad_off, grad_m = g_off[0], g_mask[0]
        for i in range(1, n_blocks):
            grad_off = grad_off + g_off[i]
            grad_m = grad_m + g_mask[i]
        # (N, G, K, 2, L) is (N, 2·G·K, H_out, W_out): channel 2·(g·K + k) is Δy, the next Δx.
        grad_offset = grad_off.reshape(offset.shape).to(offset.dtype)
        if mask is not None:
            grad_mask = grad_m.reshape(mask.shape).to(mask.dtype)
    if gw_mat is not None and p.weight_in_column_order:  # channels-last, as the weight
        c_out, c_pg, k_h, k_w = weight.shape
        gw_rows = gw_mat.view(c_out * k_h * k_w, c_pg)  # (C_out, K, C_pg): channels-last
        grad_weight = _rows_as_maps(gw_rows, c_out, k_h, k_w, True).to(weight.dtype)
    elif gw_mat is not None:
        # fresh memory, as every result: gw_mat is scratch that the next call reuses
        grad_weight = torch.empty(weight.shape, dtype=p.dtype)
        _transpose_each(gw_mat.view(p.c_out, p.k, p.c_pg), grad_weight.view(p.c_out, p.c_pg, p.k))
        grad_weight = grad_weight.to(weight.dtype)
    if bias is not None and g_sums is not None:
        grad_bias = g_sums.to(bias.dtype)
    # The channels-last copies go before grad_input is allocated: a lower peak.
    del p, g_rows
    if gx is not None:
        for i in range(1, n_gx):  # the row parts' partials, in a fixed order
            gx[0].add_(gx[i])
        n, _, h, w = input.shape
        grad_input = _rows_as_maps(gx[0], n, h, w, is_channels_last(input)).to(input.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
