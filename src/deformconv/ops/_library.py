"""The kernels behind one ``torch.library`` custom op, ``deformconv::deform_conv2d``.

torch.compile, torch.export and ``torch.library.opcheck`` see a single node with a
fake (shape-only) kernel and a registered autograd formula; the node calls the
named backend's ``forward``, and ``deformconv::deform_conv2d_backward`` its
``backward``, computing only the gradients autograd needs (``needs_grad``).

Double backward works on every backend: the backward op has its own autograd formula,
the vector-Jacobian product of the first-order gradients computed by the reference
(:func:`deformconv.kernels.reference.deform_conv2d_double_backward`, chunked under the
reference's workspace bound).

Backends served:
    - every fast backend registered in ``ops/_fast_backends.py``;
    - ``"reference"``: forward by ``kernels/reference.py``, backward by its chunked
      ``torch.func.vjp`` (public API, works below autograd). Eager calls on the
      reference backend do not use the op (they run plain, twice-differentiable torch
      ops); ``torch.export`` does, so an exported graph always holds one
      ``deformconv::deform_conv2d`` node.

The backend contract's ``backward`` takes an optional keyword ``needs_grad``, a 5-tuple
of bools for ``(input, offset, mask, weight, bias)``; a kernel may return None for an
entry that is not needed. Kernels whose ``backward`` lacks the keyword get every
gradient computed.

What this layer does for every backend, so kernels need not:
    - Layout: arguments are made contiguous once, here (a channels_last input costs
      one copy, never a slow kernel path), except that a kernel module whose optional
      ``CHANNELS_LAST`` attribute is True gets a channels_last ``input``, ``weight``
      and ``grad_output`` as they are. The output comes back in the input's memory
      format (channels_last, or contiguous), each gradient in its argument's, as the
      fake kernels say.
    - Dtype: float16/bfloat16 arguments are computed in float32 and the results
      cast back, unless the kernel module lists the dtype in its optional
      ``NATIVE_DTYPES`` attribute (default: float32 and float64).
    - Determinism: under ``torch.use_deterministic_algorithms(True)`` the backward
      raises torch's standard error for a kernel module whose optional
      ``DETERMINISTIC_BACKWARD`` attribute is False. Without the attribute, CPU
      backward kernels count as deterministic and all others as not.
    - Autocast (CPU and CUDA): the op's floating arguments are cast to float32
      (``torch.library.register_autocast``); :func:`deformconv.deform_conv2d`
      also casts the output to the autocast dtype.
    - Portability: a graph saved with a backend that cannot run the input's device
      here (say ``numba`` on a CUDA tensor) runs on the backend ``auto`` picks.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from deformconv.kernels import reference
from deformconv.ops import _backend
from deformconv.ops._oplib import custom_op
from deformconv.ops._validation import check_deform_conv2d

__all__ = ["deform_conv2d_backward_op", "deform_conv2d_op"]

_DEFAULT_NATIVE = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


class _ReferenceKernels:
    """The reference kernel with the fast-backend interface (``_backend.Kernels``)."""

    NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    DETERMINISTIC_BACKWARD = True  # torch makes gather's backward deterministic on request

    @staticmethod
    def forward(
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        return reference.deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(
        grad_output: Tensor,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        needs_grad: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        return reference.deform_conv2d_backward(
            grad_output, input, offset, mask, weight, bias, stride, padding, dilation,
            needs_grad,
        )  # fmt: skip


@functools.cache
def _takes_needs_grad(backward: Any) -> bool:
    try:
        return "needs_grad" in inspect.signature(backward).parameters
    except (TypeError, ValueError):
        return False


def _alert_not_deterministic(caller: str) -> None:
    """Torch's standard error (or warning, with ``warn_only=True``) in deterministic mode."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{caller} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for "
        "this operation, or you can use the 'warn_only=True' option, if that's acceptable "
        "for your application."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def _t(v: Sequence[int]) -> tuple[int, int]:
    return int(v[0]), int(v[1])


def _kernels(backend: str, device_type: str) -> Any:
    if backend == "auto":  # TorchScript calls: the choice in force when the op runs
        backend = _backend.resolve(device_type)
    if backend == "reference":
        return _ReferenceKernels
    available = _backend.available_backends(device_type)
    name = backend if backend in available else available[0]
    return _ReferenceKernels if name == "reference" else _backend.kernels(name)


def _compute_dtype(kernels: Any, dtype: torch.dtype) -> torch.dtype:
    native = getattr(kernels, "NATIVE_DTYPES", _DEFAULT_NATIVE)
    return torch.float32 if dtype in _HALF and dtype not in native else dtype


