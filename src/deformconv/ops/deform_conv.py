"""The public deformable-convolution op: validate, then dispatch to a kernel.

Routing of a validated call (see ``ops/_library.py`` for the custom op):

============================  ==============================  ===========================
call                          reference backend               fast backend
============================  ==============================  ===========================
eager, ``torch.compile``      plain torch ops (twice          ``deformconv::deform_conv2d``
                              differentiable; dynamo traces
                              and fuses them)
``torch.export``              ``deformconv::deform_conv2d``   ``deformconv::deform_conv2d``
``torch.onnx.export``         ONNX ``DeformConv`` (opset 19)  ONNX ``DeformConv``
============================  ==============================  ===========================

Under ``torch.autocast`` (CPU or CUDA) the float16/bfloat16/float32 tensors on the
autocast device are cast to float32 first (so mixed dtypes are accepted, as
``F.conv2d`` accepts them), the op computes in float32, and the output is cast to
the autocast dtype. torch.compile resolves the backend while tracing and
recompiles when :func:`deformconv.use_backend` changes the choice.

Under ``torch.jit.script`` and ``torch.jit.trace`` the function is one call of the
``deformconv::deform_conv2d`` custom op with backend ``"auto"``, which the op resolves
when it runs (so :func:`deformconv.use_backend` applies to scripted and traced code
too). The op validates its arguments itself (its errors reach TorchScript callers as
``RuntimeError``); autocast casts the op's arguments to float32 and leaves the output
in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deformconv._utils import IntPair
from deformconv.kernels import reference
from deformconv.ops import _backend, _onnx
from deformconv.ops._library import _is_channels_last, deform_conv2d_op
from deformconv.ops._validation import check_deform_conv2d

__all__ = ["deform_conv2d"]

_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    r"""Deformable convolution (Dai et al. 2017), modulated (DCNv2) when ``mask`` is given.

    Same signature, semantics and layouts as :func:`torchvision.ops.deform_conv2d`:

    ``y(p0) = sum_n w(p_n) · m_n(p0) · x(p0·stride - padding + p_n·dilation + Δp_n(p0))``

    where ``x(·)`` at a fractional position is bilinear interpolation. A sample
    with ``y <= -1``, ``y >= H_in``, ``x <= -1`` or ``x >= W_in`` reads 0; otherwise
    each of its four corners outside the map reads 0. NaN and infinite offsets read 0
    (their gradient is 0); nothing is ever read outside the input.

    Args:
        input: (N, C_in, H_in, W_in).
        offset: (N, 2·G·K_h·K_w, H_out, W_out), G offset groups (inferred; G divides C_in).
            Channel 2·(g·K_h·K_w + k) is Δy of kernel point k = i·K_w + j of offset group g,
            channel 2·(g·K_h·K_w + k) + 1 is its Δx. Input channel c uses group c // (C_in/G).
        weight: (C_out, C_in/groups, K_h, K_w); groups = C_in / weight.shape[1].
        bias: (C_out,) or None.
        stride: int or (s_h, s_w), positive.
        padding: int or (p_h, p_w), non-negative (zero padding).
        dilation: int or (d_h, d_w), positive.
        mask: (N, G·K_h·K_w, H_out, W_out) or None; channel g·K_h·K_w + k multiplies
            kernel point k of group g (a raw multiplier: apply any activation yourself).

    Returns:
        (N, C_out, H_out, W_out) with ``H_out = (H_in + 2·p_h - d_h·(K_h-1) - 1) // s_h + 1``
        (likewise W_out), in ``input``'s dtype.

    Raises:
        TypeError: a non-tensor, an integer tensor, or a malformed stride/padding/dilation.
        ValueError: shapes, devices or dtypes that break the rules above; an empty output.

    Example:
        >>> import torch
        >>> from deformconv import deform_conv2d
        >>> x = torch.randn(2, 4, 8, 8)
        >>> weight = torch.randn(6, 4, 3, 3)
        >>> offset = torch.randn(2, 2 * 3 * 3, 8, 8)   # one offset group
        >>> deform_conv2d(x, offset, weight, padding=1).shape
        torch.Size([2, 6, 8, 8])
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return _scripted(input, offset, weight, bias, stride, padding, dilation, mask)
    input, offset, weight, bias, mask, out_dtype = _autocast(input, offset, weight, bias, mask)
    geo = check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    if _onnx.in_onnx_export():
        return _onnx.symbolic_deform_conv(input, offset, mask, weight, bias, geo)
    backend = _backend.resolve_traced(input.device.type, _backend.get_backend())
    args = (input, offset, mask, weight, bias, geo.stride, geo.padding, geo.dilation)
    if backend == "reference" and not torch.compiler.is_exporting():
        out = reference.deform_conv2d(*args)
    else:
        out = deform_conv2d_op(*args, backend)
    if _is_channels_last(input):
        out = out.contiguous(memory_format=torch.channels_last)
    return out if out_dtype is None else out.to(out_dtype)


def _scripted(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    mask: Tensor | None,
) -> Tensor:
    # The TorchScript path (script and trace): plain data flow into the custom op, which
    # validates its arguments and resolves "auto" when it runs.
    s = [stride, stride] if isinstance(stride, int) else [stride[0], stride[1]]
    p = [padding, padding] if isinstance(padding, int) else [padding[0], padding[1]]
    d = [dilation, dilation] if isinstance(dilation, int) else [dilation[0], dilation[1]]
    out = torch.ops.deformconv.deform_conv2d(input, offset, mask, weight, bias, s, p, d, "auto")
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _autocast(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, torch.dtype | None]:
    """Under autocast on input's device: cast eligible tensors to float32; else no-op.

    Returns:
        The five tensors and the dtype to cast the output to (None: leave it).
    """
    if not isinstance(input, Tensor):
        return input, offset, weight, bias, mask, None  # the validator says why
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, offset, weight, bias, mask, None

    def cast(t: Tensor | None) -> Tensor | None:
        eligible = isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE
        return t.float() if eligible and t.device.type == device_type else t  # type: ignore[union-attr]

    out_dtype = torch.get_autocast_dtype(device_type) if input.dtype != torch.float64 else None
    i, o, w = cast(input), cast(offset), cast(weight)
    return i, o, w, cast(bias), cast(mask), out_dtype  # type: ignore[return-value]
