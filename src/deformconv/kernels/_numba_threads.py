"""Threading of the Numba kernels: fork-safe, thread-safe, no setting leaks out of a call.

Threading layer. Numba runs ``parallel=True`` kernels on one of three layers, chosen
once per process when the first parallel kernel runs. Its default order picks GNU
OpenMP on Linux when TBB is not found, and GNU OpenMP is not fork-safe: a forked child
(a ``DataLoader`` worker, a ``multiprocessing`` pool) that runs a parallel kernel after
its parent did is killed. Before the first kernel runs, :func:`configure` therefore
asks Numba for its ``forksafe`` choice, unless the user chose a layer
(``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) or Numba's threads run
already:

- ``tbb`` when the TBB runtime loads (the ``tbb`` package, part of the ``fast`` extra;
  its library is loaded from the package's files, since a virtual environment's
  ``lib/`` is not on the loader's path): fork-safe and thread-safe;
- ``workqueue`` otherwise: fork-safe, but it must not launch kernels from two threads
  at once, so calls serialise their kernel launches on a lock (the GEMMs around them
  still run concurrently).

When the layer in use is GNU OpenMP all the same (the user's choice, or Numba code that
ran first), a forked child runs serial builds of the kernels instead of being killed.

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
import importlib.metadata
import os
import threading
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


def configure() -> None:
    """Choose a fork-safe threading layer unless the user (or a first run) chose one."""
    if _launched_layer() is not None or os.environ.get("NUMBA_THREADING_LAYER"):
        return
    if str(getattr(numba.config, "THREADING_LAYER", "default")).lower() != "default":
        return
    _load_tbb()  # lets Numba find it; "forksafe" then prefers tbb over workqueue
    setattr(numba.config, "THREADING_LAYER", "forksafe")  # noqa: B010 (untyped module)


def _serial(kernel: Any) -> Any:
    serial = getattr(kernel, "_deformconv_serial", None)
    if serial is None:
        options = {**kernel.targetoptions, "parallel": False}
        options.pop("cache", None)  # a separate build: keep it out of the parallel one's cache
        options.pop("nopython", None)
        serial = numba.njit(**options)(kernel.py_func)
        kernel._deformconv_serial = serial
    return serial


def launch(kernel: Any, *args: object) -> None:
    """Run a ``parallel=True`` Numba kernel the way this process can run it safely."""
    layer = _launched_layer()
    if layer == "omp" and in_forked_child():
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
        with threads():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def threads() -> Iterator[None]:
    """Thread counts for one call of a kernel (see the module docstring); restored on exit."""
    limit: int = getattr(numba.config, "NUMBA_NUM_THREADS", 1)
    torch_threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, limit)))
    single = in_forked_child() and torch_threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
        if single:
            torch.set_num_threads(torch_threads)
