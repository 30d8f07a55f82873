"""Semantic segmentation of digit scenes: plain vs deformable vs atrous heads.

The experiment of the paper's Tables 1-3 in miniature: a small fully convolutional
network (:class:`~deformconv.demos.fcn.SegmentationFCN`, stride 8, a head of three
3x3 convolutions at dilation 2) is trained from scratch on
:class:`~deformconv.demos.scenes.DigitScenes` in several variants (plain, the last
1/2/3 head convolutions deformable, or all three at a fixed larger dilation), then
scored on test scenes (mIoU over 11 classes, IoU per object-size bucket), and the
effective dilation of every deformable layer is measured by the paper's protocol
(:mod:`deformconv.analysis`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from deformconv.analysis import (
    REGIONS,
    area_terciles,
    assign_units,
    effective_dilation,
    region_statistics,
    size_buckets,
    trace_sampling_locations,
)
from deformconv.demos.digits import load_digits
from deformconv.demos.fcn import HEAD_LAYERS, VARIANTS, SegmentationFCN, build_segmenter
from deformconv.demos.figures import mean_std_cell, write_csv
from deformconv.demos.scenes import NUM_CLASSES, DigitScenes, Scene, collate_scenes
from deformconv.demos.train import (
    Distributed,
    TrainConfig,
    checkpoint_name,
    load_checkpoint,
    parse_seeds,
    run_task,
)
from deformconv.models import recording
from deformconv.nn import DeformConv2d

__all__ = [
    "DEFAULT_VARIANTS",
    "dilation_markdown",
    "dilation_table",
    "evaluate_segmentation",
    "parse_variants",
    "results_markdown",
    "run",
    "run_segment",
]

DEFAULT_VARIANTS = ("plain", "deform_last3")
SIZE_BUCKETS = REGIONS[:3]


class EpochScenes(Dataset[Scene]):
    """``length`` fresh scenes per epoch: item i of epoch e is scene ``e·length + i``.

    Args:
        scenes: a :class:`DigitScenes` holding at least ``epochs·length`` scenes.
        length: scenes per epoch.
    """

    def __init__(self, scenes: DigitScenes, length: int) -> None:
        self.scenes, self.length, self.epoch = scenes, length, 0

    def set_epoch(self, epoch: int) -> None:
        """Read the scenes of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Scene:
        return self.scenes[self.epoch * self.length + index]


