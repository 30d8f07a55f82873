"""Threading of the Numba kernels: fork-safe, thread-safe, no setting leaks out of a call.

Threading layer. Numba runs ``parallel=True`` kernels on one of three layers, chosen
once per process when the first parallel kernel runs. Measured on this library's
kernels (2 threads, forward + backward of a ResNet res4 layer and of a detection layer),
GNU OpenMP (``omp``) is the fastest: ``tbb`` and ``workqueue`` cost 17–45 % more in the
backward, whose many short parallel loops pay their higher launch cost. Before the
first kernel runs, :func:`configure` therefore asks Numba for ``omp``, unless the user
chose a layer (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) or Numba's
threads run already; without an OpenMP runtime it asks for ``forksafe`` (``tbb`` when the
``tbb`` package is installed, else ``workqueue``).

GNU OpenMP is not fork-safe: a child forked after its parent started OpenMP threads (a
``DataLoader`` worker, a ``multiprocessing`` pool, a pre-fork server) cannot start a
parallel region; Numba would kill it. There, :func:`launch` runs serial builds of the
kernels (compiled once and cached on disk under their own names), so the child computes
the same results on one thread — what PyTorch itself gives a ``DataLoader`` worker.
Users who want parallel kernels in forked children choose ``tbb`` or ``workqueue`` with
``NUMBA_THREADING_LAYER``; ``tbb``'s runtime is then loaded from the ``tbb`` package's
files (a virtual environment's ``lib/`` is not on the loader's path). ``workqueue`` must
not launch kernels from two threads at once, so on it calls serialise their kernel
launches on a lock (the GEMMs around them still run concurrently).

Thread counts. A call runs its kernels on ``min(torch.get_num_threads(),
NUMBA_NUM_THREADS)`` threads; Numba's thread count is per thread and is restored when
the call returns. In a forked child the call also runs torch's own work (GEMMs, copies)
on one thread and restores the previous count afterwards: torch's OpenMP runtime (GNU
libgomp) cannot start a parallel region in a child forked after the parent used one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.metadata
import os
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import numba
import torch

__all__ = ["configure", "in_forked_child", "launch", "scoped", "threads"]

P = ParamSpec("P")
R = TypeVar("R")

_state = {"forked": False}
_launch_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _launch_lock
    _state["forked"] = True
    _launch_lock = threading.Lock()  # a lock held by another thread at fork stays held


os.register_at_fork(after_in_child=_after_fork_in_child)


def in_forked_child() -> bool:
    """True in a process forked after this module was imported."""
    return _state["forked"]


def _load_tbb() -> bool:
    """Load the TBB runtime that Numba's ``tbb`` layer needs, if it is installed."""
    try:
        ctypes.CDLL("libtbb.so.12")  # on the loader's path (system or conda)
        return True
    except OSError:
        pass
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name == "libtbb.so.12":
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                return False
    return False


def _launched_layer() -> str | None:
    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet
        return None


def _openmp() -> Any:
    """Numba's OpenMP layer module, or None without an OpenMP runtime."""
    try:
        return importlib.import_module("numba.np.ufunc.omppool")
    except ImportError:
        return None


def _user_layer() -> str:
    chosen = os.environ.get("NUMBA_THREADING_LAYER") or getattr(
        numba.config, "THREADING_LAYER", "default"
    )
    return str(chosen).lower()


def configure() -> None:
    """Choose the threading layer unless the user (or a first run) chose one."""
    if _launched_layer() is not None:
        return
    chosen = _user_layer()
    if chosen in ("tbb", "threadsafe", "forksafe", "safe"):
        _load_tbb()  # lets Numba find the tbb package's runtime
    if chosen != "default":
        return
    if _openmp() is not None:
        setattr(numba.config, "THREADING_LAYER", "omp")  # noqa: B010 (untyped module)
    else:
        _load_tbb()
        setattr(numba.config, "THREADING_LAYER", "forksafe")  # noqa: B010


def _serial(kernel: Any) -> Any:
    """A ``parallel=False`` build of ``kernel``, cached on disk under its own name."""
    serial = getattr(kernel, "_deformconv_serial", None)
    if serial is None:
        py_func = kernel.py_func
        copy = types.FunctionType(
            py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial",
            py_func.__defaults__, py_func.__closure__,
        )  # fmt: skip
        copy.__qualname__ = py_func.__qualname__ + "_serial"  # its own cache file
        copy.__module__ = py_func.__module__
        options = {**kernel.targetoptions, "parallel": False}
        options.pop("nopython", None)
        cached = type(kernel._cache).__name__ != "NullCache"  # as the parallel build
        serial = numba.njit(cache=cached, **options)(copy)
        kernel._deformconv_serial = serial
    return serial


@functools.cache
def _omp_is_gnu() -> bool:
    return str(getattr(_openmp(), "openmp_vendor", "GNU")) == "GNU"


def launch(kernel: Any, *args: object) -> None:
    """Run a ``parallel=True`` Numba kernel the way this process can run it safely."""
    layer = _launched_layer()
    if layer == "omp" and in_forked_child() and _omp_is_gnu():
        _serial(kernel)(*args)
    elif layer == "workqueue" or layer is None:
        with _launch_lock:  # workqueue launches must not overlap
            kernel(*args)
    else:
        kernel(*args)


def scoped(fn: Callable[P, R]) -> Callable[P, R]:
    """Run every call of ``fn`` inside :func:`threads`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        state = _enter()  # not ``with threads()``: a generator context costs microseconds
        try:
            return fn(*args, **kwargs)
        finally:
            _exit(state)

    return wrapper


@contextlib.contextmanager
def threads() -> Iterator[None]:
    """Thread counts for one call of a kernel (see the module docstring); restored on exit."""
    state = _enter()
    try:
        yield
    finally:
        _exit(state)


def _enter() -> tuple[int | None, int | None]:
    """Set the call's thread counts; returns the counts :func:`_exit` restores (None: kept)."""
    torch_threads = torch.get_num_threads()
    limit = int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))
    wanted = max(1, min(torch_threads, limit))
    previous = numba.get_num_threads()
    restore_numba = None
    if previous != wanted:
        numba.set_num_threads(wanted)
        restore_numba = previous
    restore_torch = None
    if in_forked_child() and torch_threads > 1:
        torch.set_num_threads(1)
        restore_torch = torch_threads
    return restore_numba, restore_torch


def _exit(state: tuple[int | None, int | None]) -> None:
    restore_numba, restore_torch = state
    if restore_numba is not None:
        numba.set_num_threads(restore_numba)
    if restore_torch is not None:
        torch.set_num_threads(restore_torch)
