"""Compile the Numba CPU kernels ahead of the first call, into Numba's on-disk cache.

The CPU kernels are compiled by Numba on their first call in a process that finds no
cached build (several seconds), and loaded from the cache afterwards (well under a
second). :func:`precompile` pays the compile cost at a moment of the user's choosing: in
a Docker image's build step, after ``pip install`` on a cluster node, or before a timed
benchmark. It calls each op, forward and backward, on a tiny and a larger CPU input of
each requested dtype, which compiles (or loads) exactly the builds real calls of that
dtype use; Numba caches them next to the kernels' modules (in ``__pycache__``) or, when that
is not writable, under ``NUMBA_CACHE_DIR`` or the user's cache directory.

Example:
    >>> import deformconv
    >>> seconds = deformconv.precompile(kernels=("dcnv3",))
    >>> sorted(seconds)
    [('dcnv3', 'float32')]
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence

import torch

from deformconv.ops._backend import available_backends, use_backend
from deformconv.ops._errors import ArgumentError
from deformconv.ops.dcnv import dcnv3
from deformconv.ops.deform_conv import deform_conv2d

__all__ = ["KERNELS", "precompile"]

#: What :func:`precompile` can compile: ``dense`` (column + GEMM: ``groups = 1`` and
#: wide groups), ``grouped`` (direct kernels for narrow groups, e.g. ResNeXt's 32),
#: ``depthwise`` (``groups = C``) and ``dcnv3`` (the DCNv3/DCNv4 core).
KERNELS = ("dense", "grouped", "depthwise", "dcnv3")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


#: Map sizes of :func:`_conv`'s calls: small calls and large ones (which find bilinear
#: taps eight pixels at a time and split their work over threads) run different builds.
_SIZES = ((6, 5), (48, 48))


def _conv(channels: int, groups: int, dtype: torch.dtype) -> None:
    """Forward and backward of 3x3 deformable convolutions, with and without mask.

    One on a tiny map and one on a larger map (see ``_SIZES``).
    """
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(channels, channels // groups, 3, 3, dtype=dtype, generator=gen)
    for size in _SIZES:
        x = torch.randn(2, channels, *size, dtype=dtype, generator=gen)
        offset = torch.randn(2, 18, *size, dtype=dtype, generator=gen)
        mask = torch.rand(2, 9, *size, dtype=dtype, generator=gen)
        for m in (None, mask):
            leaves = [t.detach().requires_grad_() for t in (x, offset, weight)]
            m = None if m is None else m.detach().requires_grad_()
            out = deform_conv2d(leaves[0], leaves[1], leaves[2], padding=1, mask=m)
            out.sum().backward()


def _dcnv3(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 16, dtype=dtype, generator=gen, requires_grad=True)
    offset = torch.randn(2, 6, 5, 2 * 2 * 9, dtype=dtype, generator=gen, requires_grad=True)
    mask = torch.rand(2, 6, 5, 2 * 9, dtype=dtype, generator=gen, requires_grad=True)
    dcnv3(x, offset, mask, group=2).sum().backward()


_CALLS: dict[str, Callable[[torch.dtype], None]] = {
    "dense": lambda dtype: _conv(8, 1, dtype),
    "grouped": lambda dtype: _conv(8, 2, dtype),
    "depthwise": lambda dtype: _conv(8, 8, dtype),
    "dcnv3": _dcnv3,
}


def _run(kernels: Sequence[str], dtypes: Sequence[torch.dtype]) -> dict[tuple[str, str], float]:
    seconds = {}
    with use_backend("numba"):
        for kernel in kernels:
            for dtype in dtypes:
                start = time.perf_counter()
                _CALLS[kernel](dtype)
                seconds[kernel, str(dtype).removeprefix("torch.")] = time.perf_counter() - start
    return seconds


def _in_forked_child(kernels: Sequence[str], dtypes: Sequence[torch.dtype]) -> None:
    torch.set_num_threads(1)  # a forked child cannot start torch's OpenMP pool either
    _run(kernels, dtypes)


def precompile(
    kernels: Sequence[str] = KERNELS,
    dtypes: Sequence[str | torch.dtype] = ("float32",),
    forked_children: bool = False,
) -> dict[tuple[str, str], float]:
    """Compile (or load from Numba's cache) the CPU kernels a call will need.

    Args:
        kernels: which kernels, from :data:`KERNELS`.
        dtypes: ``"float32"`` (also what float16/bfloat16 compute in) and/or
            ``"float64"``, as names or torch dtypes.
        forked_children: also build the serial kernels that run in forked children
            (``DataLoader`` workers, ``multiprocessing`` with fork) on the default
            OpenMP layer, by running the same calls in a forked child.

    Returns:
        Seconds per ``(kernel, dtype name)`` in this process: the compile time on an
        empty cache, the load time on a filled one.

    Raises:
        ArgumentError: an unknown kernel or dtype, or no Numba backend on this machine.
    """
    for kernel in kernels:
        if kernel not in KERNELS:
            raise ArgumentError(f"kernels: expected names from {KERNELS}; got {kernel!r}")
    names = [str(d).removeprefix("torch.") if isinstance(d, torch.dtype) else d for d in dtypes]
    for name in names:
        if name not in _DTYPES:
            raise ArgumentError(f"dtypes: expected 'float32' or 'float64'; got {name!r}")
    if "numba" not in available_backends("cpu"):
        raise ArgumentError(
            "precompile: the Numba CPU backend is not available here (install deformconv "
            "with numba: pip install 'deformconv[fast]')"
        )
    chosen = [_DTYPES[name] for name in names]
    seconds = _run(kernels, chosen)
    if forked_children:
        child = multiprocessing.get_context("fork").Process(
            target=_in_forked_child, args=(kernels, chosen)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"precompile: the forked child exited with {child.exitcode}")
    return seconds