def parse_variants(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of :data:`~deformconv.demos.fcn.VARIANTS`.

    Example:
        >>> parse_variants("plain,deform_last3")
        ['plain', 'deform_last3']
    """
    if text.strip() == "all":
        return list(VARIANTS)
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise ValueError(
            f"demo --task segment: --variants must be 'all' or a comma-separated subset of "
            f"{list(VARIANTS)}; got {text!r}"
        )
    return list(dict.fromkeys(chosen))


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define the scenes (stored in every checkpoint)."""
    return {
        "seed": args.seed,
        "canvas": args.canvas,
        "digits_per_scene": list(args.digits_per_scene),
        "height_range": list(args.height_range),
        "train_scenes_per_epoch": args.samples_per_epoch,
        "val_scenes": args.val_samples,
        "test_scenes": args.test_samples,
    }


def build_scene_sets(
    data: dict[str, Any], epochs: int, digits: tuple[Tensor, Tensor] | None = None
) -> dict[str, Any]:
    """Train (fresh scenes each epoch), val and test scenes from a :func:`data_config`."""
    digits = digits if digits is not None else load_digits()
    common = {
        "seed": data["seed"],
        "canvas": data["canvas"],
        "digits_per_scene": tuple(data["digits_per_scene"]),
        "height_range": tuple(data["height_range"]),
        "digits": digits,
    }
    per_epoch = data["train_scenes_per_epoch"]
    return {
        "train": EpochScenes(DigitScenes("train", per_epoch * epochs, **common), per_epoch),
        "val": DigitScenes("val", data["val_scenes"], **common),
        "test": DigitScenes("test", data["test_scenes"], **common),
    }


def _loader(scenes: Dataset[Scene], batch_size: int) -> DataLoader[Scene]:
    return DataLoader(scenes, batch_size=batch_size, collate_fn=collate_scenes)


def _all_boxes(scenes: DigitScenes) -> Tensor:
    boxes = [scenes[i].boxes for i in range(len(scenes))]
    return torch.cat(boxes) if boxes else torch.zeros(0, 4)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    scenes: DigitScenes,
    *,
    terciles: Tensor,
    device: str = "cpu",
    batch_size: int = 32,
) -> dict[str, float]:
    """mIoU, pixel accuracy and IoU per object-size bucket, in eval mode.

    mIoU is the mean over the 11 classes (background included; a class absent from
    both prediction and ground truth is skipped) of ``TP / (TP + FP + FN)`` summed
    over all pixels of all scenes. The IoU of a size bucket pools its objects: for
    each object, the intersection and union of its mask with the pixels predicted as
    its class, both inside its box; the bucket's IoU is the sum of intersections over
    the sum of unions.

    Args:
        model: a segmentation network returning (N, 11, H, W) logits.
        scenes: the scenes to score.
        terciles: (2,) area limits of the size buckets (:func:`area_terciles`).
        device: torch device string.
        batch_size: scenes per forward pass.

    Returns:
        ``{"miou", "pixel_accuracy", "iou_small", "iou_medium", "iou_large"}``.
    """
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    inter = torch.zeros(3, dtype=torch.float64)
    union = torch.zeros(3, dtype=torch.float64)
    for images, labels, targets in _loader(scenes, batch_size):
        pred = model(images.to(device)).argmax(1).cpu()
        confusion += torch.bincount(
            labels.reshape(-1) * NUM_CLASSES + pred.reshape(-1), minlength=NUM_CLASSES**2
        ).reshape(NUM_CLASSES, NUM_CLASSES)
        for p, target in zip(pred, targets, strict=True):
            buckets = size_buckets(target["boxes"], terciles)
            for box, cls, mask, b in zip(
                target["boxes"].long(), target["labels"], target["masks"], buckets, strict=True
            ):
                x1, y1, x2, y2 = box.tolist()
                m = mask[y1:y2, x1:x2]
                q = p[y1:y2, x1:x2] == cls
                inter[b] += float((m & q).sum())
                union[b] += float((m | q).sum())
    tp = confusion.diag().double()
    denom = confusion.sum(0).double() + confusion.sum(1).double() - tp
    iou = tp[denom > 0] / denom[denom > 0]
    result = {
        "miou": float(iou.mean()),
        "pixel_accuracy": float(tp.sum() / confusion.sum().clamp(min=1)),
    }
    for k, name in enumerate(SIZE_BUCKETS):
        result[f"iou_{name}"] = float(inter[k] / union[k]) if union[k] > 0 else math.nan
    return result


def _head_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    return [(name, modules[name]) for name in HEAD_LAYERS]


def deformable_layers(model: nn.Module) -> list[tuple[str, DeformConv2d]]:
    """The model's deformable head convolutions as ``(name, layer)``, in forward order."""
    return [(n, m) for n, m in _head_layers(model) if isinstance(m, DeformConv2d)]


