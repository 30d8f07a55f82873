"""``deformconv precompile``: compile the CPU kernels into Numba's cache ahead of use."""

from __future__ import annotations

import argparse

NAME = "precompile"
HELP = "Compile the Numba CPU kernels now (e.g. in a Docker build) so first calls load them."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    from deformconv.ops.precompile import KERNELS

    parser.add_argument(
        "--kernels", nargs="+", choices=KERNELS, default=list(KERNELS),
        help="which kernels (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", nargs="+", choices=("float32", "float64"), default=["float32"],
        help="dtypes to compile for (default: float32, also used by float16/bfloat16)",
    )  # fmt: skip
    parser.add_argument(
        "--forked-children", action="store_true",
        help="also build the serial kernels that forked children (DataLoader workers) run",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Compile, then print the seconds per kernel and dtype."""
    import deformconv

    print(f"compiling {', '.join(args.kernels)} for {', '.join(args.dtype)} ...", flush=True)
    seconds = deformconv.precompile(args.kernels, args.dtype, args.forked_children)
    for (kernel, dtype), s in seconds.items():
        print(f"  {kernel:<10} {dtype:<8} {s:6.1f} s")
    print(f"done in {sum(seconds.values()):.1f} s; later first calls load the cached builds")
    return 0
