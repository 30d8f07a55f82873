"""Layout changes and per-thread scratch for the Numba kernels.

NCHW <-> channels-last rows by Numba transposes of 8x8 tiles in registers, a task per
32 pixels of an image (2.5-3x faster than torch's permute-copy here); the copy to
channels-last can also return the per-channel sums (a bias gradient) in an order fixed by
the shapes. Small tensors (:data:`SMALL_ELEMENTS`) take torch's copy instead.
``_scratch`` hands out buffers that each calling thread keeps for its next call, up to
:data:`_KEEP_BYTES` in all: fresh memory costs a page fault per 4 KiB page on first touch,
more than the copy into it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
from torch import Tensor

from deformconv.kernels import _numba_threads
from deformconv.kernels._simd import LANES, lanes_pointer, vadd, vload, vstore

__all__: list[str] = []

_jit: Any = numba.njit(parallel=True, cache=True, nogil=True, fastmath=False, error_model="numpy")


@intrinsic
def _transpose8(typingctx: Any, src: Any, r: Any, c: Any, dst: Any, rr: Any, cc: Any) -> Any:
    """``dst[rr + j, cc + i] = src[r + i, c + j]`` for i, j < 8, in registers.

    Eight vector loads, the usual three rounds of shuffles (pairs, quads, halves), eight
    vector stores: no scalar access per element.
    """
    sig = types.none(src, r, c, dst, rr, cc)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        a, row, col, d, drow, dcol = args
        lane = context.get_value_type(src.dtype)
        vptr = ir.VectorType(lane, LANES).as_pointer()
        align = context.get_abi_sizeof(lane)
        i32 = ir.IntType(32)

        def pick(x: Any, y: Any, lanes: list[int]) -> Any:
            return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, LANES), lanes))

        v = []
        for i in range(LANES):
            at = builder.add(row, context.get_constant(sig.args[1], i))
            ptr = lanes_pointer(context, builder, sig.args[0], a, at, col)
            v.append(builder.load(builder.bitcast(ptr, vptr), align=align))
        # rows (a, b): a0 b0 a1 b1 a4 b4 a5 b5 and a2 b2 a3 b3 a6 b6 a7 b7
        t = []
        for i in range(0, LANES, 2):
            t.append(pick(v[i], v[i + 1], [0, 8, 1, 9, 4, 12, 5, 13]))
            t.append(pick(v[i], v[i + 1], [2, 10, 3, 11, 6, 14, 7, 15]))
        # four rows: a0 b0 c0 d0 a4 b4 c4 d4, then columns 1 | 5, 2 | 6, 3 | 7
        u = []
        for i in (0, 4):
            for x, y in ((t[i], t[i + 2]), (t[i + 1], t[i + 3])):
                u.append(pick(x, y, [0, 1, 8, 9, 4, 5, 12, 13]))
                u.append(pick(x, y, [2, 3, 10, 11, 6, 7, 14, 15]))
        # eight rows: column j of the block
        cols = [pick(u[j], u[j + 4], [0, 1, 2, 3, 8, 9, 10, 11]) for j in range(4)]
        cols += [pick(u[j], u[j + 4], [4, 5, 6, 7, 12, 13, 14, 15]) for j in range(4)]
        for j in range(LANES):
            at = builder.add(drow, context.get_constant(sig.args[4], j))
            ptr = lanes_pointer(context, builder, sig.args[3], d, at, dcol)
            builder.store(cols[j], builder.bitcast(ptr, vptr), align=align)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always")
def _transpose_block(src, r, c, dst, rr, cc, n_r, n_c):  # pragma: no cover
    """``dst[rr + j, cc + i] = src[r + i, c + j]`` for i < n_r, j < n_c: 8x8 tiles, then edges."""
    eight = np.uint64(LANES)
    r8 = n_r // eight * eight
    c8 = n_c // eight * eight
    for j in range(np.uint64(0), c8, eight):
        for i in range(np.uint64(0), r8, eight):
            _transpose8(src, r + i, c + j, dst, rr + j, cc + i)
    for j in range(c8, n_c):
        for i in range(n_r):
            dst[rr + j, cc + i] = src[r + i, c + j]
    for j in range(c8):
        for i in range(r8, n_r):
            dst[rr + j, cc + i] = src[r + i, c + j]


#: Pixels per transpose task: the task writes (or reads) whole channels-last rows, 32 of
#: them (32 KiB of float32 at C = 256), and 128 bytes of each channels-first row. Tasks of
#: 16-channel blocks instead (all pixels of an image) were 2.6x slower to channels-last.
_TRANSPOSE_PIXELS = 32


@numba.njit(inline="always")
def _pixel_block(t, n_pb, n_pix):  # pragma: no cover
    """Task t's image b, first pixel q and pixel count: ``n_pb`` blocks per image."""
    b = t // n_pb
    q = (t - b * n_pb) * _TRANSPOSE_PIXELS
    return b, q, min(_TRANSPOSE_PIXELS, n_pix - q)


