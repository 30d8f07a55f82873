"""The ``deformconv`` command line: ``deformconv <subcommand> [options]``.

Each subcommand is a module in this package exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; it imports its heavy
dependencies inside ``run`` so ``deformconv --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

__all__ = ["main", "write_resolved_args"]

# Module names under deformconv.cli, in the order ``--help`` lists them.
_SUBCOMMANDS = ("example", "export", "demo", "visualize", "bench", "precompile")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deformconv", description="Deformable convolution for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"deformconv.cli.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def write_resolved_args(args: argparse.Namespace, out_dir: Path) -> None:
    """Write the resolved arguments as ``args.json`` next to a command's outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "_run"
    }
    (out_dir / "args.json").write_text(json.dumps(values, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
