"""``deformconv precompile`` fills Numba's cache so that a later process compiles nothing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deformconv
from deformconv.ops import ArgumentError

pytest.importorskip("numba")

SRC = Path(__file__).resolve().parents[1] / "src"

# In a fresh process: one dcnv3 forward+backward, then the cache hits and misses of every
# Numba kernel of the DCNv3 module.
_CALL_AND_COUNT = """
import numba, torch, deformconv
from deformconv.kernels import _dcnv_numba
x = torch.randn(1, 7, 6, 32, requires_grad=True)
offset = torch.randn(1, 7, 6, 2 * 4 * 9, requires_grad=True)
mask = torch.rand(1, 7, 6, 4 * 9, requires_grad=True)
deformconv.dcnv3(x, offset, mask, group=4).sum().backward()
kernels = [k for k in vars(_dcnv_numba).values() if isinstance(k, numba.core.dispatcher.Dispatcher)]
print(sum(sum(k.stats.cache_hits.values()) for k in kernels),
      sum(sum(k.stats.cache_misses.values()) for k in kernels))
"""


def test_precompiled_kernels_are_loaded_not_compiled(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(SRC)}
    cli = [sys.executable, "-m", "deformconv.cli", "precompile", "--kernels", "dcnv3"]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dcnv3      float32" in done.stdout
    assert any(tmp_path.rglob("*.nbi")), "nothing was written to the cache"
    # A later process, other shapes: every kernel comes from the cache.
    later = subprocess.run(
        [sys.executable, "-c", _CALL_AND_COUNT], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert later.returncode == 0, later.stderr[-3000:]
    hits, misses = map(int, later.stdout.split())
    assert misses == 0 and hits >= 2, (hits, misses)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernels": ("dense", "conv3d")}, "kernels: expected names from"),
        ({"dtypes": ("float16",)}, "dtypes: expected 'float32' or 'float64'; got 'float16'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        deformconv.precompile(**kwargs)


def test_no_numba_backend_is_named(monkeypatch):
    # Where Numba cannot be imported the CPU has only the reference backend.
    module = importlib.import_module("deformconv.ops.precompile")  # the function shadows it
    monkeypatch.setattr(module, "available_backends", lambda device: ("reference",))
    with pytest.raises(ArgumentError, match="the Numba CPU backend is not available here"):
        deformconv.precompile()
