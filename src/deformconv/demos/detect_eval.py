"""Detection metrics of the detect demo, computed by pycocotools' ``COCOeval``.

The paper's Table 3 reports mAP at IoU 0.5 and 0.7; COCO reports AP averaged over IoU
0.5:0.05:0.95 and by object size. All of them come from one ``COCOeval`` run (the
101-point interpolated precision of COCO, not VOC 2007's 11-point one): ``map50`` and
``map70`` are the mean over classes of the precision array at IoU 0.5 and 0.7.

Object sizes are ``sqrt(box area)`` in pixels, split at :data:`SIZE_EDGES` (20 and 40
pixels, about the terciles of the digit scenes' default size range, since COCO's 32
and 96 would leave almost nothing "large" on a 128-pixel canvas).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

__all__ = ["METRICS", "SIZE_EDGES", "coco_metrics"]

SIZE_EDGES = (20.0, 40.0)
"""``sqrt(box area)`` in pixels separating small | medium | large objects."""

METRICS = ("map50", "map70", "map", "map_small", "map_medium", "map_large", "ar100")
"""Keys of :func:`coco_metrics`' result."""


def _to_coco(
    targets: Sequence[dict[str, Tensor]], num_classes: int
) -> dict[str, list[dict[str, object]]]:
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id, target in enumerate(targets):
        images.append({"id": image_id})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories: list[dict[str, object]] = [{"id": c} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_metrics(
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    num_classes: int,
) -> dict[str, float]:
    """Box AP of ``predictions`` against ``targets`` by pycocotools' ``COCOeval``.

    Args:
        predictions: per image ``{"boxes": (K, 4) x1, y1, x2, y2, "scores": (K,),
            "labels": (K,)}`` (what a torchvision detector returns in eval mode).
        targets: per image ``{"boxes": (M, 4), "labels": (M,)}``; labels in
            ``1..num_classes``.
        num_classes: number of object classes (background excluded).

    Returns:
        ``{"map50", "map70"}``: mean AP over classes at IoU 0.5 and 0.7; ``"map"``:
        AP averaged over IoU 0.5:0.05:0.95; ``"map_small"``, ``"map_medium"``,
        ``"map_large"``: that AP for objects by size (:data:`SIZE_EDGES`; NaN when a
        size has no object); ``"ar100"``: recall with up to 100 detections per image,
        averaged over IoU 0.5:0.95. Classes without ground truth are left out of the
        means. With no detection at all every AP is 0.

    Example:
        >>> import torch
        >>> one = torch.tensor([1])
        >>> target = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "labels": one}
        >>> shifted = {"boxes": torch.tensor([[12.0, 10.0, 22.0, 20.0]]),  # IoU 8/12
        ...            "scores": torch.tensor([0.9]), "labels": one}
        >>> m = coco_metrics([shifted], [target], num_classes=10)
        >>> round(m["map50"], 3), round(m["map70"], 3), round(m["map"], 3)
        (1.0, 0.0, 0.4)
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(
            f"coco_metrics: predictions and targets must have one entry per image; got "
            f"{len(predictions)} and {len(targets)}"
        )
    results = []
    for image_id, p in enumerate(predictions):
        boxes = p["boxes"].detach().cpu().tolist()
        scores = p["scores"].detach().cpu().tolist()
        labels = p["labels"].detach().cpu().tolist()
        for box, score, label in zip(boxes, scores, labels, strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                }
            )
    if not results:
        return dict.fromkeys(METRICS, 0.0)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = _to_coco(targets, num_classes)
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        small, medium = (e * e for e in SIZE_EDGES)
        evaluator.params.areaRng = [[0, 1e10], [0, small], [small, medium], [medium, 1e10]]
        evaluator.params.areaRngLbl = ["all", "small", "medium", "large"]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (IoU, recall, class, area, max dets)
    thresholds = evaluator.params.iouThrs

    def mean_ap(iou: float | None, area: int) -> float:
        p = precision[:, :, :, area, -1]
        if iou is not None:
            p = p[int(np.argmin(np.abs(thresholds - iou)))]
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else math.nan

    return {
        "map50": mean_ap(0.5, 0),
        "map70": mean_ap(0.7, 0),
        "map": mean_ap(None, 0),
        "map_small": mean_ap(None, 1),
        "map_medium": mean_ap(None, 2),
        "map_large": mean_ap(None, 3),
        "ar100": float(evaluator.stats[8]),
    }
