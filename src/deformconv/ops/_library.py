"""The kernels behind one ``torch.library`` custom op, ``deformconv::deform_conv2d``.

torch.compile, torch.export and ``torch.library.opcheck`` see a single node with a
fake (shape-only) kernel and a registered autograd formula; the node calls the
named backend's ``forward``, and ``deformconv::deform_conv2d_backward`` its
``backward``. Double backward is not available through these ops: the eager
reference path (plain torch ops, see :func:`deformconv.deform_conv2d`) has it.

Backends served:
    - every fast backend registered in ``ops/_fast_backends.py``;
    - ``"reference"``: forward by ``kernels/reference.py``, backward by
      ``torch.autograd.grad`` of it. Eager calls on the reference backend do not use the
      op (they run plain, twice-differentiable torch ops); ``torch.export`` does, so
      an exported graph always holds one ``deformconv::deform_conv2d`` node.

What this layer does for every backend, so kernels need not:
    - Layout: arguments are made contiguous once, here (a channels_last input costs
      one copy, never a slow kernel path); the output and the gradients are
      contiguous, as the fake kernels say. :func:`deformconv.deform_conv2d` gives
      the output back in the input's memory format.
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

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from deformconv.kernels import reference
from deformconv.ops import _backend
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
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
        leaves = [
            None if t is None else t.detach().requires_grad_()
            for t in (input, offset, mask, weight, bias)
        ]
        # Kernels run below autograd (its dispatch keys are excluded): re-enable them to
        # differentiate the reference kernel.
        with _autograd_dispatch(), torch.enable_grad():
            x, off, m, w, b = leaves
            out = reference.deform_conv2d(x, off, m, w, b, stride, padding, dilation)  # type: ignore[arg-type]
            used = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(out, used, grad_output))
        gi, go, gm, gw, gb = (None if t is None else next(grads) for t in leaves)
        return gi, go, gm, gw, gb  # type: ignore[return-value]


def _autograd_dispatch() -> Any:
    """A guard under which autograd records again inside a custom op's kernel."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (
        torch._C.DispatchKey.AutogradCPU,
        torch._C.DispatchKey.AutogradCUDA,
        torch._C.DispatchKey.ADInplaceOrView,
    ):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


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
        (N, C_out, H_out, W_out), contiguous, in ``input``'s dtype.
    """
    # Validated here too, so that direct calls (TorchScript's) never reach a kernel unchecked.
    check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    kernels = _kernels(backend, input.device.type)
    dt = _compute_dtype(kernels, input.dtype)
    args = [_prepare(t, dt) for t in (input, offset, mask, weight, bias)]
    out = kernels.forward(*args, _t(stride), _t(padding), _t(dilation))
    return out.to(input.dtype).contiguous()


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
    """Gradients for (input, offset, mask, weight, bias); an empty tensor stands for None.

    Each gradient is contiguous, with its argument's shape and dtype.
    """
    device_type = input.device.type
    kernels = _kernels(backend, device_type)
    if not getattr(kernels, "DETERMINISTIC_BACKWARD", device_type == "cpu"):
        _alert_not_deterministic(
            f"deformconv::deform_conv2d_backward (backend {backend!r} on {device_type})"
        )
    dt = _compute_dtype(kernels, input.dtype)
    originals = (input, offset, mask, weight, bias)
    args = [_prepare(t, dt) for t in (grad_output, *originals)]
    grads = kernels.backward(*args, _t(stride), _t(padding), _t(dilation))
    return [
        input.new_empty(0) if g is None or t is None else g.to(t.dtype).contiguous()
        for g, t in zip(grads, originals, strict=True)
    ]


@deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, mask, weight, bias, stride, padding, dilation, backend):  # type: ignore[no-untyped-def]
    return [
        input.new_empty(0) if t is None else t.new_empty(t.shape)
        for t in (input, offset, mask, weight, bias)
    ]


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    input, offset, mask, weight, bias, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.args = (stride, padding, dilation, backend)


def _backward(ctx, grad_output):  # type: ignore[no-untyped-def]
    input, offset, mask, weight, bias = ctx.saved_tensors
    gi, go, gm, gw, gb = deform_conv2d_backward_op(
        grad_output, input, offset, mask, weight, bias, *ctx.args
    )
    return (
        gi, go, None if mask is None else gm, gw, None if bias is None else gb,
        None, None, None, None,
    )  # fmt: skip


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("deformconv::deform_conv2d", _device_type, torch.float32)
