"""The fast backends behind one ``torch.library`` custom op, ``deformconv::deform_conv2d``.

torch.compile, torch.export and the ONNX exporter see a single node with a fake
(shape-only) kernel and a registered autograd formula; the node calls the
named backend's forward and ``deformconv::deform_conv2d_backward`` its backward.
Double backward is not available through this op (use the reference backend).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deformconv.ops import _backend

__all__ = ["deform_conv2d_op"]


def _t(v: Sequence[int]) -> tuple[int, int]:
    return int(v[0]), int(v[1])


@torch.library.custom_op("deformconv::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> Tensor:
    """Forward of a validated call on the fast backend ``backend``."""
    kernels = _backend.kernels(backend)
    return kernels.forward(
        input, offset, mask, weight, bias, _t(stride), _t(padding), _t(dilation)
    )


@deform_conv2d_op.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation, backend):  # type: ignore[no-untyped-def]
    return input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


@torch.library.custom_op("deformconv::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> list[Tensor]:
    """Gradients (input, offset, mask, weight, bias); an empty tensor stands for None."""
    grads = _backend.kernels(backend).backward(
        grad_output.contiguous(), input, offset, mask, weight, bias,
        _t(stride), _t(padding), _t(dilation),
    )  # fmt: skip
    return [g if g is not None else input.new_empty(0) for g in grads]


@deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, mask, weight, bias, stride, padding, dilation, backend):  # type: ignore[no-untyped-def]
    empty = input.new_empty(0)
    return [
        torch.empty_like(input),
        torch.empty_like(offset),
        empty if mask is None else torch.empty_like(mask),
        torch.empty_like(weight),
        empty if bias is None else torch.empty_like(bias),
    ]


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    input, offset, mask, weight, bias, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.args = (stride, padding, dilation, backend)


def _backward(ctx, grad_output):  # type: ignore[no-untyped-def]
    input, offset, mask, weight, bias = ctx.saved_tensors
    gi, go, gm, gw, gb = deform_conv2d_backward_op(grad_output, input, offset, mask, weight, bias, *ctx.args)
    return (
        gi, go, None if mask is None else gm, gw, None if bias is None else gb,
        None, None, None, None,
    )  # fmt: skip


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