@_jit
def _to_channels_first_kernel(src, dst, n_ch, b0):  # pragma: no cover
    # src: (n·P, C) -> images b0 .. b0 + n of dst: (N·C, P); a task turns a block of
    # pixels of one image.
    n_pix = dst.shape[1]
    n = src.shape[0] // n_pix
    n_pb = (n_pix + _TRANSPOSE_PIXELS - 1) // _TRANSPOSE_PIXELS
    for t in numba.prange(n * n_pb):
        b, q, step = _pixel_block(t, n_pb, n_pix)
        _transpose_block(
            src, np.uint64(b * n_pix + q), np.uint64(0), dst, np.uint64((b0 + b) * n_ch),
            np.uint64(q), np.uint64(step), np.uint64(n_ch),
        )  # fmt: skip


@_jit
def _transpose_each_kernel(src, dst, n_r, n_c):  # pragma: no cover
    # src: (T·n_r, n_c) -> dst: (T·n_c, n_r), each of the T stacked matrices transposed
    # (a task each: a weight's output channel, a few KiB).
    for t in numba.prange(src.shape[0] // n_r):
        _transpose_block(
            src, np.uint64(t * n_r), np.uint64(0), dst, np.uint64(t * n_c), np.uint64(0),
            np.uint64(n_r), np.uint64(n_c),
        )  # fmt: skip


@_jit
def _to_channels_last_kernel(src, dst, n_ch, with_sums, part, sums):  # pragma: no cover
    # src: (N·C, P) -> dst: (N·P, C), tasks as in _to_channels_first_kernel. With with_sums,
    # also sums[c] = Σ src[:, c, :] in float64: task t's rows summed in pixel order while
    # they are in cache (part[t]), then the tasks' partials in task order.
    n_pix = src.shape[1]
    n = src.shape[0] // n_ch
    n_pb = (n_pix + _TRANSPOSE_PIXELS - 1) // _TRANSPOSE_PIXELS
    for t in numba.prange(n * n_pb):
        b, q, step = _pixel_block(t, n_pb, n_pix)
        row = np.uint64(b * n_pix + q)
        _transpose_block(
            src, np.uint64(b * n_ch), np.uint64(q), dst, row, np.uint64(0), np.uint64(n_ch),
            np.uint64(step),
        )  # fmt: skip
        if with_sums:
            _rows_sum(dst, row, step, part, np.uint64(t))
    if with_sums:
        _sum_partials(part, n * n_pb, sums)


@_jit
def _column_sums_kernel(rows, n_pix, part, sums):  # pragma: no cover
    # sums[c] = Σ rows[:, c] for rows already channels-last, in _to_channels_last_kernel's
    # order: the same sums, bit for bit, whatever the layout of the source.
    n = rows.shape[0] // n_pix
    n_pb = (n_pix + _TRANSPOSE_PIXELS - 1) // _TRANSPOSE_PIXELS
    for t in numba.prange(n * n_pb):
        b, q, step = _pixel_block(t, n_pb, n_pix)
        _rows_sum(rows, np.uint64(b * n_pix + q), step, part, np.uint64(t))
    _sum_partials(part, n * n_pb, sums)


@numba.njit(inline="always")
def _sum_partials(part, n_part, sums):  # pragma: no cover
    """``sums[c] = Σ_t part[t, c]`` for t < n_part, in float64, t in order."""
    for c in numba.prange(part.shape[1]):
        s = 0.0
        for t in range(n_part):
            s += np.float64(part[t, c])
        sums[c] = s


@numba.njit(inline="always")
def _rows_sum(a, r, n_r, out, o):  # pragma: no cover
    """``out[o, c] = Σ_i a[r + i, c]`` for i < n_r (n_r >= 1), rows added in order."""
    n_c = np.uint64(a.shape[1])
    eight = np.uint64(LANES)
    c8 = n_c // eight * eight
    for c in range(np.uint64(0), c8, eight):
        vstore(out, o, c, vload(a, r, c))
    for c in range(c8, n_c):
        out[o, c] = a[r, c]
    for i in range(1, n_r):
        ri = r + np.uint64(i)
        for c in range(np.uint64(0), c8, eight):
            vstore(out, o, c, vadd(vload(out, o, c), vload(a, ri, c)))
        for c in range(c8, n_c):
            out[o, c] += a[ri, c]


#: Tensors with fewer elements than this are laid out by torch's copy: a parallel launch
#: costs more than it saves there, and a first small call compiles no layout kernel.
SMALL_ELEMENTS = 2**16


def _channels_last_into(rows: Tensor, src: Tensor, with_sums: bool = False) -> Tensor | None:
    """Copy (N, C, H, W) ``src`` into the (N·H·W, C) ``rows`` (rows' dtype).

    With ``with_sums``, also returns the per-channel sum of ``src`` (C,), float64, summed
    in an order fixed by the shapes.
    """
    n, c, h, w = src.shape
    src = src.detach().to(rows.dtype)
    if src.numel() < SMALL_ELEMENTS:
        rows.view(n, h, w, c).copy_(src.permute(0, 2, 3, 1))
        return rows.sum(0, dtype=torch.float64) if with_sums else None
    sums = torch.zeros(c, dtype=torch.float64)
    tasks = n * -(-h * w // _TRANSPOSE_PIXELS)
    part = torch.empty(tasks if with_sums else 1, c, dtype=rows.dtype)
    if src.permute(0, 2, 3, 1).is_contiguous():  # channels-last memory already: a plain copy
        rows.view(n, h, w, c).copy_(src.permute(0, 2, 3, 1))
        if with_sums and rows.numel() > 0:
            _numba_threads.launch(
                _column_sums_kernel, rows.numpy(), h * w, part.numpy(), sums.numpy()
            )
    elif rows.numel() > 0:
        _numba_threads.launch(
            _to_channels_last_kernel, src.contiguous().reshape(n * c, h * w).numpy(),
            rows.numpy(), c, with_sums, part.numpy(), sums.numpy(),
        )  # fmt: skip
    return sums if with_sums else None


def is_channels_last(t: Tensor) -> bool:
    """Whether 4-D ``t`` is laid out channels-last and not also plain contiguous.

    Tensors that are both (one channel, or one pixel) count as plain, as torch's own
    memory-format propagation treats them.
    """
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def channels_last_rows(src: Tensor, dtype: torch.dtype) -> Tensor | None:
    """(N·H·W, C) rows viewing a channels-last ``src`` of ``dtype``, or None (a copy is due).

    A channels-last tensor's memory already holds the rows: no copy, no scratch.
    """
    if src.dtype != dtype or not is_channels_last(src):
        return None
    n, c, h, w = src.shape
    return src.detach().permute(0, 2, 3, 1).reshape(n * h * w, c)


def _rows_as_maps(rows: Tensor, n: int, h: int, w: int, channels_last: bool) -> Tensor:
    """(N·H·W, C) rows as a new (N, C, H, W) tensor, channels-last or contiguous.

    Channels-last is a plain copy of the rows (``rows`` may be scratch); contiguous is
    :func:`_to_channels_first`.
    """
    if not channels_last:
        return _to_channels_first(rows, n, h, w)
    c = rows.shape[1]
    out = torch.empty(n, h, w, c, dtype=rows.dtype)
    out.view(n * h * w, c).copy_(rows)
    return out.permute(0, 3, 1, 2)


def _to_channels_first(rows: Tensor, n: int, h: int, w: int) -> Tensor:
    """(N·H·W, C) channels-last rows as a new contiguous (N, C, H, W) tensor."""
    c = rows.shape[1]
    out = torch.empty(n, c, h, w, dtype=rows.dtype)
    _rows_into_maps(rows, out.view(n, c, h * w), 0, 0)
    return out


def _rows_into_maps(rows: Tensor, maps: Tensor, b0: int, l0: int) -> None:
    """Write channels-last ``rows`` into pixels l0 .. l0 + P of images b0, b0 + 1, ...

    ``rows``: (n·P, C) contiguous, image by image; ``maps``: (N, C, L) contiguous. P is
    L for whole images (l0 = 0, ``rows`` a multiple of L), else ``rows.shape[0]`` (a
    slice of one image). A slice takes torch's copy: one long run per channel, which
    torch copies as fast as the tiles (measured: 64 channels x 1,639 pixels, 0.036 ms
    against 0.038); whole images of 128-512 channels take the tiles, 3-4x faster.
    """
    r, c = rows.shape
    if rows.numel() == 0:
        return
    length = maps.shape[2]
    n_pix = length if l0 == 0 and r % length == 0 else r
    n = r // n_pix
    if rows.numel() < SMALL_ELEMENTS or n_pix < length:
        maps[b0 : b0 + n, :, l0 : l0 + n_pix].copy_(rows.view(n, n_pix, c).transpose(1, 2))
    else:
        _numba_threads.launch(
            _to_channels_first_kernel, rows.numpy(), maps.view(-1, length).numpy(), c, b0
        )


def _transpose_each(src: Tensor, out: Tensor) -> None:
    """``out[t] = src[t]ᵀ``: (T, A, B) contiguous into (T, B, A) contiguous, same dtype."""
    t, a, b = src.shape
    if src.numel() < SMALL_ELEMENTS or min(a, b) == 1:
        out.copy_(src.transpose(1, 2))
    else:
        _numba_threads.launch(
            _transpose_each_kernel, src.reshape(t * a, b).numpy(),
            out.view(t * b, a).numpy(), a, b,
        )  # fmt: skip


#: Scratch that a thread keeps between calls, at most this many bytes in all (the
#: channels-last input, ``grad_output`` and ``grad_input`` rows: 19 MiB for ResNeXt's res3
#: at batch 8). Fresh memory costs a page fault per 4 KiB page on first touch: 3.7 ms per
#: 6.4 MB buffer here, more than the copy into it.
_KEEP_BYTES = 64 << 20


class _Kept(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, Any], np.ndarray] = {}


_kept = _Kept()


#: Scratch starts on a cache line, as torch's own allocations do (NumPy's may start on
#: 16 bytes: BLAS reads such a weight matrix measurably slower).
_ALIGN = 64


def _aligned(size: int, dtype: np.dtype) -> np.ndarray:
    """An empty 1-D array of ``size`` elements whose data starts on ``_ALIGN`` bytes."""
    raw = np.empty(size + _ALIGN // dtype.itemsize, dtype=dtype)
    skip = (-raw.ctypes.data % _ALIGN) // dtype.itemsize
    return raw[skip : skip + size]


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _scratch(slot: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A (rows, cols) buffer for this call only, contents undefined; never return it.

    Each slot's buffer is kept for the thread's next call while the kept buffers fit
    :data:`_KEEP_BYTES`; it grows to the largest call. Held as NumPy arrays: a tensor
    made in inference mode could not be written outside it.
    """
    np_dtype = _numpy_dtype(dtype)
    size = rows * cols
    key = (slot, np_dtype)
    kept = _kept.buffers
    buf = kept.get(key)
    if buf is None or buf.size < size:
        buf = _aligned(size, np_dtype)
        others = sum(b.nbytes for k, b in kept.items() if k != key)
        if others + buf.nbytes <= _KEEP_BYTES:
            kept[key] = buf
    return torch.from_numpy(buf[:size]).view(rows, cols)
