"""The numba backend in forked children (os.fork, multiprocessing Process and Pool,
DataLoader workers) after the parent used it, with 2 threads.

Each case runs in a fresh interpreter with a timeout (a GNU OpenMP child used to be
killed, and a child can hang in a thread pool inherited from its parent). ``layer``
is the Numba threading layer: ``auto`` is deformconv's own choice (GNU OpenMP, where
forked children run serial builds of the kernels); ``tbb`` and ``workqueue`` are a
user's explicit fork-safe choices, where forked children run the parallel kernels.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

HERE = Path(__file__).parent


def _has_tbb_package() -> bool:
    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


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
    assert _run(case, "auto").strip() == "OK omp"


@pytest.mark.parametrize("layer", ["workqueue", "tbb"])
def test_forked_children_on_fork_safe_layers(layer):
    if layer == "tbb" and not _has_tbb_package():
        pytest.skip("needs the tbb package (its runtime is loaded from the package's files)")
    assert _run("process", layer).strip() == f"OK {layer}"


def test_serial_builds_are_cached_under_their_own_name():
    """A forked child compiles a serial build once; it must not share the parallel cache."""
    from deformconv.kernels import _numba, _numba_threads

    serial = _numba_threads._serial(_numba._im2col)
    assert serial is _numba_threads._serial(_numba._im2col)
    assert serial.targetoptions["parallel"] is False
    assert "_serial" in serial._cache._cache_file._index_name
    assert serial._cache._cache_file._index_name != _numba._im2col._cache._cache_file._index_name
