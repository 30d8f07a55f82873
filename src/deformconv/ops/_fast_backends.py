"""Registration of the fast backends, in order of preference for ``auto``.

Each entry only names a probe and a lazy loader: importing deformconv never
imports Numba or Triton; the first call on a device does.
"""

from __future__ import annotations

from deformconv.ops._backend import FastBackend, register

__all__: list[str] = []