def _prepare(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _prepare_map(t: Tensor, dtype: torch.dtype, kernels: Any) -> Tensor:
    """A 4-D argument for ``kernels``: channels_last kept where they take it."""
    if getattr(kernels, "CHANNELS_LAST", False) and _is_channels_last(t):
        return t.to(dtype)  # keeps the memory format
    return t.to(dtype).contiguous()


def _is_channels_last(t: Tensor) -> bool:
    # Both layouts at once (one channel, one pixel) counts as contiguous, as in torch.
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _format(t: Tensor | None) -> torch.memory_format:
    """The memory format of a result laid out as ``t`` (the output as the input)."""
    return (
        torch.channels_last if t is not None and _is_channels_last(t) else torch.contiguous_format
    )


@custom_op("deformconv::deform_conv2d")
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
    """Forward of a validated call on ``backend`` (a fast backend or ``"reference"``).

    Args:
        input: (N, C_in, H_in, W_in).
        offset: (N, 2·G·K_h·K_w, H_out, W_out).
        mask: (N, G·K_h·K_w, H_out, W_out) or None.
        weight: (C_out, C_in/groups, K_h, K_w).
        bias: (C_out,) or None.
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
        backend: the backend's name.

    Returns:
        (N, C_out, H_out, W_out) in ``input``'s dtype and memory format (channels_last,
        or contiguous).
    """
    # Validated here too, so that direct calls (TorchScript's) never reach a kernel unchecked.
    check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    kernels = _kernels(backend, input.device.type)
    dt = _compute_dtype(kernels, input.dtype)
    args = [
        _prepare_map(input, dt, kernels), _prepare(offset, dt), _prepare(mask, dt),
        _prepare_map(weight, dt, kernels), _prepare(bias, dt),
    ]  # fmt: skip
    out = kernels.forward(*args, _t(stride), _t(padding), _t(dilation))
    return out.to(input.dtype).contiguous(memory_format=_format(input))


@deform_conv2d_op.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation, backend):  # type: ignore[no-untyped-def]
    out = input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    return out.contiguous(memory_format=_format(input))


@custom_op("deformconv::deform_conv2d_backward")
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
    needs_grad: Sequence[bool],
) -> list[Tensor]:
    """Gradients for (input, offset, mask, weight, bias); an empty tensor stands for None.

    Each gradient has its argument's shape, dtype and memory format (channels_last, or
    contiguous). ``needs_grad`` (5 bools) says which gradients to compute; the others
    come back empty.
    """
    device_type = input.device.type
    kernels = _kernels(backend, device_type)
    if not getattr(kernels, "DETERMINISTIC_BACKWARD", device_type == "cpu"):
        _alert_not_deterministic(
            f"deformconv::deform_conv2d_backward (backend {backend!r} on {device_type})"
        )
    dt = _compute_dtype(kernels, input.dtype)
    originals = (input, offset, mask, weight, bias)
    wanted = tuple(bool(w) and t is not None for w, t in zip(needs_grad, originals, strict=True))
    args = [
        _prepare_map(grad_output, dt, kernels), _prepare_map(input, dt, kernels),
        _prepare(offset, dt), _prepare(mask, dt), _prepare_map(weight, dt, kernels),
        _prepare(bias, dt),
    ]  # fmt: skip
    geometry = (_t(stride), _t(padding), _t(dilation))
    if _takes_needs_grad(kernels.backward):
        grads = kernels.backward(*args, *geometry, needs_grad=wanted)
    else:
        grads = kernels.backward(*args, *geometry)
    formats = [_format(t) for t in originals]
    return [
        g.to(t.dtype).contiguous(memory_format=f)
        if g is not None and t is not None and w
        else input.new_empty(0)
        for g, t, w, f in zip(grads, originals, wanted, formats, strict=True)
    ]


@deform_conv2d_backward_op.register_fake
def _(
    grad_output, input, offset, mask, weight, bias, stride, padding, dilation, backend, needs_grad
):  # type: ignore[no-untyped-def]
    originals = (input, offset, mask, weight, bias)
    formats = [_format(t) for t in originals]
    return [
        t.new_empty(t.shape).contiguous(memory_format=f)
        if t is not None and w
        else input.new_empty(0)
        for t, w, f in zip(originals, needs_grad, formats, strict=True)
    ]


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    input, offset, mask, weight, bias, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.args = (stride, padding, dilation, backend)


def _backward(ctx, grad_output):  # type: ignore[no-untyped-def]
    input, offset, mask, weight, bias = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    gi, go, gm, gw, gb = deform_conv2d_backward_op(
        grad_output, input, offset, mask, weight, bias, *ctx.args, needs
    )
    originals = (input, offset, mask, weight, bias)
    grads = [
        g if n and t is not None else None
        for g, n, t in zip((gi, go, gm, gw, gb), needs, originals, strict=True)
    ]
    return (*grads, None, None, None, None)


def _setup_context_backward(ctx, inputs, output):  # type: ignore[no-untyped-def]
    grad_output, input, offset, mask, weight, bias, stride, padding, dilation, backend, needs = (
        inputs
    )
    ctx.save_for_backward(grad_output, input, offset, mask, weight, bias)
    ctx.args = (_t(stride), _t(padding), _t(dilation))
    ctx.needs = [bool(n) for n in needs]


def _double_backward(ctx, grad_grads):  # type: ignore[no-untyped-def]
    grad_output, input, offset, mask, weight, bias = ctx.saved_tensors
    cotangents = [
        g if n and g is not None and g.numel() > 0 else None
        for g, n in zip(grad_grads, ctx.needs, strict=True)
    ]
    grads = reference.deform_conv2d_double_backward(
        cotangents, grad_output, input, offset, mask, weight, bias, *ctx.args,
        needs_grad=[bool(n) for n in ctx.needs_input_grad[:6]],
    )  # fmt: skip
    return (*grads, None, None, None, None, None)


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
deform_conv2d_backward_op.register_autograd(_double_backward, setup_context=_setup_context_backward)
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("deformconv::deform_conv2d", _device_type, torch.float32)
