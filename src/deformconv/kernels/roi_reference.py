"""Pure-PyTorch deformable RoI pooling (DCNv1 section 2.2): the reference and the fallback.

Covers :func:`deformconv.deform_roi_pool` and :func:`deformconv.deform_ps_roi_pool`
(plain and modulated). Differentiable by autograd (twice) with respect to the input,
the offsets and the mask, written with indexing + ``bmm`` only, so it runs wherever
torch runs. Arguments are validated by the callers in ``ops``.

How it computes. Every bin of every RoI averages a ``g_h x g_w`` grid of bilinear
samples (RoIAlign). Sample rows depend only on ``(roi, bin, i_y)`` and sample columns
only on ``(roi, bin, i_x)``, and RoIAlign's interpolation treats y and x
independently, so the kernel builds per-axis corner indices and weights (shared by all
channels, like torchvision's ``pre_calc``) and combines them into one flat list of
``4·g_h·g_w`` (table row, weight) pairs per bin. RoIs are grouped by their grid size,
so no bin carries padding. Each group is reduced over a channels-last copy of the
input by a *gather-sum* ``out[m] = sum_s weight[m, s] · table[index[m, s]]``: here
:func:`gather_sum` (``index_select`` + ``bmm``, in chunks of bounded memory); the
Numba path in ``ops/roi_pool.py`` swaps in its own kernel for that one step, so
everything that produces the weights (and hence the offset and mask gradients) is
shared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Corners",
    "GatherSum",
    "axis_corners",
    "reduce_groups",
    "deform_roi_pool",
    "roi_grid",
    "separable_gather_sum",
]

#: One bin group's separable corners ``(rows (M, R), cols (M, Q), w_row (M, R),
#: w_col (M, Q))``; see :func:`separable_gather_sum`.
Corners = tuple[Tensor, Tensor, Tensor, Tensor]

#: ``(table (T, C), groups) -> [(M_g, C) per group]``: the gather-sum of every group.
GatherSum = Callable[[Tensor, list[Corners]], list[Tensor]]

# Elements of the gathered (rows, S, C) buffer per chunk in separable_gather_sum.
_CHUNK_ELEMENTS = 1 << 22


def separable_gather_sum(
    table: Tensor, rows: Tensor, cols: Tensor, w_row: Tensor, w_col: Tensor
) -> Tensor:
    """``out[m] = sum_{r, q} w_row[m, r] · w_col[m, q] · table[rows[m, r] + cols[m, q]]``.

    Pure PyTorch (``index_select`` + ``bmm`` over chunks of bounded memory), twice
    differentiable with respect to ``table``, ``w_row`` and ``w_col``.

    Args:
        table: (T, C).
        rows: (M, R) int64, the flat table row of each row corner times W_in (plus the
            image/plane base); ``rows[m, r] + cols[m, q]`` lies in ``[0, T)``.
        cols: (M, Q) int64 column corners.
        w_row: (M, R), ``table``'s dtype.
        w_col: (M, Q), ``table``'s dtype.

    Returns:
        (M, C).
    """
    m, r = rows.shape
    q = cols.shape[1]
    c = table.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, r * q * c))
    pieces = []
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        index = (rows[lo:hi, :, None] + cols[lo:hi, None, :]).reshape(-1)
        weight = (w_row[lo:hi, :, None] * w_col[lo:hi, None, :]).reshape(hi - lo, 1, r * q)
        gathered = table.index_select(0, index).reshape(hi - lo, r * q, c)
        pieces.append(torch.bmm(weight, gathered)[:, 0])
    if not pieces:
        return table.new_zeros(m, c)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def reduce_groups(table: Tensor, groups: list[Corners]) -> list[Tensor]:
    """:func:`separable_gather_sum` of every group (the reference's :data:`GatherSum`)."""
    return [separable_gather_sum(table, *corners) for corners in groups]


def axis_corners(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One axis of torchvision's RoIAlign bilinear interpolation, out-of-bounds safe.

    A coordinate ``< -1`` or ``> size`` (or NaN) reads nothing; one in ``[-1, 0]`` is
    clamped to 0 and one at or past ``size - 1`` reads the last row/column (edge
    clamping, exactly as ``torchvision.ops.roi_align``). Non-finite coordinates are
    replaced before any index is formed, so every index lies in ``[0, size)``.

    Args:
        coord: sample coordinates along one axis, any shape.
        size: the map's extent along that axis (H_in or W_in), >= 1.

    Returns:
        ``(low, high, w_low, w_high)`` shaped like ``coord``: int64 indices in
        ``[0, size)`` and their weights (0 for samples that read nothing).
    """
    valid = (coord >= -1) & (coord <= size)  # False for NaN
    c = torch.where(valid, coord, torch.zeros_like(coord)).clamp(min=0)
    low = torch.floor(c).long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    v = valid.to(c.dtype)
    return low, high, (1 - frac) * v, frac * v


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
        sampling_ratio: samples per bin and axis; 0 picks ``ceil(roi_size / out_size)``.
        aligned: shift boxes by -0.5 (pixel centres); else clamp their size to >= 1.

    Returns:
        ``(start_y, start_x, roi_h, roi_w, grid_h, grid_w)``, each (K,): the start and
        extent in feature-map pixels (float), and the samples per bin along y and x
        (int64, >= 0; 0 for a RoI with a non-finite coordinate, which then reads 0).
    """
    shift = 0.5 if aligned else 0.0
    box = rois[:, 1:5] * spatial_scale - shift
    finite = torch.isfinite(box).all(dim=1)
    box = torch.where(finite[:, None], box, torch.zeros_like(box))
    start_x, start_y, end_x, end_y = box.unbind(dim=1)
    roi_w, roi_h = end_x - start_x, end_y - start_y
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    out_h, out_w = output_size
    if sampling_ratio > 0:
        grid_h = torch.full_like(start_y, sampling_ratio, dtype=torch.int64)
        grid_w = grid_h.clone()
    else:
        grid_h = torch.ceil(roi_h / out_h).clamp(min=0).long()
        grid_w = torch.ceil(roi_w / out_w).clamp(min=0).long()
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


def _bins(
    start: tuple[Tensor, Tensor],
    bin_size: tuple[Tensor, Tensor],
    shift: tuple[Tensor, Tensor],
    base: Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Separable corners of every bin of a group of RoIs that share one grid size.

    Args:
        start: (start_y, start_x), each (k,).
        bin_size: (bin_h, bin_w), each (k,).
        shift: (shift_y, shift_x), each (k, out_h, out_w).
        base: (k, out_h|1, out_w|1) int64, the table row of (image, plane) times H_in.
        grid: (g_h, g_w), both >= 1.
        size: (H_in, W_in).

    Returns:
        ``(rows, cols, w_row, w_col)``: (k·out_h·out_w, 2·g_h) flat row starts
        ``(base + y)·W_in``, (k·out_h·out_w, 2·g_w) columns, and their weights
        (``w_row`` includes the average's ``1/(g_h·g_w)``).
    """
    (g_h, g_w), (height, width) = grid, size
    ylo, yhi, wylo, wyhi = axis_corners(_axis(start[0], bin_size[0], shift[0], g_h, 1), height)
    xlo, xhi, wxlo, wxhi = axis_corners(_axis(start[1], bin_size[1], shift[1], g_w, 2), width)
    m = ylo.shape[0] * ylo.shape[1] * ylo.shape[2]
    rows = ((torch.stack([ylo, yhi], -1) + base[..., None, None]) * width).reshape(m, -1)
    w_row = torch.stack([wylo, wyhi], -1).reshape(m, -1) / (g_h * g_w)
    cols = torch.stack([xlo, xhi], -1).reshape(m, -1)
    w_col = torch.stack([wxlo, wxhi], -1).reshape(m, -1)
    return rows, cols, w_row, w_col


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    position_sensitive: bool = False,
    reduce: GatherSum = reduce_groups,
) -> Tensor:
    """Deformable (PS) RoI pooling; see :func:`deformconv.deform_roi_pool` for the math.

    Arguments are already validated (batch indices in range included). Reading the
    grid sizes back to group the RoIs costs one device sync on accelerators.

    Args:
        input: (N, C, H_in, W_in) with H_in, W_in >= 1; for the position-sensitive
            variant C = C_out·out_h·out_w.
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]``.
        offset: (K, 2, out_h, out_w) or None; channel 0 is x, channel 1 is y.
        mask: (K, 1, out_h, out_w) or None.
        output_size: (out_h, out_w).
        spatial_scale: image-to-map scale.
        sampling_ratio: samples per bin and axis, 0 = adaptive.
        gamma: offset scale.
        aligned: pixel-centre convention.
        position_sensitive: bin (i, j) of output channel c reads input channel
            ``(c·out_h + i)·out_w + j`` (``torchvision.ops.ps_roi_align``).
        reduce: the gather-sum of the bin groups (:func:`reduce_groups` by default).

    Returns:
        (K, C_out, out_h, out_w) in ``input``'s dtype; C_out = C, or C / (out_h·out_w).
    """
    out_dtype = input.dtype
    dt = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    input, rois = input.to(dt), rois.to(dt)
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
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if offset is not None:
        offset = offset.to(dt)
        shift_x = gamma * roi_w[:, None, None] * offset[:, 0]
        shift_y = gamma * roi_h[:, None, None] * offset[:, 1]
    else:
        shift_x = shift_y = torch.zeros(k, out_h, out_w, dtype=dt, device=dev)
    # Table row of (roi, bin) before adding y·W + x: ((batch·P + plane)·H).
    batch = rois[:, 0].long()
    plane = torch.arange(planes, device=dev).reshape(1, out_h, out_w) if planes > 1 else 0
    base = (batch[:, None, None] * planes + plane) * height  # (K, out_h|1, out_w|1)

    # Zero rows still connected to ``table`` (a sum over no rows), so the output keeps a
    # gradient path even when no RoI samples anything.
    nothing = table.narrow(0, 0, 0).sum(0, keepdim=True)
    if k == 0:
        out = nothing.expand(0, c_out)
    else:
        # Sort the RoIs by grid size: each group is then a contiguous slice, pooled
        # without padding, and one gather at the end restores the RoI order.
        key = grid_h * (1 << 31) + grid_w
        order = torch.argsort(key, stable=True)
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        per_roi = (start_y, start_x, bin_h, bin_w, shift_y, shift_x, base.expand(-1, out_h, out_w))
        sorted_ = [t[order] for t in per_roi]
        groups: list[Corners] = []
        pieces: list[Tensor | None] = []
        lo = 0
        for key_, count in zip(keys.tolist(), counts.tolist(), strict=True):
            g_h, g_w = key_ >> 31, key_ & ((1 << 31) - 1)
            s = slice(lo, lo + count)
            lo += count
            if g_h == 0 or g_w == 0:
                pieces.append(nothing.expand(count * bins, c_out))  # empty grid: reads 0
                continue
            y0, x0, bh, bw, sy, sx, b = (t[s] for t in sorted_)
            groups.append(_bins((y0, x0), (bh, bw), (sy, sx), b, (g_h, g_w), (height, width)))
            pieces.append(None)
        pooled = iter(reduce(table, groups))
        out = torch.cat([next(pooled) if p is None else p for p in pieces])
        out = out.reshape(k, bins, c_out)
        if len(pieces) > 1:
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(k, device=dev))
            out = out[inverse]
    out = out.reshape(k, out_h, out_w, c_out).permute(0, 3, 1, 2)
    if mask is not None:
        out = out * mask.to(dt)
    return out.to(out_dtype).contiguous()
