"""Thread safety: context-local backend choice, concurrent calls, no leaked settings."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import deformconv
from _cases import CONFIGS, call_kwargs, make_problem


def test_use_backend_is_local_to_its_thread():
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, str] = {}

    def holder():
        with deformconv.use_backend("reference"):
            seen["holder"] = deformconv.get_backend()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(10)
    seen["other"] = deformconv.get_backend()
    release.set()
    t.join()
    assert seen == {"holder": "reference", "other": "auto"}


def test_use_backend_is_local_to_its_asyncio_task():
    import asyncio

    async def task(name: str, hold: asyncio.Event, go: asyncio.Event) -> str:
        if name == "reference":
            with deformconv.use_backend("reference"):
                hold.set()
                await go.wait()
                return deformconv.get_backend()
        await hold.wait()
        value = deformconv.get_backend()
        go.set()
        return value

    async def main():
        hold, go = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task("reference", hold, go), task("auto", hold, go))

    assert asyncio.run(main()) == ["reference", "auto"]


def _problem(name: str):
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return cfg, make_problem(cfg, torch.float32, generator=g)


def _run(name: str, backend: str):
    cfg, tensors = _problem(name)
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    x, offset, weight, bias, mask = leaves
    with deformconv.use_backend(backend):
        out = deformconv.deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    out.square().sum().backward()
    return [out.detach(), *(t.grad for t in leaves if t is not None)]


NAMES = ["everything", "offset_groups_2", "groups_2", "odd_batch"]


def test_concurrent_calls_equal_serial_results(backend):
    """4 threads, each with its own problems and its own use_backend, equal serial runs."""
    jobs = [(NAMES[i % len(NAMES)], backend if i % 2 == 0 else "reference") for i in range(8)]
    serial = [_run(*job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda job: _run(*job), jobs))
    for got, want in zip(concurrent, serial, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # same code, same order: bitwise


def test_numba_thread_count_does_not_leak_out_of_a_call():
    numba = pytest.importorskip("numba")
    cfg, (x, offset, weight, bias, mask) = _problem("basic")
    with deformconv.use_backend("numba"):
        deformconv.deform_conv2d(x, offset, weight, bias, **call_kwargs(cfg))  # threads launched
    numba.set_num_threads(1)
    threads = torch.get_num_threads()
    with deformconv.use_backend("numba"):
        deformconv.deform_conv2d(x, offset, weight, bias, **call_kwargs(cfg))
    assert numba.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _installed_openmp() -> bool:
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        return False
    return True


SCRIPT = """
import sys, torch, numba
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {tests!r})
import test_threads as t
torch.set_num_threads(2)
jobs = [(t.NAMES[i % 4], "numba") for i in range(8)]
serial = [t._run(*job) for job in jobs]
with ThreadPoolExecutor(4) as pool:
    concurrent = list(pool.map(lambda job: t._run(*job), jobs))
for got, want in zip(concurrent, serial):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
print("OK", numba.threading_layer())
"""


@pytest.mark.parametrize("layer", ["auto", "workqueue", "tbb"])
def test_concurrent_calls_on_each_threading_layer(layer):
    """workqueue must never launch two kernels at once: calls serialise their launches."""
    pytest.importorskip("numba")
    if layer == "tbb" and not _installed("tbb"):
        pytest.skip("needs the tbb package")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer != "auto":
        env["NUMBA_THREADING_LAYER"] = layer
    tests = os.path.dirname(__file__)
    code = SCRIPT.format(tests=tests)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.startswith("OK")
    expected = layer if layer != "auto" else "omp" if _installed_openmp() else None
    assert expected is None or proc.stdout.split()[1] == expected
