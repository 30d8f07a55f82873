"""``deformconv export``: write a model as ONNX (``DeformConv``) and check it in onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export"
HELP = (
    "Export a model with deformable layers to ONNX (standard DeformConv, opset >= 19) "
    "and compare onnxruntime with eager PyTorch."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    parser.add_argument(
        "--model",
        default="demo",
        help="'demo' (a small DCNv1 + DCNv2 network) or 'package.module:factory', a "
        "function returning the nn.Module to export (default: demo)",
    )
    parser.add_argument(
        "--input-shape", type=int, nargs=4, default=[1, 3, 32, 32], metavar=("N", "C", "H", "W")
    )
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset, >= 19 (default: 20)")
    parser.add_argument("--dynamic-batch", action="store_true", help="let the batch size vary")
    parser.add_argument("--rtol", type=float, default=1e-5, help="max relative difference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/export"), help="output folder")


def run(args: argparse.Namespace) -> int:
    """Export, check, and write ``model.onnx``, ``report.json`` and ``args.json`` to ``--out``."""
    import importlib
    import json

    import torch

    from deformconv.cli import write_resolved_args
    from deformconv.onnx import demo_model, export_onnx

    torch.manual_seed(args.seed)
    if args.model == "demo":
        model = demo_model(args.seed)
    else:
        module_name, _, factory = args.model.partition(":")
        if not factory:
            raise SystemExit(f"deformconv export: --model must be 'demo' or 'module:factory'; "
                             f"got {args.model!r}")  # fmt: skip
        model = getattr(importlib.import_module(module_name), factory)()
    model.eval()
    x = torch.randn(*args.input_shape)
    write_resolved_args(args, args.out)
    report = export_onnx(
        model, (x,), args.out / "model.onnx", opset=args.opset, dynamic_batch=args.dynamic_batch
    )
    (args.out / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    ok = report.max_rel_diff is not None and report.max_rel_diff <= args.rtol
    print(f"wrote {report.path}: opset {report.opset}, {report.deform_conv_nodes} DeformConv nodes")
    print(
        f"onnxruntime vs eager: max |diff| = {report.max_abs_diff:.2e}, "
        f"relative {report.max_rel_diff:.2e} ({'OK' if ok else 'FAIL'}: rtol {args.rtol:g})"
    )
    return 0 if ok else 1
