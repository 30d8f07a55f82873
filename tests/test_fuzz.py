"""Hostile-input fuzz battery (hypothesis) for the public ops, each batch in a subprocess.

A batch of derandomised cases runs in a fresh interpreter (``_fuzz_worker.py``), so a
crash (a segfault or a heap-corruption abort) fails the test with the signal instead of
killing pytest. A valid case must compute a finite result (given finite tensors other
than the offsets and boxes) with finite gradients; a case with one defect must raise the
documented ValueError/TypeError. The worker reports what it drew, and the balance is
checked here: at least half of the cases compute a non-empty result, every defect and
every hostile feature was tried.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deformconv

pytest.importorskip("hypothesis")

from _fuzz_worker import CONV_DEFECTS, roi_defects  # noqa: E402

HERE = Path(__file__).parent
# Sizes keep the battery's runtime about that of importing torch and deformconv per batch;
# most cases now compute, so fewer cases try more of the kernels than before.
BATCHES = [
    *(("deform_conv2d", b, 160) for b in deformconv.available_backends("cpu")),
    ("deform_roi_pool", "auto", 100),
    ("deform_ps_roi_pool", "auto", 100),
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
    counts = json.loads(proc.stdout.splitlines()[-1])
    assert counts["computed"] == counts["valid"]
    assert counts["rejected"] == counts["invalid"]
    assert counts["valid"] + counts["invalid"] == examples
    assert counts["nonempty"] >= examples / 2, f"too few cases reached the kernels: {counts}"
    assert counts["invalid"] >= examples / 5, f"too few invalid cases: {counts}"
    defects = CONV_DEFECTS if op == "deform_conv2d" else roi_defects(op == "deform_ps_roi_pool")
    assert {f"defect:{d}" for d in defects} <= counts.keys(), counts
    features = {k: v for k, v in counts.items() if k.startswith("feature:")}
    assert len(features) >= 7 and all(n >= 3 for n in features.values()), features
