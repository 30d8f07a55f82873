"""Registration of the fast backends, in order of preference for ``auto``.

Each entry only names a probe and a lazy loader: importing deformconv never
imports Numba or Triton; the first call on a device does.
"""

from __future__ import annotations

from deformconv.ops._backend import FastBackend, register

__all__: list[str] = []  # registers on import; exports nothing


def _numba_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def _load_numba():  # type: ignore[no-untyped-def]
    from deformconv.kernels import _numba

    return _numba


register(FastBackend("numba", ("cpu",), _numba_available, _load_numba))


def _triton_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _load_triton():  # type: ignore[no-untyped-def]
    from deformconv.kernels import _triton

    return _triton


register(FastBackend("triton", ("cuda",), _triton_available, _load_triton))
