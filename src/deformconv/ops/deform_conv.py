"""The public deformable-convolution op: validate, then dispatch to a kernel."""

from __future__ import annotations

from torch import Tensor

from deformconv._utils import IntPair
from deformconv.kernels import reference
from deformconv.ops import _backend
from deformconv.ops._library import deform_conv2d_op
from deformconv.ops._validation import check_deform_conv2d

__all__ = ["deform_conv2d"]


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
    geo = check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    backend = _backend.resolve(input.device.type)
    if backend == "reference":
        return reference.deform_conv2d(
            input, offset, mask, weight, bias, geo.stride, geo.padding, geo.dilation
        )
    return deform_conv2d_op(
        input, offset, mask, weight, bias, geo.stride, geo.padding, geo.dilation, backend
    )
