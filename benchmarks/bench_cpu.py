"""CPU benchmark of deform_conv2d: ``python benchmarks/bench_cpu.py [--out table.md]``.

A thin script over :mod:`deformconv.experiments.bench` (also ``deformconv bench``), run
on the shape suite of ``benchmarks/_shapes.py``. Options: ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._shapes import SUITE  # noqa: E402
from deformconv.cli import bench as cli_bench  # noqa: E402
from deformconv.experiments import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the ``deformconv bench`` options and run the suite of ``_shapes.py``."""
    parser = argparse.ArgumentParser(description=cli_bench.HELP)
    cli_bench.add_arguments(parser)
    args = parser.parse_args(argv)
    fields = [(c.name, c.batch, c.in_channels, c.out_channels, c.size, c.stride,
               c.offset_groups, c.modulated, c.kernel) for c in SUITE]  # fmt: skip
    ours = [(c.name, c.batch, c.in_channels, c.out_channels, c.size, c.stride,
             c.offset_groups, c.modulated, c.kernel) for c in bench.SUITE]  # fmt: skip
    if fields != ours:
        raise SystemExit("benchmarks/_shapes.py and deformconv.experiments.bench.SUITE differ")
    return cli_bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
