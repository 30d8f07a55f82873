"""``deformconv demo``: plain vs deformable networks on handwritten digits.

``--task classify`` (default): one digit per image at 0.5x-2.5x scale.
``--task segment``: semantic segmentation of digit scenes (plain, deformable and atrous
heads; effective dilation by object size). ``--task detect``: detection on digit scenes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "demo"
HELP = (
    "Train the same small network plain and deformable on handwritten digits: classify "
    "digits pasted at 0.5x-2.5x scale (default), or segment / detect digits in scenes; print "
    "the scores and what the offsets learned."
)
TASKS = ("classify", "segment", "detect")

# Options shared by the tasks: a value the user did not give is the task's value from here.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {
        "lr": 3e-3,
        "epochs": 5,
        "samples_per_epoch": 6000,
        "batch_size": 64,
        "offset_lr_mult": 0.1,
        "width": 32,
        "canvas": 64,
        "val_samples": 1000,
        "test_samples": 2000,
    },
    "segment": {
        "lr": 3e-3,
        "variants": "plain,deform_last3",
        "epochs": 4,
        "samples_per_epoch": 4800,
        "batch_size": 16,
        "offset_lr_mult": 1.0,
        "width": 64,
        "canvas": 96,
        "val_samples": 200,
        "test_samples": 300,
    },
    # --- detect (--task detect) ---
    "detect": {
        "batch_size": 8,
        "lr": 1e-3,
        "offset_lr_mult": 1.0,
        "width": 64,
        "canvas": 128,
        "val_samples": 200,
        "test_samples": 500,
        "variants": "all",
    },
}


class _DefaultInt(int):
    """An option's default (not given by the user), which another task may replace."""


class _DefaultFloat(float):
    """An option's default (not given by the user), which another task may replace."""


def _default(key: str) -> int | float:
    value = TASK_DEFAULTS["classify"][key]
    return _DefaultInt(value) if isinstance(value, int) else _DefaultFloat(value)


def _pair(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two integers as LOW,HIGH; got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    parser.add_argument(
        "--task", choices=TASKS, default="classify", help="what to train (default: classify)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (runs/<task>)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, data, init")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints in --out")
    parser.add_argument(
        "--epochs", type=int, default=_default("epochs"), help="classify 5, segment 4"
    )
    parser.add_argument(
        "--samples-per-epoch",
        type=int,
        default=_default("samples_per_epoch"),
        help="training samples (scenes) per epoch: classify 6000, segment 4800",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_default("batch_size"),
        help="global batch size: classify 64, segment 16",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=_default("lr"),
        help="peak AdamW learning rate: 3e-3, detect 1e-3",
    )
    parser.add_argument(
        "--offset-lr-mult",
        type=float,
        default=_default("offset_lr_mult"),
        help="learning-rate multiplier of the offset predictors: classify 0.1 (as DCNv2), "
        "segment 1.0",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=_default("width"),
        help="channels of the last maps: classify 32, segment 64",
    )
    parser.add_argument("--modulated", action="store_true", help="DCNv2 layers (learned mask)")
    parser.add_argument(
        "--canvas",
        type=int,
        default=_default("canvas"),
        help="canvas side in pixels: classify 64, segment 96",
    )
    parser.add_argument("--scale-min", type=float, default=0.5)
    parser.add_argument("--scale-max", type=float, default=2.5)
    parser.add_argument("--rotation", type=float, default=0.0, help="max |rotation| in degrees")
    parser.add_argument(
        "--val-samples",
        type=int,
        default=_default("val_samples"),
        help="val samples (scenes): classify 1000, segment 200",
    )
    parser.add_argument(
        "--test-samples",
        type=int,
        default=_default("test_samples"),
        help="test samples (scenes): classify 2000, segment 300",
    )
    parser.add_argument(
        "--dilation-samples",
        type=int,
        default=512,
        help="classify: test samples for the effective-dilation table",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    seg = parser.add_argument_group("segment (--task segment)")
    seg.add_argument(
        "--variants",
        default=None,
        help="comma-separated variants or 'all': plain, deform_last1, deform_last2, "
        "deform_last3, atrous4, atrous6, atrous8 (default: plain,deform_last3); detect: "
        "plain, deform_conv, deform_roi_pool, both (default: all)",
    )
    seg.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds (init and order), e.g. 0,1,2 for mean ± std; "
        "default: --seed",
    )
    seg.add_argument(
        "--digits-per-scene", type=_pair, default=(2, 4), help="LOW,HIGH digits per scene"
    )
    seg.add_argument(
        "--height-range", type=_pair, default=(10, 77), help="LOW,HIGH digit height in pixels"
    )
    seg.add_argument(
        "--base-dilation", type=int, default=2, help="dilation of the head's 3x3 convs"
    )

    # --- detect (--task detect); it also reads --variants, --digits-per-scene,
    # --height-range and the shared options above ---
    det = parser.add_argument_group("detect (--task detect)")
    det.add_argument("--steps", type=int, default=1200, help="training steps per variant (1200)")
    det.add_argument(
        "--hidden", type=int, default=256, help="width of the box head and the offset head"
    )
    det.add_argument(
        "--anchor-sizes",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=(12, 24, 48, 96),
        help="comma-separated anchor sides in pixels (default: 12,24,48,96)",
    )
    det.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")


def resolve_task_defaults(args: argparse.Namespace) -> None:
    """Give the shared options the user left out the task's values (:data:`TASK_DEFAULTS`)."""
    for key, value in TASK_DEFAULTS.get(args.task, {}).items():
        given = getattr(args, key, None)
        if given is None or isinstance(given, (_DefaultInt, _DefaultFloat)):
            setattr(args, key, value)
    if args.out is None:
        args.out = Path("runs/demo" if args.task == "classify" else f"runs/{args.task}")


def run(args: argparse.Namespace) -> int:
    """Run the demo (also under ``torchrun --nproc_per_node=N``: DDP, gloo on CPU)."""
    import importlib

    resolve_task_defaults(args)
    if args.task == "segment":
        from deformconv.demos.segment import run as run_segment

        return run_segment(args)
    if args.task == "detect":
        try:
            detect = importlib.import_module("deformconv.demos.detect")
        except ModuleNotFoundError as err:
            if err.name != "deformconv.demos.detect":
                raise
            raise SystemExit(
                "deformconv demo: --task detect needs deformconv.demos.detect, which this "
                "installation does not have"
            ) from err
        return int(detect.run(args))

    from deformconv.demos.classify import run_demo
    from deformconv.demos.train import run_task

    return run_task(args, "classification on scaled digits", run_demo)
