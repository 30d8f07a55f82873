"""``deformconv visualize``: what a trained deformable digits model learned."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "visualize"
HELP = (
    "Figure-7-style sampling locations, an offset field and the effective-dilation table "
    "(Table 2 style) for a checkpoint written by 'deformconv demo'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="deformable checkpoint, e.g. runs/demo/deformable.pt",
    )
    parser.add_argument(
        "--plain-checkpoint",
        type=Path,
        default=None,
        help="plain checkpoint to draw beside it (default: plain.pt next to --checkpoint)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the checkpoint's folder)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--samples", type=int, default=512, help="test samples for the effective-dilation table"
    )


def run(args: argparse.Namespace) -> int:
    """Rebuild the checkpoint's test set and model, then draw and tabulate."""
    from deformconv.cli import write_resolved_args
    from deformconv.demos.classify import build_datasets, load_trained
    from deformconv.demos.figures import visualize

    if not args.checkpoint.is_file():
        raise SystemExit(f"deformconv visualize: --checkpoint {args.checkpoint} is not a file")
    model, state = load_trained(args.checkpoint, args.device)
    if not state["model_config"]["deformable"]:
        raise SystemExit(
            f"deformconv visualize: {args.checkpoint} is a plain model; "
            "pass the deformable checkpoint"
        )
    plain_path = args.plain_checkpoint or args.checkpoint.with_name("plain.pt")
    plain = load_trained(plain_path, args.device)[0] if plain_path.is_file() else None
    out = args.out or args.checkpoint.parent
    args.out = out
    write_resolved_args(args, out)
    test = build_datasets(state["data"])["test"]
    for path in visualize(model, plain, test, out, samples=args.samples):
        print(f"wrote {path}")
    return 0
