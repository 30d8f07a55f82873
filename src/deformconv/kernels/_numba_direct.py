"""Direct CPU deformable convolution for narrow groups: gather and accumulate, no GEMM.

The column + GEMM kernels (:mod:`deformconv.kernels._numba`) run one GEMM per weight
group. When a group has few channels (ResNeXt's ``groups = 32``: 4–16 channels; depthwise:
one) those GEMMs are tiny, and the time goes into writing and re-reading the column
buffer. Here each output pixel instead reads its bilinear samples and multiplies them by
its group's few weights right away.

Layout: the input, ``grad_output`` and the gradients are channels-last, pixels flattened,
(N·H·W, C) and (N·H_out·W_out, C_out), so every loop over channels is contiguous and
vectorises; so is the depthwise output. The other forward writes its output
channels-first directly (see below).

Forward, parallel over blocks of output pixels (rows):

- depthwise (one input and one output channel per group): for every kernel point the
  bilinear corners are found once per offset group, and ``out[row, c] += w[k, c] · m ·
  bilinear(x[:, c])`` runs over the group's channels;
- other narrow groups: per row and kernel point the samples of all channels go to a
  small buffer, and ``P[j, c] += w[k, j, c] · sample[c]`` accumulates every output
  channel ``j`` of each channel's group in loops over all channels (contiguous,
  vectorised); output channel ``j`` of group ``g`` is then the sum of ``P[j, c]`` over
  ``g``'s channels, stored straight into the channels-first output: a task's rows are
  consecutive pixels, so it fills whole cache lines of each output channel, and no
  transpose pass over channels-last rows is needed.

Backward, parallel over tasks (slot of images, offset group, block of channels). A task
visits every output pixel of its images and every kernel point; for each channel ``c`` of
its block it computes the gradient of the sample, ``gs = Σ_j grad_out[row, j] · w[j, c,
k]`` over the output channels ``j`` of ``c``'s group, and from it

- ``grad_input``: ``gs · m · corner weight`` added at the four corners; the task owns
  these elements (its images, its channels);
- offset and mask gradients: the four dot products ``Σ_c gs · x[corner, c]`` over the
  block's channels, written as the block's partial;
- ``grad_weight``: ``grad_out[row, j] · sample`` added to the slot's partial, which the
  task owns for its channels.

The partials (one per channel block for offset and mask, one per slot for the weight) are
summed afterwards in a fixed order. No two tasks write the same memory and the task split
depends only on the shapes, never on the thread count: results are bitwise reproducible.

The depthwise output and ``grad_input`` go back to channels-first through a blocked Numba
transpose, about twice as fast as torch's strided copy of that permutation.

Memory: besides the channels-last copies of the input, ``grad_output`` and the gradients,
the partials take ``min(N, SLOTS)`` weight-sized and ``ceil(C_in / G / block)``
offset-sized buffers, and each task a few rows of scratch. No column buffer.

Safety: as in :mod:`deformconv.kernels._numba` (positions are range-checked with
comparisons that are False for NaN before they are turned into indices; corner indices
are clamped into the map; 64-bit indices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from deformconv.kernels import _numba_threads
from deformconv.kernels._numba import _base_grid, _compute_dtype, _corners, _dot4

__all__ = ["MAX_GROUP_CHANNELS", "SLOTS", "backward", "forward", "prefers_direct"]

#: The direct kernels serve convolutions whose weight groups have at most this many
#: input channels (``C_in / groups``); wider groups run as column + GEMM. Measured
#: (forward + backward, C = 256, batch 8, 2 threads): direct / column = 0.03 at 4 channels
#: per group, 0.23–0.38 at 16, 0.46–0.49 at 32, 1.02 at 64.
MAX_GROUP_CHANNELS = 32

#: Images are dealt to at most this many slots in the backward; each slot owns one
#: partial weight gradient. Fixed (not the thread count), so results are reproducible.
SLOTS = 8

#: Backward channel blocks: at most this many channels per task, fewer (down to
#: ``_MIN_BLOCK``) until there are at least ``_MIN_TASKS`` tasks. Wide blocks spread each
#: (pixel, kernel point)'s geometry over more channels and leave fewer offset partials:
#: 512 instead of 64 took 15-18 % off the backward of ResNeXt's and 128-channel depthwise
#: layers (batch 8).
_BLOCK = 512
_MIN_BLOCK = 8
_MIN_TASKS = 8

#: Forward rows per parallel task (each task allocates its scratch once).
_ROWS_PER_TASK = 32

_jit: Callable[[Any], Any] = numba.njit(
    parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy"
)


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


@_jit
def _forward_depthwise(
    x, height, width, off, mask, has_mask, base_y, base_x, w_kc, bias, out
):  # pragma: no cover
    # x: (N·H·W, C). w_kc: (K, C). bias: (C,). out: (N·L, C), row = n·L + l.
    n_off, n_k, length = off.shape[1], off.shape[2], off.shape[4]
    n_ch = x.shape[1]
    c_per = n_ch // n_off
    one = x.dtype.type(1)
    nc = np.uint64(n_ch)
    for r in numba.prange(out.shape[0]):
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
    w_t,
    go_base,
    c_pg,
    block,
    n_blocks,
    n_slots,
    need_x,
    need_om,
    need_w,
    gx,
    g_off,
    g_mask,
    g_w,
):  # pragma: no cover
    # go: (N·L, C_out) channels-last grad_output. w_t: (K, cog, C_in) as in _forward_grouped.
    # go_base: (C_in,) int64, the first output channel of each input channel's group.
    # gx: (N·H·W, C_in), accumulated. g_off: (B_c, N, G, K, 2, L), g_mask: (B_c, N, G, K, L):
    # one partial per channel block (B_c = n_blocks = ceil(C_per / block)). g_w: (S, K, cog,
    # C_in), one partial per slot (S = n_slots; slot s holds images s, s + S, ...). All
    # zero-initialised; a partial that is not needed may be a (1, ...) dummy, never written.
    # Task (slot, offset group, channel block) owns gx[its images' pixels, its channels],
    # g_off[block, its images, group], g_w[slot, :, :, its channels]: no two tasks share
    # memory. Loops over the block's channels are contiguous (vectorised); output channel j
    # of channel c's group is expanded to go_e[j, c] = go[row, (c // C_pg)·cog + j].
    n_img, n_off, n_k, length = off.shape[0], off.shape[1], off.shape[2], off.shape[4]
    c_per = x.shape[1] // n_off
    cog = w_t.shape[1]
    n_tasks = n_slots * n_off * n_blocks
    one = x.dtype.type(1)
    for t in numba.prange(n_tasks):
        slot = t // (n_off * n_blocks)
        g = (t // n_blocks) % n_off
        blk = t % n_blocks
        c_lo = g * c_per + blk * block
        c_hi = min(c_lo + block, (g + 1) * c_per)
        cnt = np.uint64(c_hi - c_lo)
        cl = np.uint64(c_lo)
        gs = np.empty((1, c_hi - c_lo), dtype=x.dtype)  # gradient of each channel's sample
        smp = np.empty(c_hi - c_lo, dtype=x.dtype)  # each channel's sample (for grad_w)
        go_e = np.empty((cog, c_hi - c_lo), dtype=x.dtype)
        for b in range(slot, n_img, n_slots):
            pix = b * height * width
            for p_l in range(length):
                row = b * length + p_l
                for i in range(c_hi - c_lo):
                    o = go_base[c_lo + i]
                    for j in range(cog):
                        go_e[j, i] = go[row, o + j]
                for k in range(n_k):
                    y = base_y[k, p_l] + off[b, g, k, 0, p_l]
                    xx = base_x[k, p_l] + off[b, g, k, 1, p_l]
                    if not (y >= -1 and y < height and xx >= -1 and xx < width):
                        continue  # reads 0: zero gradients (the buffers start at 0)
                    m = mask[b, g, k, p_l] if has_mask else one
                    i00, i01, i10, i11, w00, w01, w10, w11, ly, lx, v00, v01, v10, v11 = _geometry(
                        y, xx, height, width, pix, m, one
                    )
                    # gs[c] = Σ_j go_e[j, c] · w_t[k, j, c]; with the weight gradient, in the
                    # same pass over j: g_w[slot, k, j, c] += go_e[j, c] · sample[c].
                    if need_w:
                        for i in range(cnt):
                            c = cl + i
                            smp[i] = (
                                w00 * x[i00, c] + w01 * x[i01, c]
                                + w10 * x[i10, c] + w11 * x[i11, c]
                            )  # fmt: skip
                        for i in range(cnt):
                            gs[0, i] = go_e[0, i] * w_t[k, 0, cl + i]
                            g_w[slot, k, 0, cl + i] += go_e[0, i] * smp[i]
                        for j in range(1, cog):
                            for i in range(cnt):
                                gs[0, i] += go_e[j, i] * w_t[k, j, cl + i]
                                g_w[slot, k, j, cl + i] += go_e[j, i] * smp[i]
                    else:
                        for i in range(cnt):
                            gs[0, i] = go_e[0, i] * w_t[k, 0, cl + i]
                        for j in range(1, cog):
                            for i in range(cnt):
                                gs[0, i] += go_e[j, i] * w_t[k, j, cl + i]
                    if need_x:
                        for i in range(cnt):
                            c = cl + i
                            gx[i00, c] += w00 * gs[0, i]
                            gx[i01, c] += w01 * gs[0, i]
                            gx[i10, c] += w10 * gs[0, i]
                            gx[i11, c] += w11 * gs[0, i]
                    if need_om:
                        # d_q = Σ_c gs[c] · x[corner q, c]
                        d00, d01, d10, d11 = _dot4(gs, 0, np.uint64(0), x,
                                                   i00, i01, i10, i11, cl, cnt)  # fmt: skip
                        d00 *= v00
                        d01 *= v01
                        d10 *= v10
                        d11 *= v11
                        hy = one - ly
                        hx = one - lx
                        acc_m = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
                        acc_y = hx * (d10 - d00) + lx * (d11 - d01)
                        acc_x = hy * (d01 - d00) + ly * (d11 - d10)
                        g_off[blk, b, g, k, 0, p_l] = acc_y * m
                        g_off[blk, b, g, k, 1, p_l] = acc_x * m
                        g_mask[blk, b, g, k, p_l] = acc_m


#: Channels per task of :func:`_to_channels_first` (16 float32: one cache line per pixel).
_TRANSPOSE_BLOCK = 16


@_jit
def _to_channels_first_kernel(src, dst):  # pragma: no cover
    # src: (N, P, C) -> dst: (N, C, P). A task copies a block of channels of one image: it
    # reads one cache line per pixel and writes one sequential stream per channel (about
    # twice as fast as torch's strided copy of this permutation).
    n, n_pix, n_ch = src.shape
    tb = _TRANSPOSE_BLOCK
    n_cb = (n_ch + tb - 1) // tb
    for t in numba.prange(n * n_cb):
        b = t // n_cb
        c0 = (t - b * n_cb) * tb
        if c0 + tb <= n_ch:
            for q in range(np.uint64(n_pix)):
                for u in range(np.uint64(tb)):
                    dst[b, c0 + u, q] = src[b, q, c0 + u]
        else:
            for q in range(np.uint64(n_pix)):
                for c in range(c0, n_ch):
                    dst[b, c, q] = src[b, q, c]


def _to_channels_first(rows: Tensor, n: int, h: int, w: int) -> Tensor:
    """(N·H·W, C) channels-last rows as a contiguous (N, C, H, W) tensor."""
    c = rows.shape[1]
    out = torch.empty(n, c, h, w, dtype=rows.dtype)
    if out.numel() > 0:
        _numba_threads.launch(
            _to_channels_first_kernel,
            rows.reshape(n, h * w, c).numpy(),
            out.reshape(n, c, h * w).numpy(),
        )
    return out


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
        x = input.detach().to(dt).permute(0, 2, 3, 1).contiguous()
        self.height, self.width = x.shape[1], x.shape[2]
        self.x_nhwc = x
        self.x2 = x.reshape(-1, self.c_in)  # (N·H·W, C_in)
        shape = (self.n, self.n_off, self.k, 2, self.length)
        self.off = offset.detach().to(dt).contiguous().reshape(shape)
        self.has_mask = mask is not None
        self.mask = (
            mask.detach().to(dt).contiguous().reshape(self.n, self.n_off, self.k, self.length)
            if mask is not None
            else x.new_zeros(1, 1, 1, 1)
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
            self.x2.numpy(), self.height, self.width, self.off.numpy(), self.mask.numpy(),
            self.has_mask, self.base_y.numpy(), self.base_x.numpy(),
        )  # fmt: skip

    def w_t(self) -> Tensor:
        """(K, cog, C_in): ``[k, j, c]`` = weight[(c // C_pg)·cog + j, c % C_pg, k]."""
        w = self.weight.reshape(self.groups, self.cog, self.c_pg, self.k)
        return w.permute(3, 1, 0, 2).reshape(self.k, self.cog, self.c_in).contiguous()


def _channel_block(c_per: int, tasks_per_block: int) -> int:
    """Channels per backward task: ``_BLOCK``, halved (down to 8) until there are enough tasks."""
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
        (N, C_out, H_out, W_out), contiguous, in ``input``'s dtype (computed in float64 for
        float64 inputs, float32 otherwise).
    """
    p = _Problem(input, offset, mask, weight, stride, padding, dilation)
    b = torch.zeros(p.c_out, dtype=p.dtype) if bias is None else bias.detach().to(p.dtype)
    if not p.depthwise:  # writes channels-first itself
        out = torch.empty(p.n, p.c_out, p.h_out, p.w_out, dtype=p.dtype)
        if out.numel() > 0:
            _numba_threads.launch(
                _forward_grouped,
                *p.common(),
                p.w_t().numpy(),
                p.c_pg,
                b.contiguous().numpy(),
                out.reshape(p.n, p.c_out, p.length).numpy(),
            )
        return out.to(input.dtype)
    # Depthwise accumulates each output element over the kernel points: channels-last rows
    # (contiguous), then one transpose.
    out_rows = torch.empty(p.n * p.length, p.c_out, dtype=p.dtype)
    if out_rows.numel() > 0:
        w_kc = p.weight.reshape(p.c_out, p.k).t().contiguous()
        _numba_threads.launch(
            _forward_depthwise,
            *p.common(),
            w_kc.numpy(),
            b.contiguous().numpy(),
            out_rows.numpy(),
        )
    return _to_channels_first(out_rows, p.n, p.h_out, p.w_out).to(input.dtype)


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
    go = grad_output.detach().to(p.dtype).permute(0, 2, 3, 1).contiguous()
    go = go.reshape(p.n * p.length, p.c_out)
    c_per = p.c_in // p.n_off
    slots = max(1, min(p.n, SLOTS))
    block = _channel_block(c_per, slots * p.n_off)
    n_blocks = max(1, -(-c_per // block))
    gx = torch.zeros_like(p.x2)
    g_w = torch.zeros(slots if need_w else 1, p.k, p.cog, p.c_in, dtype=p.dtype)
    g_off = p.x2.new_zeros(n_blocks if need_om else 1, *p.off.shape)
    g_mask = p.x2.new_zeros(n_blocks if need_om else 1, p.n, p.n_off, p.k, p.length)
    go_base = torch.arange(p.c_in) // p.c_pg * p.cog
    if go.numel() > 0 and (need_x or need_om or need_w):
        _numba_threads.launch(
            _backward, *p.common(), go.numpy(), p.w_t().numpy(), go_base.numpy(), p.c_pg, block,
            n_blocks, slots, need_x, need_om, need_w,
            gx.numpy(), g_off.numpy(), g_mask.numpy(), g_w.numpy(),
        )  # fmt: skip
    # Partials summed in a fixed order: bitwise reproducible.
    grad_off, grad_m = g_off[0], g_mask[0]
    for i in range(1, g_off.shape[0]):
        grad_off = grad_off + g_off[i]
        grad_m = grad_m + g_mask[i]
    gw = g_w[0]
    for i in range(1, g_w.shape[0]):
        gw = gw + g_w[i]
    if not need_off:
        grad_off = torch.zeros_like(grad_off)
    if not need_mask:
        grad_m = torch.zeros_like(grad_m)
    grad_input = _to_channels_first(gx, p.n, p.height, p.width).to(input.dtype)
    grad_offset = grad_off.reshape(offset.shape).to(offset.dtype)
    grad_mask = grad_m.reshape(mask.shape).to(mask.dtype) if mask is not None else None
    # (K, cog, C_in) -> (C_out, C_pg, K_h, K_w)
    grad_weight = gw.reshape(p.k, p.cog, p.groups, p.c_pg).permute(2, 1, 3, 0)
    grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
    grad_bias = None
    if bias is not None:
        grad_bias = go.sum(0).to(bias.dtype) if need_b else torch.zeros_like(bias)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
