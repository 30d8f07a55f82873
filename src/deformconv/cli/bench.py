"""``deformconv bench``: the CPU benchmark (see :mod:`deformconv.bench.cpu`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "bench"
HELP = "Time deform_conv2d against F.conv2d and torchvision on CPU; write a Markdown table."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    from deformconv.bench.suite import SUITES

    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(SUITES),
        help="layer suite to run; repeat for several (default: dense and grouped)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs (median; default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--out", type=Path, help="write the Markdown table to this file")
    parser.add_argument("--json", type=Path, help="write the full result as JSON")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory subprocesses"
    )
    parser.add_argument("--no-torchvision", action="store_true", help="skip torchvision")
    parser.add_argument(
        "--no-first-call", action="store_true", help="skip the first-call (JIT) measurement"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last inputs, weights and gradients for every implementation (and models)",
    )
    parser.add_argument(
        "--models",
        action="store_true",
        help="also time ResNet-50 and ResNeXt-50 (32x4d), plain and with deformify(last=3)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also run B=32, C=256, 56x56 (conv2d and deformconv, 3 runs) with peak memory",
    )


def run(args: argparse.Namespace) -> int:
    """Run the suite, print the table, write the requested files."""
    import sys

    from deformconv.bench import cpu as bench
    from deformconv.bench.suite import LARGE, SUITES

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    if args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        raise ValueError(
            "deformconv bench: --repeat and --threads must be >= 1 and --warmup >= 0; got "
            f"repeat={args.repeat}, threads={args.threads}, warmup={args.warmup}"
        )
    names = args.suite or ["dense", "grouped"]
    cases = [case for name in dict.fromkeys(names) for case in SUITES[name]]
    result = bench.run(
        cases=cases,
        threads=args.threads,
        repeat=args.repeat,
        warmup=args.warmup,
        memory=not args.no_memory,
        torchvision=not args.no_torchvision,
        first_call=not args.no_first_call,
        progress=progress,
        channels_last=args.channels_last,
    )
    text = bench.to_markdown(result)
    if args.large:
        large = bench.run(
            cases=[LARGE],
            threads=args.threads,
            repeat=3,
            warmup=1,
            memory=not args.no_memory,
            torchvision=False,
            first_call=False,
            progress=progress,
            channels_last=args.channels_last,
        )
        result["large"] = large
        text += "\nMemory check (3 runs after 1 warm-up, no torchvision):\n\n" + bench.to_markdown(
            large
        )
    if args.models:
        models = bench.run_models(
            threads=args.threads, progress=progress, channels_last=args.channels_last
        )
        result["models"] = models
        text += "\nModel level:\n\n" + bench.models_to_markdown(models)
    resolved = {k: v for k, v in vars(args).items() if k != "_run"}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in resolved.items()}
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
