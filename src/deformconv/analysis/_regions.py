"""The paper's protocol for effective dilation by object size (Dai et al. 2017, Table 2).

Objects are bucketed small / medium / large by the terciles of their bounding-box
areas over the whole test set; every filter application (output unit) belongs to the
smallest box containing its centre, or to the background when no box does; the
effective dilation of each unit is then summarised per region.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["REGIONS", "area_terciles", "assign_units", "region_statistics", "size_buckets"]

REGIONS = ("small", "medium", "large", "background")
"""Region names; a unit's region index points into this tuple (3 is background)."""


def _check_boxes(where: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{where}: boxes must be (M, 4) as x1, y1, x2, y2; got shape {tuple(boxes.shape)}"
        )


def _areas(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def area_terciles(boxes: Tensor) -> Tensor:
    """The 1/3 and 2/3 quantiles of the box areas (the small / medium / large limits).

    Args:
        boxes: (M, 4) ``x1, y1, x2, y2`` of every object of the evaluation set, M >= 1.

    Returns:
        (2,) float: ``[t1, t2]``; see :func:`size_buckets`.

    Example:
        >>> boxes = torch.tensor([[0, 0, s, s] for s in (1, 2, 3, 4, 5, 6)]).float()
        >>> area_terciles(boxes)
        tensor([ 7.3333, 19.0000])
    """
    _check_boxes("area_terciles", boxes)
    if len(boxes) == 0:
        raise ValueError("area_terciles: boxes must hold at least one box; got 0")
    q = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    return torch.quantile(_areas(boxes).double(), q).float()


def size_buckets(boxes: Tensor, terciles: Tensor) -> Tensor:
    """Size bucket of each box: 0 small (area < t1), 1 medium (< t2), 2 large.

    Args:
        boxes: (M, 4) ``x1, y1, x2, y2``.
        terciles: (2,) from :func:`area_terciles`.

    Returns:
        (M,) int64 in {0, 1, 2}.

    Example:
        >>> boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 3, 3], [0, 0, 9, 9]]).float()
        >>> size_buckets(boxes, torch.tensor([5.0, 20.0]))
        tensor([0, 1, 2])
    """
    _check_boxes("size_buckets", boxes)
    if terciles.shape != (2,):
        raise ValueError(
            f"size_buckets: terciles must have shape (2,); got {tuple(terciles.shape)}"
        )
    areas = _areas(boxes)
    return (areas >= terciles[0]).long() + (areas >= terciles[1]).long()


def assign_units(
    boxes: Tensor,
    buckets: Tensor,
    size: tuple[int, int],
    *,
    stride: float,
    origin: float = 0.0,
) -> Tensor:
    """Region of every unit of a feature map: the bucket of the smallest box holding its centre.

    Unit (i, j) of an H_out x W_out map is centred on pixel
    ``(origin + stride·i, origin + stride·j)`` in pixel-index coordinates (pixel p spans
    [p, p + 1)), so a box ``x1, y1, x2, y2`` (exclusive ends) holds it when
    ``x1 <= x < x2`` and ``y1 <= y < y2``. Among the boxes that hold it, the one of
    smallest area decides; a unit no box holds is background (index 3).

    Args:
        boxes: (M, 4) ``x1, y1, x2, y2`` of one image's objects (M may be 0).
        buckets: (M,) size bucket of each box (:func:`size_buckets`).
        size: (H_out, W_out) of the map.
        stride: pixels between adjacent units.
        origin: pixel of unit 0's centre.

    Returns:
        (H_out, W_out) int64 region index into :data:`REGIONS`.

    Example:
        >>> boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 5.0, 5.0]])
        >>> assign_units(boxes, torch.tensor([2, 0]), (3, 3), stride=4)
        tensor([[2, 2, 3],
                [2, 0, 3],
                [3, 3, 3]])
    """
    where = "assign_units"
    _check_boxes(where, boxes)
    if buckets.shape != boxes.shape[:1]:
        raise ValueError(
            f"{where}: buckets must have shape ({len(boxes)},) like boxes; "
            f"got {tuple(buckets.shape)}"
        )
    h, w = size
    y = origin + stride * torch.arange(h, dtype=torch.float64)
    x = origin + stride * torch.arange(w, dtype=torch.float64)
    regions = torch.full((h, w), len(REGIONS) - 1, dtype=torch.int64)
    if len(boxes) == 0:
        return regions
    b = boxes.double()
    inside = (
        (y[None, :, None] >= b[:, 1, None, None])
        & (y[None, :, None] < b[:, 3, None, None])
        & (x[None, None, :] >= b[:, 0, None, None])
        & (x[None, None, :] < b[:, 2, None, None])
    )  # (M, H, W)
    areas = torch.where(inside, _areas(b)[:, None, None], torch.inf)
    smallest = areas.argmin(dim=0)
    held = inside.any(dim=0)
    regions[held] = buckets.long()[smallest[held]]
    return regions


def region_statistics(values: Tensor, regions: Tensor) -> list[dict[str, Any]]:
    """Mean, standard deviation and count of ``values`` per region.

    Args:
        values: any shape, e.g. (N, H_out, W_out) effective dilations.
        regions: the same shape, region indices into :data:`REGIONS`.

    Returns:
        One ``{"bucket", "mean", "std", "count"}`` per region in :data:`REGIONS` order
        (NaN mean/std for an empty region; std is the sample standard deviation).

    Example:
        >>> stats = region_statistics(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 0, 3]))
        >>> for s in stats:
        ...     print(s["bucket"], s["mean"], s["count"])
        small 2.0 2
        medium nan 0
        large nan 0
        background 2.0 1
    """
    if values.shape != regions.shape:
        raise ValueError(
            f"region_statistics: values and regions must have the same shape; "
            f"got {tuple(values.shape)} and {tuple(regions.shape)}"
        )
    rows = []
    flat_v, flat_r = values.reshape(-1).double(), regions.reshape(-1)
    for k, name in enumerate(REGIONS):
        chosen = flat_v[flat_r == k]
        rows.append(
            {
                "bucket": name,
                "mean": float(chosen.mean()) if len(chosen) else float("nan"),
                "std": float(chosen.std()) if len(chosen) > 1 else float("nan"),
                "count": len(chosen),
            }
        )
    return rows