@torch.no_grad()
def dilation_table(
    model: nn.Module,
    scenes: DigitScenes,
    *,
    terciles: Tensor,
    device: str = "cpu",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Effective dilation of every deformable layer by region (the paper's Table 2).

    Every unit of a layer's output map (unit (i, j) centred on pixel (8i, 8j)) is
    assigned to the smallest box containing its centre, else to background
    (:func:`~deformconv.analysis.assign_units`); boxes are bucketed by ``terciles``.

    Returns:
        One ``{"layer", "bucket", "mean", "std", "count"}`` per layer (forward order)
        and region (small, medium, large, background); empty for a plain model.
    """
    model.eval()
    layers = deformable_layers(model)
    if not layers:
        return []
    values: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    regions: list[Tensor] = []
    stride = SegmentationFCN.stride
    for images, _, targets in _loader(scenes, batch_size):
        with recording(model):
            model(images.to(device))
        size = images.shape[-2] // stride, images.shape[-1] // stride
        for target in targets:
            buckets = size_buckets(target["boxes"], terciles)
            regions.append(assign_units(target["boxes"], buckets, size, stride=stride))
        for name, layer in layers:
            offset = layer.last_offset
            if offset is None:  # pragma: no cover - the forward pass above sets it
                raise RuntimeError(f"dilation_table: {name} did not record its offsets")
            d = effective_dilation(offset, layer.kernel_size, layer.dilation)
            values[name].append(d.mean(1).cpu())
    region = torch.stack(regions)
    rows = []
    for name, _ in layers:
        for stats in region_statistics(torch.cat(values[name]), region):
            rows.append({"layer": name, **stats})
    return rows


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table (mean ± std over seeds when there are several)."""
    head = "| variant | mIoU | IoU small | IoU medium | IoU large | val mIoU | seeds |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        cells = []
        for key in ("miou", "iou_small", "iou_medium", "iou_large", "val_miou"):
            cells.append(mean_std_cell([r[key] for r in mine]))
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {len(mine)} |")
    return "\n".join(lines) + "\n"


def dilation_markdown(rows: list[dict[str, Any]]) -> str:
    """Effective dilation in the form of the paper's Table 2 (mean ± std per region)."""
    lines = [
        "| variant | seed | layer | small | medium | large | background | large/small |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["variant"], r["seed"], r["layer"]) for r in rows)
    for variant, seed, layer in keys:
        cell = {
            r["bucket"]: r
            for r in rows
            if (r["variant"], r["seed"], r["layer"]) == (variant, seed, layer)
        }
        texts = [f"{cell[b]['mean']:.2f} ± {cell[b]['std']:.2f}" for b in REGIONS]
        ratio = cell["large"]["mean"] / cell["small"]["mean"]
        lines.append(f"| {variant} | {seed} | {layer} | " + " | ".join(texts) + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def run_segment(
    args: argparse.Namespace,
    ddp: Distributed,
    *,
    on_epoch_end: Callable[[int], None] | None = None,
) -> int:
    """Train every variant for every seed, evaluate, write tables and figures (rank 0).

    Args:
        args: the parsed ``deformconv demo --task segment`` options.
        ddp: this process's DDP rank.
        on_epoch_end: called after each epoch's checkpoint with the epochs done.
    """
    from deformconv.demos.train import train

    started = time.perf_counter()
    out: Path = args.out
    variants = parse_variants(args.variants)
    seeds = parse_seeds(args)
    several = len(seeds) > 1
    data = data_config(args)
    digits = load_digits()
    sets = build_scene_sets(data, args.epochs, digits)
    test_terciles = area_terciles(_all_boxes(sets["test"]))
    val_terciles = area_terciles(_all_boxes(sets["val"]))
    models: dict[tuple[str, int], nn.Module] = {}
    rows: list[dict[str, Any]] = []
    dil_rows: list[dict[str, Any]] = []
    for seed in seeds:
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            offset_lr_mult=args.offset_lr_mult,
            seed=seed,
        )
        for variant in variants:
            model_config = {
                "variant": variant,
                "width": args.width,
                "dilation": args.base_dilation,
                "modulated": args.modulated,
            }
            checkpoint = out / checkpoint_name(variant, seed, several)
            if args.resume and checkpoint.exists():
                stored = load_checkpoint(checkpoint)
                if stored.get("model_config") != model_config or stored.get("data") != data:
                    raise ValueError(
                        f"demo --task segment: --resume found {checkpoint} made with different "
                        f"settings (model {stored.get('model_config')}, data "
                        f"{stored.get('data')}); use the same options or another --out"
                    )
            torch.manual_seed(seed)  # every variant starts from the same weights
            model = build_segmenter(**model_config)
            model = model.to(args.device)
            t0 = time.perf_counter()
            train(
                model,
                sets["train"],
                config,
                checkpoint=checkpoint,
                resume=args.resume,
                device=args.device,
                ddp=ddp,
                progress=not args.no_progress,
                desc=f"{variant} seed {seed}" if several else variant,
                extra_state={"model_config": model_config, "data": data},
                on_epoch_end=on_epoch_end,
                collate_fn=collate_scenes,
            )
            seconds = time.perf_counter() - t0
            models[(variant, seed)] = model
            if not ddp.main:
                continue
            val = evaluate_segmentation(
                model, sets["val"], terciles=val_terciles, device=args.device
            )
            test = evaluate_segmentation(
                model, sets["test"], terciles=test_terciles, device=args.device
            )
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    **test,
                    "val_miou": val["miou"],
                    "train_seconds": round(seconds, 1),
                }
            )
            print(
                f"{variant} (seed {seed}): test mIoU {test['miou']:.3f} "
                f"(val {val['miou']:.3f}), {seconds:.0f} s"
            )
            for r in dilation_table(
                model, sets["test"], terciles=test_terciles, device=args.device
            ):
                dil_rows.append({"variant": variant, "seed": seed, **r})
    if ddp.main:
        _write_outputs(args, out, rows, dil_rows, models, sets["test"], test_terciles, seeds)
        print(f"wrote {out}/ ({time.perf_counter() - started:.0f} s)")
    ddp.barrier()
    return 0


def _write_outputs(
    args: argparse.Namespace,
    out: Path,
    rows: list[dict[str, Any]],
    dil_rows: list[dict[str, Any]],
    models: dict[tuple[str, int], nn.Module],
    test: DigitScenes,
    terciles: Tensor,
    seeds: list[int],
) -> None:
    from deformconv.demos.segment_figures import sampling_figure, segmentation_figure

    out.mkdir(parents=True, exist_ok=True)
    fields = ["variant", "seed", "miou", "iou_small", "iou_medium", "iou_large"]
    fields += ["pixel_accuracy", "val_miou", "train_seconds"]
    write_csv(out / "results.csv", rows, fields, ignore_other_keys=True)
    results = results_markdown(rows)
    (out / "results.md").write_text(results)
    dil_fields = ["variant", "seed", "layer", "bucket", "mean", "std", "count"]
    write_csv(out / "effective_dilation.csv", dil_rows, dil_fields, ignore_other_keys=True)
    dilation = dilation_markdown(dil_rows)
    (out / "effective_dilation.md").write_text(dilation)
    print(f"\ntest scenes: {len(test)}; size buckets by box-area terciles {terciles.tolist()}")
    print(results)
    if dil_rows:
        print("effective dilation (mean ± std over units of all test scenes):")
        print(dilation)
    first = {variant: models[(variant, seeds[0])] for variant, seed in models if seed == seeds[0]}
    sampling_figure(first, test, terciles, out / "sampling_locations.png")
    segmentation_figure(first, test, out / "segmentation.png")


def run(args: argparse.Namespace) -> int:
    """``deformconv demo --task segment`` (also under ``torchrun``: DDP, gloo on CPU)."""
    return run_task(args, "segmentation on digit scenes", run_segment)


def trace_unit(model: nn.Module, image: Tensor, unit: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The 729 sampling locations of a head unit, traced through the three head convs.

    Args:
        model: a :class:`SegmentationFCN` (plain, deformable or atrous).
        image: (1, H, W).
        unit: (row, col) on the stride-8 map.

    Returns:
        ``(points, weights)`` in stride-8 map coordinates (pixel = 8·point), see
        :func:`~deformconv.analysis.trace_sampling_locations`.
    """
    model.eval()
    with torch.no_grad(), recording(model):
        model(image[None].to(next(model.parameters()).device))
    size = image.shape[-2] // SegmentationFCN.stride, image.shape[-1] // SegmentationFCN.stride
    layers = [m for _, m in _head_layers(model)]
    return trace_sampling_locations(layers, unit, out_size=size)
