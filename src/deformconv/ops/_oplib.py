"""Custom operators defined from typed Python functions, without a Dynamo import per process.

``torch.library.custom_op`` wraps every implementation in ``torch._disable_dynamo``,
which imports ``torch._dynamo`` at the op's first call: seconds of start-up in every
eager process (a script, a ``spawn`` worker) that never compiles anything. An operator
defined with the lower-level public API (:func:`torch.library.define`,
:func:`torch.library.impl`) is the same operator to the dispatcher, ``torch.compile``,
``torch.export``, ONNX export and ``opcheck``; :class:`CustomOp` does that and keeps
Dynamo away from the implementation only once Dynamo is loaded — before that, no
compiled region can be running.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CustomOp", "custom_op"]

_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


class CustomOp:
    """The operator ``qualname`` implemented by ``fn``, whose type hints give the schema.

    Called like ``fn``; :attr:`default` is the ``OpOverload`` (for ``opcheck`` and graph
    targets). Registers like ``torch.library.custom_op``'s result: :meth:`register_fake`,
    :meth:`register_autograd`. Mutates none of its arguments.
    """

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        namespace, name = qualname.split("::")
        self.qualname = qualname
        self._lib = _library(namespace)
        schema = torch.library.infer_schema(fn, mutates_args=())
        torch.library.define(qualname, schema, lib=self._lib)
        torch.library.impl(
            qualname, "CompositeExplicitAutograd", _outside_dynamo(fn), lib=self._lib
        )
        self.default: torch._ops.OpOverload = getattr(getattr(torch.ops, namespace), name).default
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.default(*args, **kwargs)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fn`` as the shape-only kernel (a decorator)."""
        torch.library.register_fake(self.qualname, fn, lib=self._lib)
        return fn

    def register_autograd(
        self, backward: Callable[..., Any], *, setup_context: Callable[..., Any]
    ) -> None:
        """Register the autograd formula, as ``torch.library.register_autograd``."""
        torch.library.register_autograd(
            self.qualname, backward, setup_context=setup_context, lib=self._lib
        )


def custom_op(qualname: str) -> Callable[[Callable[..., Any]], CustomOp]:
    """Decorator form of :class:`CustomOp`."""
    return functools.partial(CustomOp, qualname)


def _outside_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, run with Dynamo disabled once Dynamo is loaded (as ``custom_op`` does)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def impl(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn, recursive=True))
        return disabled[0](*args, **kwargs)

    return impl
