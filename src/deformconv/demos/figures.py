"""Figures and the effective-dilation table of a trained digits model (``deformconv visualize``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deformconv.analysis import (
    effective_dilation,
    plot_offset_field,
    plot_sampling_locations,
    trace_sampling_locations,
)
from deformconv.demos.cnn import DEFORMABLE_LAYERS, SmallCNN
from deformconv.demos.digits import BUCKETS, ScaledDigits
from deformconv.models import recording
from deformconv.nn import DeformConv2d

__all__ = [
    "dilation_markdown",
    "dilation_table",
    "make_figures",
    "pick_examples",
    "visualize",
    "write_csv",
    "write_table",
]

_REGIONS = (*BUCKETS, "background")


def _layers(model: nn.Module) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[name] for name in DEFORMABLE_LAYERS]


def _deformable_layers(model: nn.Module) -> list[DeformConv2d]:
    layers = _layers(model)
    if not all(isinstance(layer, DeformConv2d) for layer in layers):
        raise ValueError(f"the model's {DEFORMABLE_LAYERS} must be DeformConv2d layers")
    return layers  # type: ignore[return-value]


def _offset(layer: DeformConv2d) -> Tensor:
    if layer.last_offset is None:  # pragma: no cover - always run before
        raise ValueError("layer has not run forward")
    return layer.last_offset


def pick_examples(
    dataset: ScaledDigits, *, limit: int = 400
) -> dict[str, tuple[int, tuple[int, int]]]:
    """Test samples and output units for the figure: a small, medium and large digit + background.

    Each digit is the sample among the first ``limit`` whose scale is closest to
    the low end, middle and high end of the scale range; its unit is the 16x16-map
    cell nearest the centre of the digit's ink box. The background unit is the
    cell of the small digit's image farthest from its box, at least 3 cells (the
    reach of three stacked 3x3 filters) from the border.

    Returns:
        ``{region: (sample index, (row, col) on the 16x16 map)}``.
    """
    low, high = dataset.scale_range
    targets = {
        "small": low + 0.05 * (high - low),
        "medium": (low + high) / 2,
        "large": high - 0.05 * (high - low),
    }
    scales = [dataset.placement(i)[1] for i in range(min(limit, len(dataset)))]
    side = dataset.canvas // SmallCNN.stride
    chosen: dict[str, tuple[int, tuple[int, int]]] = {}
    for region, target in targets.items():
        index = min(range(len(scales)), key=lambda i: abs(scales[i] - target))
        box = dataset[index][3]
        cy, cx = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        unit = (
            min(round(cy / SmallCNN.stride), side - 1),
            min(round(cx / SmallCNN.stride), side - 1),
        )
        chosen[region] = (index, unit)
    index = chosen["small"][0]
    box = dataset[index][3] / SmallCNN.stride
    best, best_d = (3, 3), -1.0
    for r in range(3, side - 3):
        for c in range(3, side - 3):
            dy = max(float(box[0]) - r, 0.0, r - float(box[2]))
            dx = max(float(box[1]) - c, 0.0, c - float(box[3]))
            if dy * dy + dx * dx > best_d:
                best, best_d = (r, c), dy * dy + dx * dx
    chosen["background"] = (index, best)
    return chosen


@torch.no_grad()
def dilation_table(
    model: nn.Module, dataset: ScaledDigits, *, samples: int = 512, margin: float = 4.0
) -> list[dict[str, Any]]:
    """Effective dilation per deformable layer, by region (the paper's Table 2).

    Every unit (i, j) of the 16x16 maps sits on pixel (4i, 4j). A unit inside a
    digit's ink box counts for that digit's size bucket; a unit more than ``margin``
    pixels outside it counts as background; units in between are left out.

    Args:
        model: a :class:`SmallCNN` with its three blocks deformable.
        dataset: the test set.
        samples: how many test samples to use.
        margin: pixels between a box and the background region.

    Returns:
        One row per layer: ``{"layer", <region>_mean, <region>_std, <region>_units}``.
    """
    model.eval()
    layers = _deformable_layers(model)
    sums: dict[str, dict[str, list[Tensor]]] = {
        name: {r: [] for r in _REGIONS} for name in DEFORMABLE_LAYERS
    }
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(min(samples, len(dataset)))), batch_size=128
    )
    device = next(model.parameters()).device
    for images, _, buckets, boxes in loader:
        with recording(model):
            model(images.to(device))
        side = _offset(layers[0]).shape[-1]
        pos = torch.arange(side, dtype=torch.float32) * SmallCNN.stride
        y, x = pos[None, :, None], pos[None, None, :]
        b = boxes[:, :, None, None]
        inside = (y >= b[:, 0]) & (y < b[:, 2]) & (x >= b[:, 1]) & (x < b[:, 3])
        far = (
            (y < b[:, 0] - margin)
            | (y >= b[:, 2] + margin)
            | (x < b[:, 1] - margin)
            | (x >= b[:, 3] + margin)
        )
        for name, layer in zip(DEFORMABLE_LAYERS, layers, strict=True):
            d = effective_dilation(_offset(layer), layer.kernel_size, layer.dilation)
            d = d.mean(1).cpu()  # (N, H, W), groups averaged
            for k, region in enumerate(BUCKETS):
                sums[name][region].append(d[inside & (buckets == k)[:, None, None]])
            sums[name]["background"].append(d[far])
    rows = []
    for name in DEFORMABLE_LAYERS:
        row: dict[str, Any] = {"layer": name}
        for region in _REGIONS:
            values = torch.cat(sums[name][region]) if sums[name][region] else torch.empty(0)
            row[f"{region}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{region}_std"] = float(values.std()) if len(values) > 1 else float("nan")
            row[f"{region}_units"] = len(values)
        rows.append(row)
    return rows


def mean_std_cell(values: list[float], scale: float = 100.0) -> str:
    """``mean`` of ``values`` times ``scale``, ``± std`` added when there are several."""
    v = torch.tensor(values, dtype=torch.float64) * scale
    text = f"{float(v.mean()):.1f}"
    if len(v) > 1:
        text += f" ± {float(v.std()):.1f}"
    return text


def write_table(rows: list[dict[str, Any]], out_dir: Path, stem: str, markdown: str) -> None:
    """Write ``rows`` as ``<stem>.csv`` (floats to 4 places) and ``markdown`` as ``<stem>.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{stem}.csv", rows, list(rows[0]))
    (out_dir / f"{stem}.md").write_text(markdown)


def write_csv(
    path: Path, rows: list[dict[str, Any]], fields: list[str], ignore_other_keys: bool = False
) -> None:
    """Write the ``fields`` of ``rows`` as a CSV file, floats rounded to 4 places.

    A row key outside ``fields`` raises ``ValueError`` unless ``ignore_other_keys``.

    Only the file is rounded: tables and printed lines format the exact values, so a
    score never reads 53.6 in the table and 53.7 in the log (0.53652 rounded twice).
    """
    with open(path, "w", newline="") as f:
        extras: Literal["raise", "ignore"] = "ignore" if ignore_other_keys else "raise"
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction=extras)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def dilation_markdown(rows: list[dict[str, Any]]) -> str:
    """The effective-dilation table in the form of the paper's Table 2 (mean ± std)."""
    lines = ["| layer | small | medium | large | background |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[f'{r}_mean']:.2f} ± {row[f'{r}_std']:.2f}" for r in _REGIONS]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _trace(model: nn.Module, image: Tensor, unit: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Trace ``unit`` through the model's three blocks (convs or deformable convs)."""
    model.eval()
    with torch.no_grad(), recording(model):
        features = model.stem(image[None].to(next(model.parameters()).device))  # type: ignore[operator]
        model.blocks(features)  # type: ignore[operator]
    return trace_sampling_locations(
        _layers(model), unit, out_size=(features.shape[-2], features.shape[-1])
    )


def make_figures(
    deformable: nn.Module, plain: nn.Module | None, dataset: ScaledDigits, out_dir: Path
) -> list[Path]:
    """Draw ``sampling_locations.png`` and ``offset_field.png`` into ``out_dir``.

    ``sampling_locations.png``: for a small, medium and large digit and a background
    unit, the 729 sampling locations of one unit of the last block traced back to the
    image (shaded by the product of masks when modulated), for the deformable model
    (top row) and the plain one (bottom row, if given). ``offset_field.png``: the
    last deformable layer's mean offset per unit, coloured by effective dilation,
    over a small and a large digit.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    examples = pick_examples(dataset)
    models = [("deformable", deformable)] + ([("plain", plain)] if plain is not None else [])
    fig, axes = plt.subplots(len(models), 4, figsize=(12, 3.2 * len(models)), squeeze=False)
    for row, (kind, model) in enumerate(models):
        for col, (region, (index, unit)) in enumerate(examples.items()):
            image = dataset[index][0]
            points, weights = _trace(model, image, unit)
            pixel = (unit[0] * SmallCNN.stride, unit[1] * SmallCNN.stride)
            plot_sampling_locations(
                image,
                points,
                weights,
                pixel,
                scale=SmallCNN.stride,
                ax=axes[row, col],
                title=f"{kind}: {region} ({dataset.placement(index)[1]:.1f}x)",
            )
    fig.tight_layout()
    paths = [out_dir / "sampling_locations.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    last = _deformable_layers(deformable)[-1]
    for ax, region in zip(axes, ("small", "large"), strict=True):
        index = examples[region][0]
        image = dataset[index][0]
        _trace(deformable, image, examples[region][1])
        plot_offset_field(
            image,
            _offset(last)[0],
            last.kernel_size,
            last.dilation,  # type: ignore[index]
            scale=SmallCNN.stride,
            ax=ax,
            title=f"{DEFORMABLE_LAYERS[-1]} offsets: {region} digit",
        )
    fig.tight_layout()
    paths.append(out_dir / "offset_field.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def visualize(
    deformable: nn.Module,
    plain: nn.Module | None,
    dataset: ScaledDigits,
    out_dir: Path,
    *,
    samples: int = 512,
    log: Any = print,
) -> list[Path]:
    """Figures plus ``effective_dilation.csv``/``.md``; prints the table. Returns the paths."""
    paths = make_figures(deformable, plain, dataset, out_dir)
    rows = dilation_table(deformable, dataset, samples=samples)
    markdown = dilation_markdown(rows)
    write_table(rows, out_dir, "effective_dilation", markdown)
    log(f"effective dilation (mean ± std over units; {samples} test samples):")
    log(markdown)
    return [*paths, out_dir / "effective_dilation.csv", out_dir / "effective_dilation.md"]
