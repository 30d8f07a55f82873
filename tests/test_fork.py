"""The numba backend in forked children (os.fork, multiprocessing Process and Pool,
DataLoader workers) after the parent used it, with 2 threads.

Each case runs in a fresh interpreter with a timeout (a GNU OpenMP child used to be
killed, and a child can hang in a thread pool inherited from its parent). ``layer``
is the Numba threading layer: ``auto`` is deformconv's own choice (tbb when the tbb
package is installed, else workqueue); ``omp`` is a user's explicit GNU OpenMP choice,
where forked children run serial builds of the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

HERE = Path(__file__).parent


def _run(case: str, layer: str) -> str:
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer != "auto":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run(
        [sys.executable, str(HERE / "_fork_worker.py"), case],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.mark.parametrize("case", ["os_fork", "process", "pool", "dataloader"])
def test_forked_children_compute_correctly(case):
    out = _run(case, "auto")
    assert out.startswith("OK") and "omp" not in out


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_forked_children_on_other_layers(layer):
    assert _run("process", layer).strip() == f"OK {layer}"
