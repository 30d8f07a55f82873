"""Figures of the segmentation demo: Figure 7 on a test scene, predictions vs ground truth."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from deformconv.analysis import assign_units, plot_sampling_locations, size_buckets
from deformconv.demos.fcn import SegmentationFCN
from deformconv.demos.scenes import NUM_CLASSES, DigitScenes, Scene

__all__ = ["pick_units", "sampling_figure", "segmentation_figure"]

_STRIDE = SegmentationFCN.stride


def pick_units(
    scenes: DigitScenes, terciles: Tensor, *, limit: int = 60
) -> tuple[int, dict[str, tuple[int, int]]]:
    """A test scene with a small and a large digit, and a unit on each and on background.

    Among the first ``limit`` scenes, the one whose largest large-bucket box and
    smallest small-bucket box (that holds at least one unit centre) differ most in
    area. The digit units are the units of each box nearest its centre; the background
    unit is the background unit farthest from both the boxes and the canvas edge (a
    unit in a corner would show mostly padding).

    Returns:
        ``(scene index, {"small digit": (row, col), "large digit": ..., "background": ...})``
        on the stride-8 map.
    """
    best: tuple[float, int, dict[str, tuple[int, int]]] | None = None
    for index in range(min(limit, len(scenes))):
        scene = scenes[index]
        size = scene.labels.shape[0] // _STRIDE, scene.labels.shape[1] // _STRIDE
        buckets = size_buckets(scene.boxes, terciles)
        regions = assign_units(scene.boxes, buckets, size, stride=_STRIDE)
        units: dict[str, tuple[int, int]] = {}
        areas: dict[str, float] = {}
        for bucket, name, pick in ((0, "small digit", min), (2, "large digit", max)):
            candidates = []
            for k in torch.nonzero(buckets == bucket).flatten().tolist():
                unit = _unit_in_box(scene.boxes[k], regions, bucket)
                if unit is not None:
                    box = scene.boxes[k]
                    candidates.append((float((box[2] - box[0]) * (box[3] - box[1])), unit))
            if candidates:
                areas[name], units[name] = pick(candidates)
        background = torch.nonzero(regions == 3)
        if len(units) < 2 or not len(background):
            continue
        points = background.double() * _STRIDE
        edge = torch.stack(
            [
                points[:, 0],
                points[:, 1],
                (size[0] - 1) * _STRIDE - points[:, 0],
                (size[1] - 1) * _STRIDE - points[:, 1],
            ],
            dim=1,
        ).amin(dim=1)
        distance = torch.minimum(_distance_to_boxes(points, scene.boxes), edge)
        units["background"] = tuple(background[int(distance.argmax())].tolist())  # type: ignore[assignment]
        ratio = areas["large digit"] / areas["small digit"]
        if best is None or ratio > best[0]:
            best = (ratio, index, units)
    if best is None:
        raise ValueError(
            f"pick_units: none of the first {limit} scenes has a small and a large digit"
        )
    return best[1], best[2]


def _unit_in_box(box: Tensor, regions: Tensor, bucket: int) -> tuple[int, int] | None:
    x1, y1, x2, y2 = box.tolist()
    cy, cx = (y1 + y2 - 1) / 2, (x1 + x2 - 1) / 2
    rows = torch.arange(regions.shape[0], dtype=torch.float64) * _STRIDE
    cols = torch.arange(regions.shape[1], dtype=torch.float64) * _STRIDE
    inside = (
        (rows[:, None] >= y1) & (rows[:, None] < y2) & (cols[None] >= x1) & (cols[None] < x2)
    ) & (regions == bucket)
    if not inside.any():
        return None
    d = (rows[:, None] - cy) ** 2 + (cols[None] - cx) ** 2
    flat = int(torch.where(inside, d, torch.inf).argmin())
    return flat // regions.shape[1], flat % regions.shape[1]


def _distance_to_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """Distance of (P, 2) (y, x) points to the nearest of (M, 4) boxes."""
    b = boxes.double()
    dy = torch.clamp(
        torch.maximum(b[None, :, 1] - points[:, :1], points[:, :1] - b[None, :, 3]), min=0
    )
    dx = torch.clamp(
        torch.maximum(b[None, :, 0] - points[:, 1:], points[:, 1:] - b[None, :, 2]), min=0
    )
    return torch.hypot(dy, dx).amin(dim=1)


def _figure_models(models: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The deepest deformable variant and plain (the paper's comparison), else what exists."""
    order = ["deform_last3", "deform_last2", "deform_last1"]
    chosen = [(v, models[v]) for v in order if v in models][:1]
    if "plain" in models:
        chosen.append(("plain", models["plain"]))
    return chosen or list(models.items())[:2]


def sampling_figure(
    models: dict[str, nn.Module], scenes: DigitScenes, terciles: Tensor, path: Path
) -> Path:
    """The paper's Figure 7 on a test scene: 729 sampling locations of three units.

    One row per model (the deepest deformable variant, then plain), one column per
    unit (on a small digit, on a large digit, on background); each panel shows the
    locations of the three stacked head convolutions traced back to the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deformconv.demos.segment import trace_unit

    index, units = pick_units(scenes, terciles)
    image = scenes[index].image
    chosen = _figure_models(models)
    fig, axes = plt.subplots(len(chosen), 3, figsize=(10.5, 3.6 * len(chosen)), squeeze=False)
    for row, (variant, model) in enumerate(chosen):
        for col, (name, unit) in enumerate(units.items()):
            points, weights = trace_unit(model, image, unit)
            plot_sampling_locations(
                image,
                points,
                weights,
                (unit[0] * _STRIDE, unit[1] * _STRIDE),
                scale=_STRIDE,
                ax=axes[row, col],
                title=f"{variant}: {name}",
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _palette() -> list[tuple[float, float, float]]:
    import matplotlib

    tab = matplotlib.colormaps["tab10"]
    return [(0.0, 0.0, 0.0)] + [tuple(tab(i)[:3]) for i in range(NUM_CLASSES - 1)]  # type: ignore[misc]


@torch.no_grad()
def segmentation_figure(
    models: dict[str, nn.Module], scenes: DigitScenes, path: Path, *, count: int = 3
) -> Path:
    """Image, ground truth and each model's prediction for the first ``count`` test scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(_palette())
    shown: list[Scene] = [scenes[i] for i in range(min(count, len(scenes)))]
    columns = ["image", "ground truth", *models]
    fig, axes = plt.subplots(
        len(shown), len(columns), figsize=(2.2 * len(columns), 2.3 * len(shown)), squeeze=False
    )
    predictions = {}
    images = torch.stack([s.image for s in shown])
    for variant, model in models.items():
        model.eval()
        predictions[variant] = model(images.to(next(model.parameters()).device)).argmax(1).cpu()
    for row, scene in enumerate(shown):
        panels = [scene.labels, *(predictions[v][row] for v in models)]
        axes[row, 0].imshow(scene.image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        for col, panel in enumerate(panels, start=1):
            axes[row, col].imshow(panel.numpy(), cmap=cmap, vmin=0, vmax=NUM_CLASSES - 1)
        for col, title in enumerate(columns):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
