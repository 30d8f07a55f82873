"""Direct CPU deformable convolution for narrow groups: gather and accumulate, no GEMM.

The column + GEMM kernels (:mod:`deformconv.kernels._numba`) run one GEMM per weight
group. When a group has few channels (ResNeXt's ``groups = 32``: 4–16 channels; depthwise:
one) those GEMMs are tiny, and the time goes into writing and re-reading the column
buffer. Here each output pixel instead reads its bilinear samples and multiplies them by
its group's few weights right away.

Layout: the input, ``grad_output`` and the gradients are channels-last, pixels flattened,
(N·H·W, C) and (N·H_out·W_out, C_out), so every loop over channels is contiguous; so is
the depthwise output. The other forward writes its output channels-first directly (see
below). The input and ``grad_output`` copies end in one zero row, which a missing sample
or a missing row of a tile reads.

Numba runs LLVM without its SLP vectoriser, and without fastmath the loop vectoriser
leaves floating-point reductions scalar; the hot loops therefore spell out their vectors
with :mod:`deformconv.kernels._simd` (eight channels per ``<8 x float>``, operations in
the order written: no reassociation, no FMA contraction). Where Numba compiles for
AVX-512, the loops whose length allows it (a group's samples in the forward's dot
products and its sampling, the backward's passes over groups of multiples of 16 channels)
take 16 channels per step first (``_simd.WIDE``), then eight: 20-25 % off the backward
of ResNeXt's res4 layer. The order of every sum is still fixed by the shapes.

Forward, parallel over blocks of output pixels (rows):

- depthwise (one input and one output channel per group): for every kernel point the
  bilinear corners are found once per offset group, and ``out[row, c] += w[k, c] · m ·
  bilinear(x[:, c])`` runs over the group's channels;
- weight and offset groups of multiples of 8 channels (ResNeXt's 8 and 16): per tile of
  rows (consecutive pixels of one image) the samples of every channel and kernel point go
  to a buffer laid out like the weight, ``[row, group][k·C_pg + i]``, a pixel's channels
  read in order. Then, when a group's output channels fill whole vectors (``cog`` a
  multiple of ``_simd.WIDE``: ResNeXt's res4 and res5), per group and tile of eight rows,
  outer products: ``out[r, group's outputs] += sample[r, q] · w[q, group's outputs]``
  over ``q = k·C_pg + i``, one weight vector for the eight rows, no lane sums, into
  channels-last rows that one transpose turns channels-first (res4's forward: 1.45 →
  1.2 ms against the dot products below). Otherwise output channel ``o`` of row ``r`` is
  one contiguous dot product of the weight row ``o`` and the row's samples of ``o``'s
  group, for two output channels and four rows at once (each weight vector serves four
  rows, each sample vector two outputs); one ``vsum4`` reduces the four rows' lanes, and
  the four values go straight into the channels-first output;
- other narrow groups: per row and kernel point the samples of all channels go to a
  small buffer, and ``P[j, c] += w[k, j, c] · sample[c]`` accumulates every output
  channel ``j`` of each channel's group in loops over all channels (contiguous,
  vectorised by LLVM); output channel ``j`` of group ``g`` is then the sum of ``P[j, c]``
  over ``g``'s channels, stored straight into the channels-first output.

A dot-product or other narrow-group task's rows are consecutive pixels, so it fills whole
cache lines of each output channel, and no transpose pass over channels-last rows is
needed.

Backward, parallel over tasks (slot of images, offset group, block of channels). A task
zeroes its part of ``grad_input``, then visits the output pixels of its images in tiles
of four rows; per tile and kernel point it finds the four rows' corners once, then

- pass A, eight channels ``c`` at a time: the samples of the four rows and, over the
  output channels ``j`` of ``c``'s group, the sample gradients ``gs[r, c] = Σ_j
  grad_out[r, j] · w[k, j, c]`` and ``grad_weight[k, j, c] += Σ_r grad_out[r, j] ·
  sample[r, c]``: each weight vector and weight-gradient vector is loaded once for the
  four rows (``grad_out[r, j]`` is one value broadcast to the vector when a group has a
  multiple of 8 channels, the row itself for depthwise, else a per-tile copy expanded to
  channels). The weight and its gradient are laid out in panels of 16 input channels,
  ``[k, panel, j, lane]``, so that this loop over ``j`` reads consecutive cache lines
  (:data:`_PANEL`);
- pass B, per row with a sample: ``gs · m · corner weight`` added to ``grad_input`` at
  the four corners (the task owns these elements: its images, its channels), and the
  four dot products ``Σ_c gs · x[corner, c]`` in lanes reduced by a fixed tree, from
  which the offset and mask gradients follow (written as the block's partial).

Channels past the last multiple of 8 of a block run the same sums one at a time, in the
same order. ``grad_weight`` goes to the slot's partial, which the task owns for its
channels. The partials (one per channel block for offset and mask, one per slot for the
weight) are summed afterwards in a fixed order. No two tasks write the same memory, the
task split depends only on the shapes, never on the thread count, and every sum runs in
a fixed order: results are bitwise reproducible.

The layout changes (:mod:`deformconv.kernels._layout`) are Numba transposes of 8x8 tiles
in registers, a task per 32 pixels of an image: the input and ``grad_output`` to
channels-last rows (2.5-3x faster than torch's permute-copy; the bias gradient is summed
from the fresh rows while they are in cache), the depthwise output and ``grad_input``
back to channels-first.

Memory: besides the channels-last copies of the input, ``grad_output`` and the gradients,
the partials take ``min(N, SLOTS)`` weight-sized and ``ceil(C_in / G / block)``
offset-sized buffers, and each task a few rows of scratch (a forward task: four rows'
samples of every kernel point). No column buffer. The channels-last copies and
``grad_input`` rows are scratch that each calling thread keeps for its next call, up to
:data:`deformconv.kernels._layout._KEEP_BYTES` (their pages are then touched once, not on
every call); what a call returns is always fresh memory.

Safety: as in :mod:`deformconv.kernels._numba` (positions are range-checked with
comparisons that are False for NaN before they are turned into indices; corner indices
are clamped into the map; 64-bit indices).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from deformconv.kernels import _numba_threads
from deformconv.kernels._layout import (
    _channels_last_into,
    _rows_as_maps,
    _scratch,
    is_channels_last,
)
from deformconv.kernels._numba import (
    _base_grid,
    _compute_dtype,
    _corners,
    _flat_offsets,
    _jit,
    _serial_jit,
    _taps8,
)
from deformconv.kernels._simd import (
    LANES,
    WIDE,
    vadd,
    vfold,
    vloadas,
    vmul,
    vmuladd,
    vsplat,
    vsplatas,
    vsplatw,
    vstore,
    vsum4,
    vwidth,
)
from deformconv.kernels._taps import FIELDS, OK, W00, W01, W10, W11, corner_rows

__all__ = ["MAX_GROUP_CHANNELS", "SLOTS", "backward", "forward", "prefers_direct"]

#: The direct kernels serve convolutions whose weight groups have at most this many
#: input channels (``C_in / groups``); wider groups run as column + GEMM. Measured
#: (forward + backward, C = 256, batch 8, 2 threads, 14×14 and 28×28): direct / column =
#: 0.04 at 1 channel per group, 0.40 at 16, 0.56 at 32, 0.77–0.97 at 64, 0.99–1.14 at 128
#: (``python benchmarks/profile_cpu.py --crossover``).
MAX_GROUP_CHANNELS = 64

#: Images are dealt to at most this many slots in the backward; each slot owns one
#: partial weight gradient. Fixed (not the thread count), so results are reproducible.
SLOTS = 8

#: Backward channel blocks: at most this many channels per task, fewer (down to
#: ``_MIN_BLOCK``) until there are at least ``_MIN_TASKS`` tasks. Wide blocks spread each
#: (pixel, kernel point)'s geometry over more channels and leave fewer offset partials:
#: 512 instead of 64 took 15-18 % off the backward of ResNeXt's and 128-channel depthwise
#: layers (batch 8). At batch 1 a task of 8 channels spends most of its time per pixel and
#: kernel point, not per channel: with blocks of at least 32 the depthwise backward kernel
#: (64 and 128 channels, 56×56, 2 threads) took 0.9–2.1 ms instead of 1.9–2.0 ms and
#: 1.6–3.3 ms instead of 2.5–3.1 ms over three rounds (two tasks on two threads ran at
#: either speed from one round to the next), at the price of fewer tasks for more threads
#: (2 and 4 instead of 8).
_BLOCK = 512
_MIN_BLOCK = 32
_MIN_TASKS = 8

#: Forward rows per parallel task (each task allocates its scratch once).
_ROWS_PER_TASK = 32


def prefers_direct(c_in: int, c_out: int, groups: int) -> bool:
    """Whether the direct kernels beat column + GEMM for these channel counts.

    True for groups of at most :data:`MAX_GROUP_CHANNELS` input channels when there is
    more than one group (a dense convolution's single GEMM is efficient at any width).
    """
    return groups > 1 and c_in // groups <= MAX_GROUP_CHANNELS


@numba.njit(inline="always")
def _geometry(y, xx, height, width, pix, m, one):  # pragma: no cover
    """Corner indices and modulated weights of a position already range-checked."""
    ry0, ry1, rx0, rx1, ly, lx, v00, v01, v10, v11 = _corners(y, xx, height, width, one)
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
    return i00, i01, i10, i11, w00, w01, w10, w11, ly, lx, v00, v01, v10, v11


@_serial_jit
def _depthwise_rows(
    x, height, width, off, mask, has_mask, base_y, base_x, w_kc, bias, out, r_lo, r_hi
):  # pragma: no cover
    # Rows r_lo .. r_hi of _forward_depthwise, one pixel at a time (an image's last rows
    # that do not fill eight, small calls).
    n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
    n_ch = x.shape[1]
    c_per = n_ch // n_off
    one = x.dtype.type(1)
    nc = np.uint64(n_ch)
    for r in range(r_lo, r_hi):
        b = r // length
        p_l = r - b * length
        pix = b * height * width
        for c in range(nc):
            out[r, c] = bias[c]
        for k in range(n_k):
            for g in range(n_off):
                y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                if not (y >= -1 and y < height and xx >= -1 and xx < width):  # False for NaN
                    continue
                m = mask[b, g, k, p_l] if has_mask else one
                i00, i01, i10, i11, w00, w01, w10, w11, _, _, _, _, _, _ = _geometry(
                    y, xx, height, width, pix, m, one
                )
                c0 = np.uint64(g * c_per)
                for j in range(np.uint64(c_per)):
                    c = c0 + j
                    out[r, c] += w_kc[k, c] * (
                        w00 * x[i00, c] + w01 * x[i01, c] + w10 * x[i10, c] + w11 * x[i11, c]
                    )


@numba.njit(inline="always")
def _accumulate_run(
    x, w_kc, out, r, k, c0, cnt, tab, i, i00, i01, i10, i11, like
):  # pragma: no cover
    # out[r, c] += w_kc[k, c] · Σ_q w_q · x[i_q, c] for c = c0 .. in vectors of like's width
    # while they fit in cnt channels (the scalar body's operations in its order); returns
    # how many channels it did.
    a = vsplatas(tab[W00, i], like)
    b = vsplatas(tab[W01, i], like)
    c = vsplatas(tab[W10, i], like)
    d = vsplatas(tab[W11, i], like)
    step = vwidth(like)
    j = np.uint64(0)
    while j + step <= cnt:
        ch = c0 + j
        v = vmul(a, vloadas(x, i00, ch, like))
        v = vmuladd(v, b, vloadas(x, i01, ch, like))
        v = vmuladd(v, c, vloadas(x, i10, ch, like))
        v = vmuladd(v, d, vloadas(x, i11, ch, like))
        vstore(out, r, ch, vmuladd(vloadas(out, r, ch, like), vloadas(w_kc, k, ch, like), v))
        j += step
    return j


@_jit
def _forward_depthwise(
    x, height, width, off, mask, has_mask, base_y, base_x, w_kc, bias, out
):  # pragma: no cover
    # x: (N·H·W, C). w_kc: (K, C). bias: (C,). out: (N·L, C), row = n·L + l. Tasks of
    # _ROWS_PER_TASK rows; eight rows of one image at a time find their taps in vectors
    # (_taps8: bitwise the scalar path's) and accumulate their channels in vectors, in the
    # scalar body's order (_depthwise_rows, which does an image's last rows).
    n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
    n_ch = x.shape[1]
    c_per = np.uint64(n_ch // n_off)
    one = x.dtype.type(1)
    fh = x.dtype.type(height)
    fw = x.dtype.type(width)
    wzero = vsplatw(one - one)
    vzero = vsplat(one - one)
    off2, mask2 = _flat_offsets(off, mask)
    n_rows = out.shape[0]
    n_tasks = (n_rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in numba.prange(n_tasks):
        tab = np.empty((FIELDS, LANES), dtype=x.dtype)
        r = t * _ROWS_PER_TASK
        end = min(n_rows, r + _ROWS_PER_TASK)
        while r < end:
            b = r // length
            p_l = r - b * length
            if r + LANES > end or p_l + LANES > length:
                stop = min(end, r + length - p_l)
                _depthwise_rows(
                    x, height, width, off, mask, has_mask, base_y, base_x, w_kc, bias, out,
                    r, stop,
                )  # fmt: skip
                r = stop
                continue
            pix = b * height * width
            for i in range(LANES):
                for c in range(np.uint64(n_ch)):
                    out[r + i, c] = bias[c]
            for k in range(n_k):
                for g in range(n_off):
                    rm = (b * n_off + g) * n_k + k
                    _taps8(base_y, base_x, off2, mask2, has_mask, k, rm, p_l, fh, fw, one, tab)
                    c0 = np.uint64(g) * c_per
                    for i in range(LANES):
                        if tab[OK, i] == 0:  # outside the map: adds nothing (as the scalar path)
                            continue
                        i00, i01, i10, i11 = corner_rows(tab, i, pix, width)
                        row = np.uint64(r + i)
                        j = _accumulate_run(
                            x, w_kc, out, row, k, c0, c_per, tab, i, i00, i01, i10, i11, wzero
                        )
                        j += _accumulate_run(
                            x, w_kc, out, row, k, c0 + j, c_per - j, tab, i, i00, i01, i10, i11,
                            vzero,
                        )  # fmt: skip
                        for jj in range(j, c_per):
                            c = c0 + jj
                            out[row, c] += w_kc[k, c] * (
                                tab[W00, i] * x[i00, c] + tab[W01, i] * x[i01, c]
                                + tab[W10, i] * x[i10, c] + tab[W11, i] * x[i11, c]
                            )  # fmt: skip
            r += LANES


@_jit
def _forward_grouped(
    x, height, width, off, mask, has_mask, base_y, base_x, w_t, c_pg, bias, out
):  # pragma: no cover
    # w_t: (K, cog, C_in), w_t[k, j, c] = weight[(c // C_pg)·cog + j, c % C_pg, k].
    # out: (N, C_out, L), channels-first. Per row: P[j, c] = Σ_k w_t[k, j, c] · sample_k[c]
    # (loops over all channels: contiguous, vectorised), then out[wg·cog + j] = Σ_{c in
    # group wg} P[j, c], one scalar store per output channel either way; a task's rows are
    # consecutive pixels, so it fills whole cache lines of each output channel.
    n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
    n_ch = x.shape[1]
    c_per = n_ch // n_off
    cog = w_t.shape[1]
    groups = n_ch // c_pg
    total = out.shape[0] * length
    n_tasks = (total + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    one = x.dtype.type(1)
    zero = one - one
    ucp = np.uint64(c_per)
    for t in numba.prange(n_tasks):
        acc = np.empty((cog, n_ch), dtype=x.dtype)
        smp = np.empty(n_ch, dtype=x.dtype)
        for r in range(t * _ROWS_PER_TASK, min(total, (t + 1) * _ROWS_PER_TASK)):
            b = r // length
            p_l = r - b * length
            pix = b * height * width
            acc[:, :] = zero
            for k in range(n_k):
                for g in range(n_off):
                    y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                    xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                    if not (y >= -1 and y < height and xx >= -1 and xx < width):
                        continue  # reads 0
                    m = mask[b, g, k, p_l] if has_mask else one
                    i00, i01, i10, i11, w00, w01, w10, w11, _, _, _, _, _, _ = _geometry(
                        y, xx, height, width, pix, m, one
                    )
                    c0 = np.uint64(g * c_per)
                    for i in range(ucp):
                        c = c0 + i
                        smp[c] = (
                            w00 * x[i00, c] + w01 * x[i01, c] + w10 * x[i10, c] + w11 * x[i11, c]
                        )
                    for j in range(cog):
                        for i in range(ucp):
                            acc[j, c0 + i] += w_t[k, j, c0 + i] * smp[c0 + i]
            for wg in range(groups):
                for j in range(cog):
                    s = bias[wg * cog + j]
                    for i in range(c_pg):
                        s += acc[j, wg * c_pg + i]
                    out[b, wg * cog + j, p_l] = s


#: Rows (consecutive output pixels of one image) that the backward handles together. Each
#: weight vector and weight-gradient vector is loaded once per tile and used for all its
#: rows; four rows' samples and sample gradients fit AVX2's sixteen vector registers.
_TILE = 4

#: The backward's weight and weight gradient come in panels of this many input channels:
#: ``[k, panel, j, lane]``, so the loop over a group's output channels ``j`` reads
#: consecutive lines. In the plain ``[k, j, c]`` layout those lines lie ``C_in`` floats
#: apart, fall into the same few L1 sets, and evict each other: ResNeXt's res4 layer
#: (512 channels, 16 per group) took 3.5 ms in the backward kernel that way instead of 2.
_PANEL = 16

# How the backward finds grad_out[row, (c // C_pg)·cog + j] for the eight channels c of a
# vector: one value for all of them (their group is the same: C_pg a multiple of 8), the
# row itself (depthwise: output channel c), or a per-tile copy expanded to channels.
_GO_SPLAT = 0
_GO_ROW = 1
_GO_EXPANDED = 2


@numba.njit(inline="always")
def _panel_at(first, c, cog):  # pragma: no cover
    """Row and lane of channel c, output channel 0, in panels that start at panel ``first``.

    Output channel j is row + j (a group's ``cog`` rows of one panel follow each other).
    """
    pan = np.uint64(_PANEL)
    return (first + c // pan) * np.uint64(cog), c % pan


@numba.njit(inline="always")
def _go_vec(mode, go, row, go_e, e_row, i, c, col, vz):  # pragma: no cover
    """grad_out of output channel ``j`` of channels ``c ..`` (``col = o(c) + j``), vz wide."""
    if mode == _GO_SPLAT:
        return vsplatas(go[row, col], vz)
    if mode == _GO_ROW:
        return vloadas(go, row, c, vz)
    return vloadas(go_e, e_row, i, vz)


@numba.njit(inline="always")
def _tap(gi, gwt, r):  # pragma: no cover
    """Row ``r``'s four corner indices and modulated bilinear weights, as one tuple."""
    return (gi[r, 0], gi[r, 1], gi[r, 2], gi[r, 3], gwt[r, 0], gwt[r, 1], gwt[r, 2], gwt[r, 3])


@numba.njit(inline="always")
def _bilinear(x, t, c, vz):  # pragma: no cover
    """Channels ``c ..``'s sample at tap ``t`` (:func:`_tap`), as wide as ``vz`` (8 or WIDE)."""
    s = vmul(vsplatas(t[4], vz), vloadas(x, t[0], c, vz))
    s = vmuladd(s, vsplatas(t[5], vz), vloadas(x, t[1], c, vz))
    s = vmuladd(s, vsplatas(t[6], vz), vloadas(x, t[2], c, vz))
    return vmuladd(s, vsplatas(t[7], vz), vloadas(x, t[3], c, vz))


@numba.njit(inline="always")
def _sample_grads(
    mode,
    x,
    go,
    go_e,
    rows,
    w2,
    k_row,
    gw2,
    gw_row,
    go_base,
    cog,
    cl,
    start,
    end,
    vzero,
    t0,
    t1,
    t2,
    t3,
    need_gs,
    need_w,
    gs,
):  # pragma: no cover
    # For the tile's four rows and every vector of channels start .. end (vectors of
    # vzero's width: 8 lanes, or WIDE where each lies inside one weight group): gs[r, c] =
    # Σ_j go·w[k, j, c] and g_w[k, j, c] += Σ_r go·sample[r, c], the weight vectors loaded
    # once per tile. Rows without a sample read the zero pixel (their weights are 0, too).
    s0 = s1 = s2 = s3 = vzero
    row0, row1, row2, row3 = rows[0], rows[1], rows[2], rows[3]
    for i in range(start, end, vwidth(vzero)):
        c = cl + i
        wr, pc = _panel_at(k_row, c, cog)
        gr, _ = _panel_at(gw_row, c, cog)
        if need_w:
            s0 = _bilinear(x, t0, c, vzero)
            s1 = _bilinear(x, t1, c, vzero)
            s2 = _bilinear(x, t2, c, vzero)
            s3 = _bilinear(x, t3, c, vzero)
        q0 = q1 = q2 = q3 = vzero
        o = go_base[c]
        for j in range(cog):
            ju = np.uint64(j)
            e0 = _go_vec(mode, go, row0, go_e, j, i, c, o + ju, vzero)
            e1 = _go_vec(mode, go, row1, go_e, cog + j, i, c, o + ju, vzero)
            e2 = _go_vec(mode, go, row2, go_e, 2 * cog + j, i, c, o + ju, vzero)
            e3 = _go_vec(mode, go, row3, go_e, 3 * cog + j, i, c, o + ju, vzero)
            if need_gs:
                wv = vloadas(w2, wr + ju, pc, vzero)
                q0 = vmuladd(q0, e0, wv)
                q1 = vmuladd(q1, e1, wv)
                q2 = vmuladd(q2, e2, wv)
                q3 = vmuladd(q3, e3, wv)
            if need_w:
                acc = vloadas(gw2, gr + ju, pc, vzero)
                acc = vmuladd(acc, e0, s0)
                acc = vmuladd(acc, e1, s1)
                acc = vmuladd(acc, e2, s2)
                acc = vmuladd(acc, e3, s3)
                vstore(gw2, gr + ju, pc, acc)
        if need_gs:
            vstore(gs, np.uint64(0), i, q0)
            vstore(gs, np.uint64(1), i, q1)
            vstore(gs, np.uint64(2), i, q2)
            vstore(gs, np.uint64(3), i, q3)


@numba.njit(inline="always")
def _splat_grads(
    x,
    go,
    go_e,
    rows,
    w2,
    k_row,
    gw2,
    gw_row,
    go_base,
    cog,
    cl,
    wide_end,
    full,
    t0,
    t1,
    t2,
    t3,
    need_gs,
    need_w,
    gs,
):  # pragma: no cover
    # :func:`_sample_grads` for groups of multiples of 8 channels: wide vectors first
    # (each inside one weight group), then eight lanes.
    zero = x.dtype.type(0)
    if wide_end > 0:
        _sample_grads(_GO_SPLAT, x, go, go_e, rows, w2, k_row, gw2, gw_row, go_base, cog, cl,
                      np.uint64(0), wide_end, vsplatw(zero), t0, t1, t2, t3, need_gs, need_w,
                      gs)  # fmt: skip
    _sample_grads(_GO_SPLAT, x, go, go_e, rows, w2, k_row, gw2, gw_row, go_base, cog, cl,
                  wide_end, full, vsplat(zero), t0, t1, t2, t3, need_gs, need_w,
                  gs)  # fmt: skip


@numba.njit(inline="always")
def _sample_grads_tail(
    x,
    go,
    rows,
    w2,
    k_row,
    gw2,
    gw_row,
    go_base,
    cog,
    cl,
    full,
    cnt,
    gi,
    gwt,
    need_gs,
    need_w,
    gs,
    smp,
):  # pragma: no cover
    # :func:`_sample_grads` for the last cnt % 8 channels, one at a time (same order).
    zero = x.dtype.type(0)
    for i in range(full, cnt):
        c = cl + i
        o = go_base[c]
        for r in range(_TILE):
            smp[r] = (
                gwt[r, 0] * x[gi[r, 0], c] + gwt[r, 1] * x[gi[r, 1], c]
                + gwt[r, 2] * x[gi[r, 2], c] + gwt[r, 3] * x[gi[r, 3], c]
            )  # fmt: skip
            gs[r, i] = zero
        wr, pc = _panel_at(k_row, c, cog)
        gr, _ = _panel_at(gw_row, c, cog)
        for j in range(cog):
            ju = np.uint64(j)
            wv = w2[wr + ju, pc]
            acc = gw2[gr + ju, pc]
            for r in range(_TILE):
                e = go[rows[r], o + np.uint64(j)]
                if need_gs:
                    gs[r, i] += e * wv
                acc += e * smp[r]
            if need_w:
                gw2[gr + ju, pc] = acc


@numba.njit(inline="always")
def _scatter_run(x, gx, gs, r, t, cl, start, end, acc, need_x, need_om):  # pragma: no cover
    # Channels start .. end of _scatter_dot, in vectors of acc's width; acc holds the four
    # dot products' lanes so far (returned updated).
    s00, s01, s10, s11 = acc
    a00, a01, a10, a11 = t[0], t[1], t[2], t[3]
    u00, u01 = vsplatas(t[4], s00), vsplatas(t[5], s00)
    u10, u11 = vsplatas(t[6], s00), vsplatas(t[7], s00)
    for i in range(start, end, vwidth(s00)):
        c = cl + i
        g = vloadas(gs, r, i, s00)
        if need_om:
            s00 = vmuladd(s00, g, vloadas(x, a00, c, s00))
            s01 = vmuladd(s01, g, vloadas(x, a01, c, s00))
            s10 = vmuladd(s10, g, vloadas(x, a10, c, s00))
            s11 = vmuladd(s11, g, vloadas(x, a11, c, s00))
        if need_x:
            vstore(gx, a00, c, vmuladd(vloadas(gx, a00, c, s00), u00, g))
            vstore(gx, a01, c, vmuladd(vloadas(gx, a01, c, s00), u01, g))
            vstore(gx, a10, c, vmuladd(vloadas(gx, a10, c, s00), u10, g))
            vstore(gx, a11, c, vmuladd(vloadas(gx, a11, c, s00), u11, g))
    return s00, s01, s10, s11


@numba.njit(inline="always")
def _scatter_dot(x, gx, gs, r, t, cl, full, cnt, need_x, need_om):  # pragma: no cover
    # One row's gs into grad_input at its four corners, and the four dot products
    # d_q = Σ_c gs[c] · x[corner_q, c] in lanes reduced by a fixed tree (then the tail, in
    # order): wide vectors first, folded to eight lanes for the rest. Each corner's
    # read-modify-write completes before the next: corners may share a pixel.
    a00, a01, a10, a11 = t[0], t[1], t[2], t[3]
    wzero = vsplatw(x.dtype.type(0))
    full_w = full // np.uint64(WIDE) * np.uint64(WIDE)
    z = _scatter_run(x, gx, gs, r, t, cl, np.uint64(0), full_w, (wzero, wzero, wzero, wzero),
                     need_x, need_om)  # fmt: skip
    s = (vfold(z[0]), vfold(z[1]), vfold(z[2]), vfold(z[3]))
    s = _scatter_run(x, gx, gs, r, t, cl, full_w, full, s, need_x, need_om)
    d00, d01, d10, d11 = vsum4(s[0], s[1], s[2], s[3])
    for i in range(full, cnt):
        c = cl + i
        g = gs[r, i]
        d00 += g * x[a00, c]
        d01 += g * x[a01, c]
        d10 += g * x[a10, c]
        d11 += g * x[a11, c]
        if need_x:
            gx[a00, c] += t[4] * g
            gx[a01, c] += t[5] * g
            gx[a10, c] += t[6] * g
            gx[a11, c] += t[7] * g
    return d00, d01, d10, d11


@_jit
def _backward(
    x,
    height,
    width,
    off,
    mask,
    has_mask,
    base_y,
    base_x,
    go,
    w2,
    go_base,
    c_pg,
    cog,
    block,
    n_blocks,
    n_slots,
    need_x,
    need_om,
    need_w,
    gx,
    g_off,
    g_mask,
    gw2,
):  # pragma: no cover
    # x: (N·H·W + 1, C_in) channels-last input and a last, zero pixel. go: (N·L + 1, C_out)
    # channels-last grad_output and a last, zero row. w2: (K·P·cog, _PANEL), P = C_in /
    # _PANEL rounded up: w2[(k·P + c // _PANEL)·cog + j, c % _PANEL] = w_t[k, j, c] of
    # _forward_grouped (see _panels). go_base: (C_in,) uint64, the first output channel of
    # each input channel's group. gx: (N·H·W, C_in), zeroed here, then accumulated.
    # g_off: (B_c, N, G, K, 2, L), g_mask: (B_c, N, G, K, L): one partial per channel
    # block (B_c = n_blocks). gw2: (S·K·P·cog, _PANEL), laid out as w2 for each slot s
    # (kernel point k at s·K + k): one partial per slot (S = n_slots; slot s holds images
    # s, s + S, ...). The tasks write every element of the partials (zeroes first); a
    # partial that is not needed may be a dummy, never written. Task (slot, offset group,
    # channel block) owns gx[its images' pixels, its channels], g_off[block, its images,
    # group] and gw2[slot's rows, its channels]: no two tasks share memory. go_base is
    # uint64 (and so are the grad_out rows): no negative-index wraparound in the loops.
    n_img, n_off, n_k, length = off.shape[0], off.shape[1], off.shape[2], off.shape[4]
    c_per = x.shape[1] // n_off
    n_tasks = n_slots * n_off * n_blocks
    one = x.dtype.type(1)
    zero = one - one
    zero_pix = np.uint64(x.shape[0] - 1)
    zero_row = n_img * length
    need_gs = need_x or need_om
    n_pan = w2.shape[0] // (n_k * cog)
    for t in numba.prange(n_tasks):
        slot = t // (n_off * n_blocks)
        g = (t // n_blocks) % n_off
        blk = t % n_blocks
        c_lo = g * c_per + blk * block
        c_hi = min(c_lo + block, (g + 1) * c_per)
        cnt = np.uint64(c_hi - c_lo)
        cl = np.uint64(c_lo)
        full = cnt // np.uint64(LANES) * np.uint64(LANES)
        vzero = vsplat(zero)
        # wide vectors where each lies inside one weight group (its grad_out is one value)
        wide_end = np.uint64(0)
        if c_pg % WIDE == 0 and c_lo % WIDE == 0:
            wide_end = cnt // np.uint64(WIDE) * np.uint64(WIDE)
        if c_pg % LANES == 0 and c_lo % LANES == 0:
            mode = _GO_SPLAT
        elif c_pg == 1 and cog == 1:
            mode = _GO_ROW
        else:
            mode = _GO_EXPANDED
        gs = np.empty((_TILE, c_hi - c_lo), dtype=x.dtype)  # gradient of each sample
        smp = np.empty(_TILE, dtype=x.dtype)
        go_e = np.empty((_TILE * cog if mode == _GO_EXPANDED else 1, c_hi - c_lo), x.dtype)
        rows = np.empty(_TILE, dtype=np.uint64)
        ok = np.empty(_TILE, dtype=np.bool_)
        gi = np.empty((_TILE, 4), dtype=np.uint64)
        gwt = np.empty((_TILE, 4), dtype=x.dtype)
        aux = np.empty((_TILE, 7), dtype=x.dtype)
        if need_w:  # this task's part of the slot's weight gradient, zeroed
            for k in range(n_k):
                for i in range(cnt):
                    q, pc = _panel_at(np.uint64((slot * n_k + k) * n_pan), cl + i, cog)
                    for j in range(np.uint64(cog)):
                        gw2[q + j, pc] = zero
        if need_x:  # this task's part of gx, zeroed
            for b in range(slot, n_img, n_slots):
                for q in range(b * height * width, (b + 1) * height * width):
                    qu = np.uint64(q)
                    for i in range(np.uint64(0), full, np.uint64(LANES)):
                        vstore(gx, qu, cl + i, vzero)
                    for i in range(full, cnt):
                        gx[qu, cl + i] = zero
        for b in range(slot, n_img, n_slots):
            pix = b * height * width
            for l0 in range(0, length, _TILE):
                for r in range(_TILE):
                    rows[r] = np.uint64(b * length + l0 + r if l0 + r < length else zero_row)
                if mode == _GO_EXPANDED:
                    for r in range(_TILE):
                        for j in range(cog):
                            for i in range(cnt):
                                go_e[r * cog + j, i] = go[rows[r], go_base[cl + i] + np.uint64(j)]
                for k in range(n_k):
                    for r in range(_TILE):
                        p_l = l0 + r
                        ok[r] = False
                        y = xx = zero
                        if p_l < length:
                            y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                            xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                            ok[r] = y >= -1 and y < height and xx >= -1 and xx < width  # NaN: False
                        if not ok[r]:  # reads 0: the zero pixel, weight 0
                            gi[r, :] = zero_pix
                            gwt[r, :] = zero
                            continue
                        m = mask[b, g, k, p_l] if has_mask else one
                        i00, i01, i10, i11, w00, w01, w10, w11, ly, lx, v00, v01, v10, v11 = (
                            _geometry(y, xx, height, width, pix, m, one)
                        )
                        gi[r, 0], gi[r, 1], gi[r, 2], gi[r, 3] = i00, i01, i10, i11
                        gwt[r, 0], gwt[r, 1], gwt[r, 2], gwt[r, 3] = w00, w01, w10, w11
                        aux[r, 0], aux[r, 1], aux[r, 2] = ly, lx, m
                        aux[r, 3], aux[r, 4], aux[r, 5], aux[r, 6] = v00, v01, v10, v11
                    k_row = np.uint64(k * n_pan)  # kernel point k's first panel
                    gw_row = np.uint64((slot * n_k + k) * n_pan)
                    t0 = _tap(gi, gwt, 0)
                    t1 = _tap(gi, gwt, 1)
                    t2 = _tap(gi, gwt, 2)
                    t3 = _tap(gi, gwt, 3)
                    # A literal mode (and literal flags for the usual case of every
                    # gradient) for ResNeXt's groups: those inlined copies keep only their
                    # own loads and branches (10-15 % faster); one more copy serves the
                    # other modes.
                    if mode == _GO_SPLAT and need_gs and need_w:
                        _splat_grads(x, go, go_e, rows, w2, k_row, gw2, gw_row, go_base,
                                     cog, cl, wide_end, full, t0, t1, t2, t3, True, True,
                                     gs)  # fmt: skip
                    elif mode == _GO_SPLAT:
                        _splat_grads(x, go, go_e, rows, w2, k_row, gw2, gw_row, go_base,
                                     cog, cl, wide_end, full, t0, t1, t2, t3, need_gs,
                                     need_w, gs)  # fmt: skip
                    else:
                        _sample_grads(mode, x, go, go_e, rows, w2, k_row, gw2, gw_row,
                                      go_base, cog, cl, np.uint64(0), full, vzero, t0, t1, t2,
                                      t3, need_gs, need_w, gs)  # fmt: skip
                    if full < cnt:
                        _sample_grads_tail(x, go, rows, w2, k_row, gw2, gw_row, go_base, cog,
                                           cl, full, cnt, gi, gwt, need_gs, need_w, gs,
                                           smp)  # fmt: skip
                    if not need_gs:
                        continue
                    for r in range(_TILE):
                        if not ok[r]:  # reads 0: zero gradients
                            if need_om and l0 + r < length:
                                g_off[blk, b, g, k, 0, l0 + r] = zero
                                g_off[blk, b, g, k, 1, l0 + r] = zero
                                g_mask[blk, b, g, k, l0 + r] = zero
                            continue
                        d00, d01, d10, d11 = _scatter_dot(
                            x,
                            gx,
                            gs,
                            np.uint64(r),
                            _tap(gi, gwt, r),
                            cl,
                            full,
                            cnt,
                            need_x,
                            need_om,
                        )
                        if need_om:
                            ly, lx, m = aux[r, 0], aux[r, 1], aux[r, 2]
                            d00 *= aux[r, 3]
                            d01 *= aux[r, 4]
                            d10 *= aux[r, 5]
                            d11 *= aux[r, 6]
                            hy = one - ly
                            hx = one - lx
                            p_l = l0 + r
                            g_off[blk, b, g, k, 0, p_l] = (hx * (d10 - d00) + lx * (d11 - d01)) * m
                            g_off[blk, b, g, k, 1, p_l] = (hy * (d01 - d00) + ly * (d11 - d10)) * m
                            g_mask[blk, b, g, k, p_l] = (
                                hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
                            )


#: Tiles per task of :func:`_forward_vectors` (32 rows: each task fills whole cache lines
#: of every output channel it writes).
_TILES_PER_TASK = 8


@numba.njit(inline="always")
def _store_samples(x, t, ok, c0, c_per, c_pg, k, vzero, smp, srow):  # pragma: no cover
    # Kernel point k's samples of one offset group's channels c0 .. c0 + c_per at tap t
    # (zeros where not ok) into smp[srow + wg, k·C_pg + i], a vector of vzero's width at a
    # time (each vector inside one weight group wg).
    step = vwidth(vzero)
    wg = c0 // c_pg
    col = np.uint64(k * c_pg + c0 - wg * c_pg)
    end = np.uint64((k + 1) * c_pg)
    for c in range(np.uint64(c0), np.uint64(c0 + c_per), step):
        v = _bilinear(x, t, c, vzero) if ok else vzero
        vstore(smp, srow + np.uint64(wg), col, v)
        col += step
        if col == end:  # the next weight group
            wg += 1
            col -= np.uint64(c_pg)


@numba.njit(inline="always")
def _sample_rows(
    x,
    height,
    width,
    off,
    mask,
    has_mask,
    base_y,
    base_x,
    b,
    l0,
    n_rows,
    length,
    pix,
    c_pg,
    smp,
):  # pragma: no cover
    # smp[r·groups + wg, k·C_pg + i]: the sample of channel wg·C_pg + i at kernel point k
    # for the tile's row r < n_rows (0 where there is none), WIDE or eight channels at a
    # time. A pixel's channels are read in order: the hardware prefetches its row.
    n_off, n_k = off.shape[1], off.shape[2]
    groups = x.shape[1] // c_pg
    c_per = x.shape[1] // n_off
    one = x.dtype.type(1)
    zero = one - one
    vzero = vsplat(zero)
    wzero = vsplatw(zero)
    wide_ok = c_pg % WIDE == 0 and c_per % WIDE == 0
    for r in range(n_rows):
        p_l = l0 + r
        for k in range(n_k):
            for g in range(n_off):
                c0 = g * c_per
                ok = False
                y = xx = zero
                if p_l < length:
                    y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                    xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                    ok = y >= -1 and y < height and xx >= -1 and xx < width  # NaN: False
                m = mask[b, g, k, p_l] if has_mask and ok else one
                t = (np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0), zero, zero, zero, zero)
                if ok:
                    i00, i01, i10, i11, w00, w01, w10, w11, _, _, _, _, _, _ = _geometry(
                        y, xx, height, width, pix, m, one
                    )
                    t = (i00, i01, i10, i11, w00, w01, w10, w11)
                srow = np.uint64(r * groups)
                if wide_ok:  # wide vectors, each inside one weight group
                    _store_samples(x, t, ok, c0, c_per, c_pg, k, wzero, smp, srow)
                else:
                    _store_samples(x, t, ok, c0, c_per, c_pg, k, vzero, smp, srow)


@numba.njit(inline="always")
def _dot_run(w2, smp, o, p, s0, s1, s2, s3, start, end, acc):  # pragma: no cover
    # Columns start .. end of the dot products of weight rows o and p with sample rows
    # s0 .. s3, in vectors of the accumulators' width; acc: (o's four rows, p's four rows).
    a0, a1, a2, a3, b0, b1, b2, b3 = acc
    for q in range(start, end, vwidth(a0)):
        wa = vloadas(w2, o, q, a0)
        wb = vloadas(w2, p, q, a0)
        v = vloadas(smp, s0, q, a0)
        a0 = vmuladd(a0, wa, v)
        b0 = vmuladd(b0, wb, v)
        v = vloadas(smp, s1, q, a0)
        a1 = vmuladd(a1, wa, v)
        b1 = vmuladd(b1, wb, v)
        v = vloadas(smp, s2, q, a0)
        a2 = vmuladd(a2, wa, v)
        b2 = vmuladd(b2, wb, v)
        v = vloadas(smp, s3, q, a0)
        a3 = vmuladd(a3, wa, v)
        b3 = vmuladd(b3, wb, v)
    return a0, a1, a2, a3, b0, b1, b2, b3


@_jit
def _forward_vectors(
    x, height, width, off, mask, has_mask, base_y, base_x, w2, c_pg, bias, out
):  # pragma: no cover
    # Weight groups and offset groups of multiples of 8 channels. w2: (C_out, K·C_pg),
    # w2[o, k·C_pg + i] = weight[o, i, k]. out: (N, C_out, L), channels-first. Per tile of
    # four rows (consecutive pixels of one image): the samples go to smp (rows as
    # w2's, per weight group); then output o = wg·cog + j of row r is the dot product of
    # w2[o] and smp[r·groups + wg], in eight lanes per row, reduced for the four rows by
    # one vsum4. Two output channels at a time: each sample vector serves two, each
    # weight vector four rows.
    n_img, n_k, length = off.shape[0], off.shape[2], off.shape[4]
    n_ch = x.shape[1]
    groups = n_ch // c_pg
    cog = w2.shape[0] // groups
    span = np.uint64(n_k * c_pg)
    tiles = (length + _TILE - 1) // _TILE
    tasks_per_img = (tiles + _TILES_PER_TASK - 1) // _TILES_PER_TASK
    span_w = span // np.uint64(WIDE) * np.uint64(WIDE)
    wzero = vsplatw(x.dtype.type(0))
    for t in numba.prange(n_img * tasks_per_img):
        b = t // tasks_per_img
        first = (t - b * tasks_per_img) * _TILES_PER_TASK
        pix = b * height * width
        smp = np.empty((_TILE * groups, n_k * c_pg), dtype=x.dtype)
        for tile in range(first, min(tiles, first + _TILES_PER_TASK)):
            l0 = tile * _TILE
            _sample_rows(
                x, height, width, off, mask, has_mask, base_y, base_x, b, l0, _TILE, length,
                pix, c_pg, smp,
            )  # fmt: skip
            for wg in range(groups):
                s0 = np.uint64(wg)
                s1 = np.uint64(groups + wg)
                s2 = np.uint64(2 * groups + wg)
                s3 = np.uint64(3 * groups + wg)
                for j in range(0, cog, 2):
                    o = np.uint64(wg * cog + j)
                    p = o + np.uint64(1) if j + 1 < cog else o  # an odd cog repeats the last
                    # wide vectors first (AVX-512: 16 lanes), folded to 8 for the rest
                    acc = _dot_run(w2, smp, o, p, s0, s1, s2, s3, np.uint64(0), span_w,
                                   (wzero, wzero, wzero, wzero, wzero, wzero, wzero,
                                    wzero))  # fmt: skip
                    acc = _dot_run(w2, smp, o, p, s0, s1, s2, s3, span_w, span,
                                   (vfold(acc[0]), vfold(acc[1]), vfold(acc[2]),
                                    vfold(acc[3]), vfold(acc[4]), vfold(acc[5]),
                                    vfold(acc[6]), vfold(acc[7])))  # fmt: skip
                    c0, c1, c2, c3, d0, d1, d2, d3 = acc
                    _store_tile(out, b, o, l0, length, bias[o], vsum4(c0, c1, c2, c3))
                    _store_tile(out, b, p, l0, length, bias[p], vsum4(d0, d1, d2, d3))


#: Rows (consecutive output pixels of one image) per tile of :func:`_forward_outer`, and
#: tiles per task (32 rows).
_OUTER_ROWS = 8
_OUTER_TILES_PER_TASK = 4


@numba.njit(inline="always")
def _outer_group(w_q, smp, wg, groups, span, cog, bias, out, row0, rows, vzero):  # pragma: no cover
    # out[row0 + r, wg·cog + j] = Σ_q smp[r·groups + wg, q] · w_q[wg·span + q, j] + bias for
    # the tile's first `rows` rows; output channels j in vectors of vzero's width, q in order
    # (kernel point, then channel). Each weight vector serves eight rows; no lane sums.
    step = vwidth(vzero)
    w0 = np.uint64(wg * span)
    o0 = np.uint64(wg * cog)
    ug = np.uint64(groups)
    s0 = np.uint64(wg)
    s1, s2, s3, s4 = s0 + ug, s0 + 2 * ug, s0 + 3 * ug, s0 + 4 * ug
    s5, s6, s7 = s0 + 5 * ug, s0 + 6 * ug, s0 + 7 * ug
    for j in range(np.uint64(0), np.uint64(cog), step):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero
        for q in range(np.uint64(span)):
            wv = vloadas(w_q, w0 + q, j, vzero)
            a0 = vmuladd(a0, vsplatas(smp[s0, q], vzero), wv)
            a1 = vmuladd(a1, vsplatas(smp[s1, q], vzero), wv)
            a2 = vmuladd(a2, vsplatas(smp[s2, q], vzero), wv)
            a3 = vmuladd(a3, vsplatas(smp[s3, q], vzero), wv)
            a4 = vmuladd(a4, vsplatas(smp[s4, q], vzero), wv)
            a5 = vmuladd(a5, vsplatas(smp[s5, q], vzero), wv)
            a6 = vmuladd(a6, vsplatas(smp[s6, q], vzero), wv)
            a7 = vmuladd(a7, vsplatas(smp[s7, q], vzero), wv)
        bv = vloadas(bias, np.uint64(0), o0 + j, vzero)
        c = o0 + j
        vstore(out, row0, c, vadd(a0, bv))
        if rows > 1:
            vstore(out, row0 + np.uint64(1), c, vadd(a1, bv))
        if rows > 2:
            vstore(out, row0 + np.uint64(2), c, vadd(a2, bv))
        if rows > 3:
            vstore(out, row0 + np.uint64(3), c, vadd(a3, bv))
        if rows > 4:
            vstore(out, row0 + np.uint64(4), c, vadd(a4, bv))
        if rows > 5:
            vstore(out, row0 + np.uint64(5), c, vadd(a5, bv))
        if rows > 6:
            vstore(out, row0 + np.uint64(6), c, vadd(a6, bv))
        if rows > 7:
            vstore(out, row0 + np.uint64(7), c, vadd(a7, bv))


@_jit
def _forward_outer(
    x, height, width, off, mask, has_mask, base_y, base_x, w_q, c_pg, bias, out
):  # pragma: no cover
    # Groups of multiples of 8 input and 8 output channels, offset groups of multiples of 8
    # channels. w_q: (groups·K·C_pg, cog), row wg·K·C_pg + k·C_pg + i = weight[wg·cog + j,
    # i, k] over j. bias: (1, C_out). out: (N·L, C_out) channels-last rows. Per tile of
    # eight rows (consecutive pixels of one image): the samples of every channel and kernel
    # point (smp, as in _forward_vectors), then per weight group the outer products of the
    # eight rows' samples with the group's weight rows.
    n_img, n_k, length = off.shape[0], off.shape[2], off.shape[4]
    groups = x.shape[1] // c_pg
    cog = w_q.shape[1]
    span = n_k * c_pg
    tiles = (length + _OUTER_ROWS - 1) // _OUTER_ROWS
    tasks_per_img = (tiles + _OUTER_TILES_PER_TASK - 1) // _OUTER_TILES_PER_TASK
    wzero = vsplatw(x.dtype.type(0))
    vzero = vsplat(x.dtype.type(0))
    wide_out = cog % WIDE == 0
    for t in numba.prange(n_img * tasks_per_img):
        b = t // tasks_per_img
        first = (t - b * tasks_per_img) * _OUTER_TILES_PER_TASK
        pix = b * height * width
        smp = np.empty((_OUTER_ROWS * groups, span), dtype=x.dtype)
        for tile in range(first, min(tiles, first + _OUTER_TILES_PER_TASK)):
            l0 = tile * _OUTER_ROWS
            _sample_rows(
                x, height, width, off, mask, has_mask, base_y, base_x, b, l0, _OUTER_ROWS,
                length, pix, c_pg, smp,
            )  # fmt: skip
            row0 = np.uint64(b * length + l0)
            rows = min(_OUTER_ROWS, length - l0)
            for wg in range(groups):
                if wide_out:
                    _outer_group(w_q, smp, wg, groups, span, cog, bias, out, row0, rows, wzero)
                else:
                    _outer_group(w_q, smp, wg, groups, span, cog, bias, out, row0, rows, vzero)


@numba.njit(inline="always")
def _store_tile(out, b, o, l0, length, bias, sums):  # pragma: no cover
    """``out[b, o, l0 + r] = bias + sums[r]`` for the tile's rows that exist."""
    out[b, o, l0] = sums[0] + bias
    if l0 + 1 < length:
        out[b, o, l0 + 1] = sums[1] + bias
    if l0 + 2 < length:
        out[b, o, l0 + 2] = sums[2] + bias
    if l0 + 3 < length:
        out[b, o, l0 + 3] = sums[3] + bias


class _Problem:
    """Inputs in the compute dtype and the channels-last layout of the direct kernels."""

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
        self.cog = self.c_out // self.groups
        self.k = k_h * k_w
        self.h_out, self.w_out = offset.shape[2], offset.shape[3]
        self.length = self.h_out * self.w_out
        self.n_off = offset.shape[1] // (2 * self.k)
        self.height, self.width = input.shape[2], input.shape[3]
        self.pixels = self.n * self.height * self.width
        # (N·H·W + 1, C_in): channels-last pixels and a zero pixel (read by absent samples)
        self.x_rows = _scratch("x", self.pixels + 1, self.c_in, dt)
        self.x_rows[-1] = 0
        _channels_last_into(self.x_rows[: self.pixels], input)
        shape = (self.n, self.n_off, self.k, 2, self.length)
        self.off = offset.detach().to(dt).contiguous().reshape(shape)
        self.has_mask = mask is not None
        self.mask = (
            mask.detach().to(dt).contiguous().reshape(self.n, self.n_off, self.k, self.length)
            if mask is not None
            else self.x_rows.new_zeros(1, 1, 1, 1)
        )
        self.base_y, self.base_x = _base_grid(
            k_h, k_w, self.h_out, self.w_out, stride, padding, dilation, dt
        )
        self.weight = weight.detach().to(dt)

    @property
    def depthwise(self) -> bool:
        return self.c_pg == 1 and self.cog == 1

    def common(self) -> tuple[object, ...]:
        return (
            self.x_rows.numpy(), self.height, self.width, self.off.numpy(), self.mask.numpy(),
            self.has_mask, self.base_y.numpy(), self.base_x.numpy(),
        )  # fmt: skip

    def w_t(self) -> Tensor:
        """(K, cog, C_in): ``[k, j, c]`` = weight[(c // C_pg)·cog + j, c % C_pg, k]."""
        w = self.weight.reshape(self.groups, self.cog, self.c_pg, self.k)
        return w.permute(3, 1, 0, 2).reshape(self.k, self.cog, self.c_in).contiguous()


def _n_panels(c_in: int) -> int:
    """Panels of the backward's weight layout: ``C_in / _PANEL`` rounded up."""
    return -(-c_in // _PANEL)


def _panels(w_t: Tensor) -> Tensor:
    """(K, cog, C_in) -> (K·P·cog, _PANEL), the backward's layout (zeros past ``C_in``)."""
    k, cog, c_in = w_t.shape
    n_pan = _n_panels(c_in)
    w = torch.nn.functional.pad(w_t, (0, n_pan * _PANEL - c_in))
    return w.reshape(k, cog, n_pan, _PANEL).transpose(1, 2).reshape(-1, _PANEL).contiguous()


def _unpanel(g: Tensor, c_in: int) -> Tensor:
    """(K, P, cog, _PANEL) -> (K, cog, C_in): the inverse of :func:`_panels`."""
    k, n_pan, cog, _ = g.shape
    return g.transpose(1, 2).reshape(k, cog, n_pan * _PANEL)[:, :, :c_in]


def _channel_block(c_per: int, tasks_per_block: int) -> int:
    """Channels per backward task: ``_BLOCK``, halved (down to ``_MIN_BLOCK``) for more tasks."""
    block = min(c_per, _BLOCK)
    while block > _MIN_BLOCK and tasks_per_block * -(-c_per // block) < _MIN_TASKS:
        block = max(_MIN_BLOCK, block // 2)
    return max(1, block)


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
    """Deformable convolution forward by the direct kernels (narrow groups).

    Args and shapes as :func:`deformconv.kernels._numba.forward`.

    Returns:
        (N, C_out, H_out, W_out) in ``input``'s dtype (computed in float64 for float64
        inputs, float32 otherwise); channels-last for a channels-last input where the
        kernel writes channels-last rows, else contiguous.
    """
    p = _Problem(input, offset, mask, weight, stride, padding, dilation)
    cl = is_channels_last(input)  # the output in the input's memory format
    b = torch.zeros(p.c_out, dtype=p.dtype) if bias is None else bias.detach().to(p.dtype)
    if p.pixels == 0:  # an empty input map (padding alone gives the output): samples read 0
        out = torch.empty(p.n, p.c_out, p.h_out, p.w_out, dtype=input.dtype)
        return out.copy_(b.view(1, -1, 1, 1))
    vectors = p.c_pg % LANES == 0 and (p.c_in // p.n_off) % LANES == 0
    if vectors and p.cog % WIDE == 0:  # channels-last rows, then one transpose
        out_rows = _scratch("out", p.n * p.length, p.c_out, p.dtype)
        if out_rows.numel() > 0:
            w_q = p.weight.reshape(p.groups, p.cog, p.c_pg, p.k).permute(0, 3, 2, 1)
            _numba_threads.launch(
                _forward_outer,
                *p.common(),
                w_q.reshape(-1, p.cog).contiguous().numpy(),
                p.c_pg,
                b.reshape(1, -1).contiguous().numpy(),
                out_rows.numpy(),
            )
        return _rows_as_maps(out_rows, p.n, p.h_out, p.w_out, cl).to(input.dtype)
    if not p.depthwise:  # writes channels-first itself
        out = torch.empty(p.n, p.c_out, p.h_out, p.w_out, dtype=p.dtype)
        w_rows = p.weight.reshape(p.c_out, p.c_pg, p.k).transpose(1, 2).reshape(p.c_out, -1)
        if out.numel() > 0:
            _numba_threads.launch(
                _forward_vectors if vectors else _forward_grouped,
                *p.common(),
                w_rows.numpy() if vectors else p.w_t().numpy(),
                p.c_pg,
                b.contiguous().numpy(),
                out.reshape(p.n, p.c_out, p.length).numpy(),
            )
        return out.to(input.dtype)
    # Depthwise accumulates each output element over the kernel points: channels-last rows
    # (contiguous), then one transpose.
    out_rows = _scratch("out", p.n * p.length, p.c_out, p.dtype)
    if out_rows.numel() > 0:
        w_kc = p.weight.reshape(p.c_out, p.k).t().contiguous()
        _numba_threads.launch(
            _forward_depthwise,
            *p.common(),
            w_kc.numpy(),
            b.contiguous().numpy(),
            out_rows.numpy(),
        )
    return _rows_as_maps(out_rows, p.n, p.h_out, p.w_out, cl).to(input.dtype)


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
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Gradients by the direct kernels (narrow groups).

    Args and shapes as :func:`deformconv.kernels._numba.backward`; ``needs_grad`` says which
    of ``(input, offset, mask, weight, bias)`` need a gradient: the others are returned as
    zeros (None for an absent ``mask`` / ``bias``) and not computed.

    Returns:
        ``(grad_input, grad_offset, grad_mask, grad_weight, grad_bias)`` with the shapes
        and dtypes of their arguments; ``grad_mask`` / ``grad_bias`` are None when
        ``mask`` / ``bias`` is None.
    """
    p = _Problem(input, offset, mask, weight, stride, padding, dilation)
    need_x, need_off, need_mask, need_w, need_b = needs_grad
    need_om = need_off or (need_mask and mask is not None)
    # (N·L + 1, C_out): channels-last grad_output and a zero row (for a tile's absent rows)
    rows_out = p.n * p.length
    go = _scratch("out", rows_out + 1, p.c_out, p.dtype)
    go[-1] = 0
    go_sum = _channels_last_into(go[:rows_out], grad_output, bias is not None and need_b)
    c_per = p.c_in // p.n_off
    slots = max(1, min(p.n, SLOTS))
    block = _channel_block(c_per, slots * p.n_off)
    n_blocks = max(1, -(-c_per // block))
    # an empty input map: every sample reads 0, so no gradient reaches an offset or weight
    launch = rows_out > 0 and p.pixels > 0 and (need_x or need_om or need_w)
    # the kernel zeroes the part of gx that each task owns
    gx = _scratch("gx", p.pixels, p.c_in, p.dtype)
    if not (launch and need_x):
        gx.zero_()
    # The kernel writes every element of the partials it needs.
    g_w = (torch.empty if launch and need_w else torch.zeros)(
        slots if need_w else 1, p.k, _n_panels(p.c_in), p.cog, _PANEL, dtype=p.dtype
    )
    new_om = torch.empty if launch and need_om else torch.zeros
    g_off = new_om(n_blocks if need_om else 1, *p.off.shape, dtype=p.dtype)
    g_mask = new_om(n_blocks if need_om else 1, p.n, p.n_off, p.k, p.length, dtype=p.dtype)
    go_base = (torch.arange(p.c_in) // p.c_pg * p.cog).numpy().astype(np.uint64)
    if launch:
        _numba_threads.launch(
            _backward, *p.common(), go.numpy(), _panels(p.w_t()).numpy(),
            go_base, p.c_pg, p.cog, block, n_blocks, slots, need_x, need_om, need_w,
            gx.numpy(), g_off.numpy(), g_mask.numpy(), g_w.reshape(-1, _PANEL).numpy(),
        )  # fmt: skip
    # Partials summed in a fixed order: bitwise reproducible.
    grad_off, grad_m = g_off[0], g_mask[0]
    for i in range(1, g_off.shape[0]):
        grad_off = grad_off + g_off[i]
        grad_m = grad_m + g_mask[i]
    gw = g_w[0]  # in place (this call's own buffer): no temporaries
    for i in range(1, g_w.shape[0]):
        gw += g_w[i]
    gw = _unpanel(gw, p.c_in)
    if not need_off:
        grad_off = torch.zeros_like(grad_off)
    if not need_mask:
        grad_m = torch.zeros_like(grad_m)
    grad_input = _rows_as_maps(gx, p.n, p.height, p.width, is_channels_last(input))
    grad_input = grad_input.to(input.dtype)
    grad_offset = grad_off.reshape(offset.shape).to(offset.dtype)
    grad_mask = grad_m.reshape(mask.shape).to(mask.dtype) if mask is not None else None
    # (K, cog, C_in) -> (C_out, C_pg, K_h, K_w)
    grad_weight = gw.reshape(p.k, p.cog, p.groups, p.c_pg).permute(2, 1, 3, 0)
    grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
    grad_bias = None
    if bias is not None:
        grad_bias = go_sum.to(bias.dtype) if go_sum is not None else torch.zeros_like(bias)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
