"""Hostile-input fuzz battery (hypothesis) for the public ops, each batch in a subprocess.

A batch of derandomised cases runs in a fresh interpreter (``_fuzz_worker.py``), so a
crash (a segfault or a heap-corruption abort) fails the test with the signal instead of
killing pytest. Every case must compute a finite result (given finite tensors other than
the offsets) with finite gradients, or raise the documented ValueError/TypeError; the
worker also reports how many cases computed, so the battery cannot pass by rejecting all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import deformconv

pytest.importorskip("hypothesis")

HERE = Path(__file__).parent
BATCHES = [
    *(("deform_conv2d", b, 200) for b in deformconv.available_backends("cpu")),
    ("deform_roi_pool", "auto", 120),
    ("deform_ps_roi_pool", "auto", 120),
]


@pytest.mark.parametrize(("op", "kernel", "examples"), BATCHES)
def test_fuzz_batch(op, kernel, examples):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_fuzz_worker.py"), op, kernel, str(examples)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n" + (proc.stdout + proc.stderr)[-4000:]
    _, computed, rejected = proc.stdout.split()
    assert int(computed) + int(rejected) == examples
    assert int(computed) >= 5, "too few cases reached the kernels"
