"""Pure-PyTorch deformable RoI pooling (DCNv1 section 2.2): the reference and the fallback.

Covers :func:`deformconv.deform_roi_pool` and :func:`deformconv.deform_ps_roi_pool`
(plain and modulated): a forward and a hand-written backward (gradients of the input,
the offsets and the mask), both in bounded memory. Arguments are validated by the
callers in ``ops`` (batch indices in range included).

How it computes. Every bin of every RoI averages a ``g_h x g_w`` grid of bilinear
samples (RoIAlign). Sample rows depend only on ``(roi, bin, i_y)`` and sample columns
only on ``(roi, bin, i_x)``, and RoIAlign's interpolation treats y and x independently,
so each bin is described by *separable corners*: ``2·g_h`` row corners and ``2·g_w``
column corners with their weights (shared by all channels, like torchvision's
``pre_calc``). RoIs are grouped by grid size (no padding) and processed in chunks; each
chunk is reduced over a channels-last copy of the input by three primitives,
:class:`ReferenceGather` here (``index_select`` + ``bmm``, ``index_add_``) or the
``embedding_bag`` ones of ``kernels/_roi_fast.py``:

- ``gather_sum``: ``out[m] = sum_{r,q} w_row[m,r]·w_col[m,q]·table[rows[m,r] + cols[m,q]]``;
- ``dot_partials``: ``out[m,a] = <grad[m], sum_b w_in[m,b]·table[outer[m,a] + inner[m,b]]>``,
  the gradient of the row (or column) weights;
- ``scatter_add_``: the transpose of ``gather_sum``, the gradient of the table.

Bounds. The adaptive grid (``sampling_ratio <= 0``) is ``min(ceil(roi_h / out_h),
max(1, MAX_ADAPTIVE_SAMPLES // out_h))`` per bin along y (likewise x), so a RoI never
takes more than about ``MAX_ADAPTIVE_SAMPLES²`` samples, whatever its size. Each
primitive works in slices whose gathered values and indices fit in
:data:`WORKSPACE_BYTES` (or hold one row of samples of one bin, if that is larger), so
the temporary memory of a call is the output, a channels-last copy of the input (and of
its gradient), per-RoI and per-bin scalars, and a bounded workspace — independent of the
size of the boxes.

The backward is written in differentiable torch ops, so autograd can differentiate it
again (double backward): eagerly through :class:`DeformRoIPoolFunction`, and behind the
custom op through the backward op's autograd formula.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "MAX_ADAPTIVE_SAMPLES",
    "WORKSPACE_BYTES",
    "GatherOps",
    "ReferenceGather",
    "adaptive_grid_cap",
    "axis_corners",
    "DeformRoIPoolFunction",
    "pool_backward",
    "pool_forward",
    "roi_grid",
]

#: Samples along each axis of a RoI (all its bins together) beyond which the adaptive
#: grid stops growing: a bin takes at most ``max(1, MAX_ADAPTIVE_SAMPLES // out)``.
MAX_ADAPTIVE_SAMPLES = 512

#: Bytes of gathered values and indices that one slice of work may hold.
WORKSPACE_BYTES = 64 << 20


def adaptive_grid_cap(out: int) -> int:
    """The most adaptive samples per bin along an axis with ``out`` bins.

    Example:
        >>> adaptive_grid_cap(7), adaptive_grid_cap(1), adaptive_grid_cap(1000)
        (73, 512, 1)
    """
    return max(1, MAX_ADAPTIVE_SAMPLES // out)


def _budget(t: Tensor) -> int:
    """The workspace in elements of ``t``'s dtype (at least 1)."""
    return max(1, WORKSPACE_BYTES // max(t.element_size(), 8))


def _slices(total: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, step):
        yield lo, min(total, lo + step)


class GatherOps(Protocol):
    """The three reductions a pooling pass needs; see the module docstring."""

    def gather_sum(
        self, table: Tensor, rows: Tensor, cols: Tensor, w_row: Tensor, w_col: Tensor
    ) -> Tensor:
        """(M, C): the weighted sum of every bin's samples."""
        ...

    def dot_partials(
        self, table: Tensor, grad: Tensor, outer: Tensor, inner: Tensor, w_inner: Tensor
    ) -> Tensor:
        """(M, A): the gradient of the weights of the ``outer`` corners."""
        ...

    def scatter_add_(
        self,
        grad_table: Tensor,
        grad: Tensor,
        rows: Tensor,
        cols: Tensor,
        w_row: Tensor,
        w_col: Tensor,
    ) -> None:
        """Add the gradient of the table into ``grad_table`` in place."""
        ...


class ReferenceGather:
    """:class:`GatherOps` with ``index_select``, ``bmm`` and ``index_add_`` (any device).

    Differentiable (twice) with respect to the table, the gradient and the weights.
    """

    @staticmethod
    def gather_sum(
        table: Tensor, rows: Tensor, cols: Tensor, w_row: Tensor, w_col: Tensor
    ) -> Tensor:
        """``out[m] = sum_{r,q} w_row[m,r]·w_col[m,q]·table[rows[m,r] + cols[m,q]]``.

        Args:
            table: (T, C).
            rows: (M, R) int64 flat row starts; ``rows[m, r] + cols[m, q]`` lies in [0, T).
            cols: (M, Q) int64.
            w_row: (M, R).
            w_col: (M, Q).

        Returns:
            (M, C).
        """
        m, r = rows.shape
        q, c = cols.shape[1], table.shape[1]
        per_row = q * (c + 2)  # gathered values plus index and weight, per (bin, row)
        r_step = max(1, min(r, _budget(table) // per_row))
        m_step = max(1, _budget(table) // (r_step * per_row)) if r_step == r else 1
        pieces = []
        for lo, hi in _slices(m, m_step):
            acc: Tensor | None = None
            for r0, r1 in _slices(r, r_step):
                index = rows[lo:hi, r0:r1, None] + cols[lo:hi, None, :]
                weight = w_row[lo:hi, r0:r1, None] * w_col[lo:hi, None, :]
                gathered = table.index_select(0, index.reshape(-1))
                part = torch.bmm(weight.reshape(hi - lo, 1, -1), gathered.reshape(hi - lo, -1, c))[
                    :, 0
                ]
                acc = part if acc is None else acc + part
            assert acc is not None  # r >= 2 always
            pieces.append(acc)
        if not pieces:
            return table.new_zeros(0, c)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    @staticmethod
    def dot_partials(
        table: Tensor, grad: Tensor, outer: Tensor, inner: Tensor, w_inner: Tensor
    ) -> Tensor:
        """``out[m, a] = <grad[m], sum_b w_inner[m, b]·table[outer[m, a] + inner[m, b]]>``.

        Args:
            table: (T, C).
            grad: (M, C).
            outer: (M, A) int64.
            inner: (M, B) int64.
            w_inner: (M, B).

        Returns:
            (M, A).
        """
        m, a = outer.shape
        b, c = inner.shape[1], table.shape[1]
        per_row = b * (c + 2)
        a_step = max(1, min(a, _budget(table) // per_row))
        m_step = max(1, _budget(table) // (a_step * per_row)) if a_step == a else 1
        pieces = []
        for lo, hi in _slices(m, m_step):
            parts = []
            for a0, a1 in _slices(a, a_step):
                index = outer[lo:hi, a0:a1, None] + inner[lo:hi, None, :]
                gathered = table.index_select(0, index.reshape(-1)).reshape(-1, b, c)
                weight = w_inner[lo:hi, None, :].expand(hi - lo, a1 - a0, b).reshape(-1, 1, b)
                partial = torch.bmm(weight, gathered).reshape(hi - lo, a1 - a0, c)
                parts.append((partial * grad[lo:hi, None, :]).sum(-1))
            pieces.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        if not pieces:
            return grad.new_zeros(0, a)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    @staticmethod
    def scatter_add_(
        grad_table: Tensor,
        grad: Tensor,
        rows: Tensor,
        cols: Tensor,
        w_row: Tensor,
        w_col: Tensor,
    ) -> None:
        """``grad_table[rows[m,r] + cols[m,q]] += w_row[m,r]·w_col[m,q]·grad[m]`` in place.

        Args:
            grad_table: (T, C), updated in place.
            grad: (M, C).
            rows: (M, R) int64.
            cols: (M, Q) int64.
            w_row: (M, R).
            w_col: (M, Q).
        """
        m, r = rows.shape
        q, c = cols.shape[1], grad.shape[1]
        per_row = q * (c + 2)
        r_step = max(1, min(r, _budget(grad) // per_row))
        m_step = max(1, _budget(grad) // (r_step * per_row)) if r_step == r else 1
        for lo, hi in _slices(m, m_step):
            for r0, r1 in _slices(r, r_step):
                index = rows[lo:hi, r0:r1, None] + cols[lo:hi, None, :]
                weight = w_row[lo:hi, r0:r1, None] * w_col[lo:hi, None, :]
                source = weight[..., None] * grad[lo:hi, None, None, :]
                grad_table.index_add_(0, index.reshape(-1), source.reshape(-1, c))


def axis_corners(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One axis of torchvision's RoIAlign bilinear interpolation, out-of-bounds safe.

    A coordinate ``< -1`` or ``> size`` (or NaN) reads nothing; one in ``[-1, 0]`` is
    clamped to 0 and one at or past ``size - 1`` reads the last row/column (edge
    clamping, exactly as ``torchvision.ops.roi_align``). Non-finite coordinates are
    replaced before any index is formed, so every index lies in ``[0, size)``.

    Args:
        coord: sample coordinates along one axis, any shape.
        size: the map's extent along that axis (H_in or W_in), >= 1.

    Returns:
        ``(low, high, w_low, w_high, slope)`` shaped like ``coord``: int64 indices in
        ``[0, size)``, their weights (0 for samples that read nothing), and
        ``d w_high / d coord`` (``= -d w_low / d coord``: 1 where the sample moves
        between its corners, 0 where it reads nothing or is clamped).
    """
    valid = (coord >= -1) & (coord <= size)  # False for NaN
    c = torch.where(valid, coord, torch.zeros_like(coord))
    moving = valid & (c >= 0)  # clamp(min=0) passes the gradient where c >= 0, as torch
    c = c.clamp(min=0)
    low = torch.floor(c).long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    v = valid.to(c.dtype)
    slope = (moving & ~at_edge).to(c.dtype)
    return low, high, (1 - frac) * v, frac * v, slope


def roi_grid(
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-RoI geometry (start corner, extent, sampling grid) as RoIAlign computes it.

    Args:
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]`` in input-image coordinates.
        output_size: (out_h, out_w).
        spatial_scale: factor from image to feature-map coordinates.
        sampling_ratio: samples per bin and axis; 0 picks ``ceil(roi_size / out_size)``,
            at most :func:`adaptive_grid_cap` of the axis' bins.
        aligned: shift boxes by -0.5 (pixel centres); else clamp their size to >= 1.

    Returns:
        ``(start_y, start_x, roi_h, roi_w, grid_h, grid_w)``, each (K,): the start and
        extent in feature-map pixels (finite floats), and the samples per bin along y
        and x (int64, >= 0; 0 for a RoI with a non-finite coordinate or extent, which
        then reads 0).
    """
    shift = 0.5 if aligned else 0.0
    box = rois[:, 1:5] * spatial_scale - shift
    start_x, start_y, end_x, end_y = box.unbind(dim=1)
    roi_w, roi_h = end_x - start_x, end_y - start_y
    finite = torch.isfinite(box).all(dim=1) & torch.isfinite(roi_w) & torch.isfinite(roi_h)

    def keep(t: Tensor) -> Tensor:
        return torch.where(finite, t, torch.zeros_like(t))

    start_x, start_y, roi_w, roi_h = keep(start_x), keep(start_y), keep(roi_w), keep(roi_h)
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    out_h, out_w = output_size
    if sampling_ratio > 0:
        grid_h = torch.full_like(start_y, sampling_ratio, dtype=torch.int64)
        grid_w = grid_h.clone()
    else:
        # Clamped while still floating, so no box, however large, overflows the cast.
        grid_h = torch.ceil(roi_h / out_h).clamp(0, adaptive_grid_cap(out_h)).long()
        grid_w = torch.ceil(roi_w / out_w).clamp(0, adaptive_grid_cap(out_w)).long()
    zero = torch.zeros_like(grid_h)
    return (
        start_y, start_x, roi_h, roi_w,
        torch.where(finite, grid_h, zero), torch.where(finite, grid_w, zero),
    )  # fmt: skip


def _axis(start: Tensor, bin_size: Tensor, shift: Tensor, grid: int, dim: int) -> Tensor:
    """Sample coordinates along one axis: (k, out_h, out_w, grid).

    ``start``/``bin_size``: (k,); ``shift``: (k, out_h, out_w); ``dim``: 1 for rows
    (the bin index runs along out_h), 2 for columns. The arithmetic follows
    torchvision/mmcv: ``(start + shift) + p·bin_size + (i + 0.5)·bin_size / grid``.
    """
    bins = shift.shape[dim]
    p = torch.arange(bins, device=shift.device, dtype=shift.dtype)
    slot = torch.arange(grid, device=shift.device, dtype=shift.dtype) + 0.5
    bin_start = p[None, :] * bin_size[:, None]  # (k, bins)
    inner = slot[None, :] * bin_size[:, None] / grid  # (k, grid)
    bin_start = bin_start[:, :, None] if dim == 1 else bin_start[:, None, :]
    return ((start[:, None, None] + shift) + bin_start)[..., None] + inner[:, None, None, :]


@dataclass
class _Setup:
    """Everything a pass needs about the RoIs of a validated call."""

    table: Tensor  # (N·P·H_in·W_in, C_out), channels last
    roi_size: tuple[Tensor, Tensor]  # (K,) each: roi_h, roi_w, in the RoIs' order
    # In grid order (the RoIs sorted by grid size, so each group is a slice):
    start: tuple[Tensor, Tensor]  # (K,) each: y, x
    bin_size: tuple[Tensor, Tensor]  # (K,) each
    shift: tuple[Tensor, Tensor]  # (K, out_h, out_w) each: y, x
    base: Tensor  # (K, out_h, out_w) int64: (batch·P + plane)·H_in
    order: Tensor  # (K,) grid order -> RoI index
    inverse: Tensor  # (K,) RoI index -> grid order
    size: tuple[int, int]  # (H_in, W_in)
    # Per group of RoIs sharing a non-empty grid: (g_h, g_w, first, end) in grid order.
    groups: list[tuple[int, int, int, int]]


def _setup(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
) -> _Setup:
    n, c, height, width = input.shape
    out_h, out_w = output_size
    bins = out_h * out_w
    k = rois.shape[0]
    dev = input.device
    if position_sensitive:
        c_out, planes = c // bins, bins
        # (N, C_out, P, H, W) -> (N, P, H, W, C_out): bin p reads its own plane p.
        table = input.reshape(n, c_out, bins, height, width).permute(0, 2, 3, 4, 1)
    else:
        c_out, planes = c, 1
        table = input.permute(0, 2, 3, 1)
    table = table.reshape(n * planes * height * width, c_out)

    start_y, start_x, roi_h, roi_w, grid_h, grid_w = roi_grid(
        rois, output_size, spatial_scale, sampling_ratio, aligned
    )
    if offset is not None:
        shift_x = gamma * roi_w[:, None, None] * offset[:, 0]
        shift_y = gamma * roi_h[:, None, None] * offset[:, 1]
    else:
        shift_x = shift_y = torch.zeros(k, out_h, out_w, dtype=input.dtype, device=dev)
    batch = rois[:, 0].detach().long()  # validated: integers in [0, N)
    plane = torch.arange(planes, device=dev).reshape(1, out_h, out_w) if planes > 1 else 0
    base = ((batch[:, None, None] * planes + plane) * height).expand(k, out_h, out_w)

    # Sort the RoIs by grid size (each group a slice); one host read of the distinct sizes.
    key = grid_h * (1 << 31) + grid_w
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(k, device=dev))
    groups: list[tuple[int, int, int, int]] = []
    if k > 0:
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        lo = 0
        for key_, count in zip(keys.tolist(), counts.tolist(), strict=True):
            g_h, g_w = key_ >> 31, key_ & ((1 << 31) - 1)
            if g_h > 0 and g_w > 0:  # an empty grid reads 0
                groups.append((g_h, g_w, lo, lo + count))
            lo += count
    start = (start_y[order], start_x[order])
    bin_size = ((roi_h / out_h)[order], (roi_w / out_w)[order])
    return _Setup(
        table, (roi_h, roi_w), start, bin_size, (shift_y[order], shift_x[order]), base[order],
        order, inverse, (height, width), groups,
    )  # fmt: skip


def _chunks(s: _Setup, bins: int) -> Iterator[tuple[int, int, slice]]:
    """``(g_h, g_w, RoIs in grid order)`` whose per-bin corner tables fit the workspace."""
    for g_h, g_w, first, end in s.groups:
        per_roi = bins * (g_h + g_w) * 24  # the corner tables and their temporaries
        step = max(1, _budget(s.table) // per_roi)
        for lo in range(first, end, step):
            yield g_h, g_w, slice(lo, min(end, lo + step))


def _corners(
    s: _Setup, index: slice, grid: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Separable corners of every bin of the RoIs ``index`` (grid order; one ``grid``).

    Returns:
        ``(rows, cols, w_row, w_col, d_row, d_col)`` with M = len(index)·out_h·out_w:
        (M, 2·g_h) flat row starts ``(base + y)·W_in`` (low and high corner of each
        sample row in turn), (M, 2·g_w) columns, their weights (``w_row`` includes the
        average's ``1/(g_h·g_w)``), and (M, g_h), (M, g_w) the slopes of the high
        corner's weight with respect to the sample coordinate.
    """
    (g_h, g_w), (height, width) = grid, s.size
    pick = [t[index] for t in (*s.start, *s.bin_size, *s.shift, s.base)]
    y0, x0, bh, bw, sy, sx, base = pick
    ylo, yhi, wylo, wyhi, dy = axis_corners(_axis(y0, bh, sy, g_h, 1), height)
    xlo, xhi, wxlo, wxhi, dx = axis_corners(_axis(x0, bw, sx, g_w, 2), width)
    m = ylo.shape[0] * ylo.shape[1] * ylo.shape[2]
    rows = ((torch.stack([ylo, yhi], -1) + base[..., None, None]) * width).reshape(m, -1)
    w_row = torch.stack([wylo, wyhi], -1).reshape(m, -1) / (g_h * g_w)
    cols = torch.stack([xlo, xhi], -1).reshape(m, -1)
    w_col = torch.stack([wxlo, wxhi], -1).reshape(m, -1)
    return rows, cols, w_row, w_col, dy.reshape(m, -1) / (g_h * g_w), dx.reshape(m, -1)


def _no_autocast(device_type: str) -> Any:
    """Disable autocast around the kernel's own matmuls (it computes in its dtype)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def pool_forward(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
    ops: GatherOps,
) -> Tensor:
    """Deformable (PS) RoI pooling; see :func:`deformconv.deform_roi_pool` for the math.

    Args:
        input: (N, C, H_in, W_in) with H_in, W_in >= 1; for the position-sensitive
            variant C = C_out·out_h·out_w.
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]``, input's dtype; batch indices
            validated.
        offset: (K, 2, out_h, out_w) or None; channel 0 is x, channel 1 is y.
        mask: (K, 1, out_h, out_w) or None.
        output_size: (out_h, out_w).
        spatial_scale: image-to-map scale.
        sampling_ratio: samples per bin and axis, 0 = adaptive (capped).
        gamma: offset scale.
        aligned: pixel-centre convention.
        position_sensitive: bin (i, j) of output channel c reads input channel
            ``(c·out_h + i)·out_w + j`` (``torchvision.ops.ps_roi_align``).
        ops: the reductions (:class:`ReferenceGather` or the fast ones).

    Returns:
        (K, C_out, out_h, out_w), contiguous, in ``input``'s dtype.
    """
    with _no_autocast(input.device.type), torch.no_grad():
        s = _setup(
            input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned,
            position_sensitive,
        )  # fmt: skip
        out_h, out_w = output_size
        bins, c_out = out_h * out_w, s.table.shape[1]
        k = rois.shape[0]
        out = s.table.new_zeros(k, bins, c_out)  # in grid order
        for g_h, g_w, index in _chunks(s, bins):
            rows, cols, w_row, w_col, _, _ = _corners(s, index, (g_h, g_w))
            pooled = ops.gather_sum(s.table, rows, cols, w_row, w_col)
            out[index] = pooled.reshape(-1, bins, c_out)
        out = out[s.inverse].reshape(k, out_h, out_w, c_out).permute(0, 3, 1, 2)
        if mask is not None:
            out = out * mask
        return out.contiguous()


def pool_backward(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool,
    ops: GatherOps,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`pool_forward` for (input, offset, mask); None where not needed.

    The RoIs get no gradient (as with ``torchvision.ops.roi_align``). Written in
    differentiable ops: under ``torch.enable_grad()`` with inputs that require grad,
    the results can be differentiated again.

    Args:
        grad_output: (K, C_out, out_h, out_w).
        input: see :func:`pool_forward` (and the other arguments up to ``ops``).
        rois: (K, 5).
        offset: (K, 2, out_h, out_w) or None.
        mask: (K, 1, out_h, out_w) or None.
        output_size: (out_h, out_w).
        spatial_scale: image-to-map scale.
        sampling_ratio: samples per bin and axis.
        gamma: offset scale.
        aligned: pixel-centre convention.
        position_sensitive: the PS variant.
        ops: the reductions.
        needs: which of (input, offset, mask) need a gradient.

    Returns:
        ``(grad_input, grad_offset, grad_mask)`` shaped like their arguments.
    """
    with _no_autocast(input.device.type):
        s = _setup(
            input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned,
            position_sensitive,
        )  # fmt: skip
        out_h, out_w = output_size
        bins, c_out = out_h * out_w, s.table.shape[1]
        k = rois.shape[0]
        need_input = needs[0]
        need_offset = needs[1] and offset is not None
        need_mask = needs[2] and mask is not None
        # In grid order, like the corners.
        grad = grad_output.permute(0, 2, 3, 1).reshape(k, bins, c_out)[s.order]
        m = None if mask is None else mask.reshape(k, bins)[s.order]
        grad_masked = grad if m is None else grad * m[..., None]
        zeros = s.table.new_zeros
        grad_table = zeros(s.table.shape) if need_input else None
        shift_y = zeros(k, bins) if need_offset else None
        shift_x = zeros(k, bins) if need_offset else None
        grad_m = zeros(k, bins) if need_mask else None
        for g_h, g_w, index in _chunks(s, bins):
            rows, cols, w_row, w_col, d_row, d_col = _corners(s, index, (g_h, g_w))
            gm = grad_masked[index].reshape(-1, c_out)
            if grad_table is not None:
                ops.scatter_add_(grad_table, gm, rows, cols, w_row, w_col)
            if not (need_offset or need_mask):
                continue
            # h[m, r] = <grad[m], sum_q w_col[m, q]·table[rows[m, r] + cols[m, q]]>
            h = ops.dot_partials(s.table, grad[index].reshape(-1, c_out), rows, cols, w_col)
            if grad_m is not None:
                grad_m[index] = (h * w_row).sum(1).reshape(-1, bins)
            if shift_y is not None and shift_x is not None:
                g_row = h if m is None else h * m[index].reshape(-1, 1)
                g_col = ops.dot_partials(s.table, gm, cols, rows, w_row)
                dy = ((g_row[:, 1::2] - g_row[:, 0::2]) * d_row).sum(1)
                dx = ((g_col[:, 1::2] - g_col[:, 0::2]) * d_col).sum(1)
                shift_y[index] = dy.reshape(-1, bins)
                shift_x[index] = dx.reshape(-1, bins)

        grad_input = None
        if grad_table is not None:
            n, c, height, width = input.shape
            if position_sensitive:
                grad_input = grad_table.reshape(n, bins, height, width, c_out)
                grad_input = grad_input.permute(0, 4, 1, 2, 3).reshape(n, c, height, width)
            else:
                grad_input = grad_table.reshape(n, height, width, c).permute(0, 3, 1, 2)
            grad_input = grad_input.contiguous()
        grad_offset = None
        if shift_y is not None and shift_x is not None:
            roi_h, roi_w = s.roi_size
            grad_offset = gamma * torch.stack(
                [roi_w[:, None] * shift_x[s.inverse], roi_h[:, None] * shift_y[s.inverse]], 1
            )
            grad_offset = grad_offset.reshape(k, 2, out_h, out_w)
        grad_mask = None if grad_m is None else grad_m[s.inverse].reshape(k, 1, out_h, out_w)
        return grad_input, grad_offset, grad_mask


class DeformRoIPoolFunction(torch.autograd.Function):
    """Eager reference pooling: :func:`pool_forward`, with :func:`pool_backward` as gradient.

    The backward is made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        rois: Tensor,
        offset: Tensor | None,
        mask: Tensor | None,
        output_size: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        gamma: float,
        aligned: bool,
        position_sensitive: bool,
    ) -> Tensor:
        """:func:`pool_forward` with the reference reductions; saves the inputs."""
        ctx.save_for_backward(input, rois, offset, mask)
        ctx.args = (output_size, spatial_scale, sampling_ratio, gamma, aligned, position_sensitive)
        return pool_forward(
            input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma,
            aligned, position_sensitive, ReferenceGather(),
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """:func:`pool_backward` for the inputs that need a gradient (none for ``rois``)."""
        input, rois, offset, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        size, scale, ratio, gamma, aligned, ps = ctx.args
        gi, go, gm = pool_backward(
            grad, input, rois, offset, mask, size, scale, ratio, gamma, aligned, ps,
            ReferenceGather(), (needs[0], needs[2], needs[3]),
        )  # fmt: skip
        return gi, None, go, gm, None, None, None, None, None, None
