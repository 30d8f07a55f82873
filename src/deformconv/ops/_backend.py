"""Which kernel runs a call: ``auto`` picks the fastest available for the device.

The choice is context-local (a :mod:`contextvars` variable): a ``with use_backend(...)``
block affects the calls made inside it, in its own thread or asyncio task only; new threads
start with ``"auto"``.

Backends:
    ``reference``: pure PyTorch (``kernels/reference.py``), every device,
    differentiable twice; runs as plain torch ops, not as a custom op.
    Fast backends call :func:`register` with a lazy loader of their kernels; they run
    behind the ``deformconv::deform_conv2d`` custom op (``ops/_library.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "FastBackend",
    "Kernels",
    "available_backends",
    "get_backend",
    "kernels",
    "register",
    "resolve",
    "use_backend",
]


class Kernels(Protocol):
    """What a fast backend provides (module-level functions of its kernel module)."""

    def forward(
        self,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        """(N, C_out, H_out, W_out) in input's dtype."""
        ...

    def backward(
        self,
        grad_output: Tensor,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
        """Gradients for (input, offset, mask, weight, bias); None where the input is None."""
        ...


@dataclass(frozen=True)
class FastBackend:
    """A fast backend: its name, the devices it serves, a cheap probe and a lazy loader."""

    name: str
    device_types: tuple[str, ...]
    is_available: Callable[[], bool]
    load: Callable[[], Kernels]


# Ordered by preference; ``auto`` takes the first available one for the device.
_FAST: list[FastBackend] = []
_CHOICE: contextvars.ContextVar[str] = contextvars.ContextVar("deformconv_backend", default="auto")


def register(backend: FastBackend) -> None:
    """Add a fast backend (called once by the module that provides it)."""
    if any(b.name == backend.name for b in _FAST):
        raise ValueError(f"register: a backend named {backend.name!r} exists already")
    _FAST.append(backend)


@cache
def kernels(name: str) -> Kernels:
    """The loaded kernels of the fast backend ``name``."""
    return next(b for b in _FAST if b.name == name).load()


def available_backends(device_type: str = "cpu") -> list[str]:
    """The backends that can run on ``device_type`` here, fastest first.

    Example:
        >>> "reference" in available_backends("cpu")
        True
    """
    fast = [b.name for b in _FAST if device_type in b.device_types and b.is_available()]
    return [*fast, "reference"]


def get_backend() -> str:
    """The backend chosen by :func:`use_backend` in this context (``"auto"`` by default).

    Example:
        >>> import deformconv
        >>> with deformconv.use_backend("reference"):
        ...     deformconv.get_backend()
        'reference'
    """
    return _CHOICE.get()


def _known() -> list[str]:
    return ["auto", "reference", *(b.name for b in _FAST)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on one backend.

    The choice holds for the current thread or asyncio task only (it is stored in a
    :mod:`contextvars` variable), so concurrent code keeps its own choice.

    Args:
        name: ``"auto"`` (fastest available per device), ``"reference"``, or a fast
            backend's name from :func:`available_backends`.

    Example:
        >>> import torch, deformconv
        >>> x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
        >>> offset = torch.zeros(1, 18, 3, 3)
        >>> with deformconv.use_backend("reference"):
        ...     y = deformconv.deform_conv2d(x, offset, w)
        >>> y.shape
        torch.Size([1, 3, 3, 3])
    """
    if name not in _known():
        raise ValueError(f"use_backend: name must be one of {_known()}; got {name!r}")
    token = _CHOICE.set(name)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def resolve(device_type: str) -> str:
    """The backend that runs a call on ``device_type`` under the current choice.

    Raises:
        ValueError: the chosen backend cannot run on ``device_type`` here.
    """
    available = available_backends(device_type)
    current = _CHOICE.get()
    if current == "auto":
        return available[0]
    if current not in available:
        raise ValueError(
            f"deformconv backend {current!r} cannot run on device type {device_type!r} here; "
            f"available: {available}"
        )
    return current


def _constant_for_compile(fn: Callable[..., str]) -> Callable[..., str]:
    # torch.compiler.assume_constant_result imports torch._dynamo (over a second at
    # `import deformconv`); when Dynamo is not loaded yet, set the mark it would set.
    # tests/test_compile.py checks that the public decorator still sets this mark.
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)  # type: ignore[no-any-return]
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_constant_for_compile
def resolve_traced(device_type: str, choice: str) -> str:
    """:func:`resolve` as torch.compile sees it: a constant computed once while tracing.

    ``choice`` (the traced :func:`get_backend`) makes the compiled code guard on, and
    recompile for, a change of :func:`use_backend`.
    """
    del choice  # resolve() reads the same choice
    return resolve(device_type)
