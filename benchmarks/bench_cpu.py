"""CPU benchmark of deform_conv2d: ``python benchmarks/bench_cpu.py [--out table.md]``.

The same as ``deformconv bench`` (the suite of :mod:`deformconv.bench.suite`), runnable
from a checkout. Options: ``--help``.
"""

from __future__ import annotations

import sys

from deformconv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
