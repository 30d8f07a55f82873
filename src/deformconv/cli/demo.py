"""``deformconv demo``: plain vs deformable CNN on scale-varied handwritten digits."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = (
    "Train the same small CNN plain and with its last 3 convs deformable on MNIST digits "
    "pasted at 0.5x-2.5x scale; print accuracy per scale and draw what the offsets learned."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, data, init")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints in --out")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples-per-epoch", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument(
        "--offset-lr-mult",
        type=float,
        default=0.1,
        help="learning-rate multiplier of the offset predictors (DCNv2 uses 0.1)",
    )
    parser.add_argument("--width", type=int, default=32, help="channels of the 16x16 maps")
    parser.add_argument("--modulated", action="store_true", help="DCNv2 layers (learned mask)")
    parser.add_argument("--canvas", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--scale-min", type=float, default=0.5)
    parser.add_argument("--scale-max", type=float, default=2.5)
    parser.add_argument("--rotation", type=float, default=0.0, help="max |rotation| in degrees")
    parser.add_argument("--val-samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument(
        "--dilation-samples",
        type=int,
        default=512,
        help="test samples for the effective-dilation table",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo (also under ``torchrun --nproc_per_node=N``: DDP, gloo on CPU)."""
    import os

    import torch

    from deformconv.cli import write_resolved_args
    from deformconv.demos.classify import run_demo
    from deformconv.demos.train import init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = init_distributed(args.device)
    if args.device.startswith("cuda") and ddp.world_size > 1:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if ddp.main:
        import deformconv

        write_resolved_args(args, args.out)
        print(
            f"deformconv {deformconv.__version__}: backend on {args.device}: "
            f"{deformconv.available_backends(torch.device(args.device).type)[0]}; "
            f"{ddp.world_size} process(es), {torch.get_num_threads()} thread(s) each"
        )
    try:
        return run_demo(args, ddp)
    finally:
        if ddp.world_size > 1:
            torch.distributed.destroy_process_group()
