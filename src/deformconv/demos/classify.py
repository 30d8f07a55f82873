"""The digits demo end to end: data, both models, training, results table, figures."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deformconv.demos.cnn import build_model
from deformconv.demos.digits import BUCKETS, ScaledDigits, load_digits, split_digits
from deformconv.demos.train import Distributed, TrainConfig, evaluate, load_checkpoint

__all__ = ["build_datasets", "load_trained", "results_markdown", "run_demo"]

KINDS = ("plain", "deformable")


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define the data (stored in checkpoints for ``visualize``)."""
    return {
        "seed": args.seed,
        "canvas": args.canvas,
        "scale_range": [args.scale_min, args.scale_max],
        "rotation": args.rotation,
        "samples_per_epoch": args.samples_per_epoch,
        "val_samples": args.val_samples,
        "test_samples": args.test_samples,
    }


def build_datasets(data: dict[str, Any]) -> dict[str, ScaledDigits]:
    """Train / val / test datasets from a :func:`data_config` dict (disjoint digits)."""
    images, labels = load_digits()
    split = split_digits(len(images), seed=data["seed"])
    common = {
        "seed": data["seed"],
        "canvas": data["canvas"],
        "scale_range": tuple(data["scale_range"]),
        "rotation": data["rotation"],
    }
    return {
        "train": ScaledDigits(
            images, labels, split.train, length=data["samples_per_epoch"], stream="train", **common
        ),
        "val": ScaledDigits(
            images, labels, split.val, length=data["val_samples"], stream="val", **common
        ),
        "test": ScaledDigits(
            images, labels, split.test, length=data["test_samples"], stream="test", **common
        ),
    }


def load_trained(path: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a demo model from its checkpoint; returns ``(model, checkpoint)``."""
    state = load_checkpoint(path)
    model = build_model(**state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The accuracy table as Markdown."""
    head = "| model | val | test | test small | test medium | test large |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["val_overall"], r["test_overall"], *(r[f"test_{b}"] for b in BUCKETS)]
        lines.append(f"| {r['model']} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(
    args: argparse.Namespace,
    ddp: Distributed,
    *,
    on_epoch_end: Callable[[int], None] | None = None,
) -> int:
    """Train plain and deformable models, evaluate, write table and figures (rank 0).

    Args:
        args: the parsed ``deformconv demo`` options.
        ddp: this process's DDP rank.
        on_epoch_end: called after each epoch's checkpoint with the epochs done.
    """
    from deformconv.demos.figures import visualize, write_table
    from deformconv.demos.train import train

    started = time.perf_counter()
    out: Path = args.out
    data = data_config(args)
    sets = build_datasets(data)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        offset_lr_mult=args.offset_lr_mult,
        seed=args.seed,
    )
    models: dict[str, nn.Module] = {}
    rows = []
    for kind in KINDS:
        model_config = {
            "width": args.width,
            "deformable": kind == "deformable",
            "modulated": args.modulated,
        }
        checkpoint = out / f"{kind}.pt"
        if args.resume and checkpoint.exists():
            stored = load_checkpoint(checkpoint)
            if stored.get("model_config") != model_config or stored.get("data") != data:
                raise ValueError(
                    f"demo: --resume found {checkpoint} made with different settings "
                    f"(model {stored.get('model_config')}, data {stored.get('data')}); "
                    "use the same options or another --out"
                )
        torch.manual_seed(args.seed)  # both models start from the same weights
        model = build_model(**model_config).to(args.device)
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
            desc=kind,
            extra_state={"model_config": model_config, "data": data},
            on_epoch_end=on_epoch_end,
        )
        seconds = time.perf_counter() - t0
        models[kind] = model
        if ddp.main:
            val = evaluate(model, sets["val"], device=args.device)
            test = evaluate(model, sets["test"], device=args.device)
            rows.append(
                {
                    "model": kind,
                    "val_overall": val["overall"],
                    "test_overall": test["overall"],
                    **{f"test_{b}": test[b] for b in BUCKETS},
                    "test_n": int(test["n"]),
                    "train_seconds": round(seconds, 1),
                }
            )
    if ddp.main:
        markdown = results_markdown(rows)
        write_table(rows, out, "results", markdown)
        print(
            f"\ntest accuracy on {args.test_samples} samples of unseen digits "
            f"(scale buckets: thirds of {args.scale_min}x-{args.scale_max}x):"
        )
        print(markdown)
        visualize(
            models["deformable"], models["plain"], sets["test"], out, samples=args.dilation_samples
        )
        print(
            f"wrote {out}/: plain.pt deformable.pt results.csv results.md "
            "effective_dilation.csv effective_dilation.md sampling_locations.png "
            f"offset_field.png args.json ({time.perf_counter() - started:.0f} s)"
        )
    ddp.barrier()
    return 0
