"""Helpers for the ecosystem tests (compile, export, ONNX, AMP, channels_last, DDP, determinism).

``PATHS`` lists every way a CPU call can run: each available backend, plus
``reference-op``, the reference kernel behind the ``deformconv::deform_conv2d``
custom op (what a fast backend looks like to torch), so the custom-op plumbing
is tested even where no fast backend is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

import deformconv
from deformconv.ops import _backend
from deformconv.ops._library import _ReferenceKernels

OP_PATH = "reference-op"
PATHS = [*deformconv.available_backends("cpu"), OP_PATH]


class SpyKernels(_ReferenceKernels):
    """Reference kernels that record whether every tensor they received was contiguous."""

    DETERMINISTIC_BACKWARD = True
    calls: list[bool] = []

    @classmethod
    def _record(cls, *tensors: torch.Tensor | None) -> None:
        cls.calls.append(all(t.is_contiguous() for t in tensors if t is not None))

    @classmethod
    def forward(cls, input, offset, mask, weight, bias, stride, padding, dilation):
        cls._record(input, offset, mask, weight, bias)
        return _ReferenceKernels.forward(
            input, offset, mask, weight, bias, stride, padding, dilation
        )

    @classmethod
    def backward(cls, grad_output, input, offset, mask, weight, bias, stride, padding, dilation):
        cls._record(grad_output, input, offset, mask, weight, bias)
        return _ReferenceKernels.backward(
            grad_output, input, offset, mask, weight, bias, stride, padding, dilation
        )


@contextlib.contextmanager
def on_path(path: str, kernels: type = SpyKernels) -> Iterator[None]:
    """Run deformconv calls on ``path`` (a backend name, or ``reference-op``)."""
    if path != OP_PATH:
        with deformconv.use_backend(path):
            yield
        return
    test_backend = _backend.FastBackend(OP_PATH, ("cpu", "cuda"), lambda: True, lambda: kernels)
    saved = list(_backend._FAST)
    _backend._FAST.append(test_backend)
    _backend.kernels.cache_clear()
    try:
        with deformconv.use_backend(OP_PATH):
            yield
    finally:
        _backend._FAST[:] = saved
        _backend.kernels.cache_clear()


class TinyNet(nn.Module):
    """conv -> DeformConv2d -> relu -> DeformConv2d (stride (2, 1), 2 offset groups, no bias)."""

    def __init__(self, modulated: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.deform1 = deformconv.DeformConv2d(4, 4, 3, padding=1, modulated=modulated)
        self.deform2 = deformconv.DeformConv2d(
            4, 2, 3, stride=(2, 1), padding=1, offset_groups=2, bias=False, modulated=modulated
        )
        # Non-zero offset predictors, so the layers really deform (a fresh layer is a conv).
        for layer in (self.deform1, self.deform2):
            nn.init.normal_(layer.conv_offset.weight, std=0.3)
            nn.init.normal_(layer.conv_offset.bias, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deform2(torch.relu(self.deform1(self.stem(x))))


def grads(model: nn.Module, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Parameter gradients (and the input's, if given) by name."""
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if x is not None and x.grad is not None:
        out["input"] = x.grad.clone()
    return out


def deform_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The graph's ``deformconv::deform_conv2d`` calls."""
    op = torch.ops.deformconv.deform_conv2d.default
    return [n for n in graph.nodes if n.op == "call_function" and n.target is op]
