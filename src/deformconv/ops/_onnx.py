"""ONNX: deform_conv2d becomes the standard ``DeformConv`` operator (opset 19).

Two routes, both ending in the node torchvision's op exports to:

- ``torch.onnx.export(model, args, dynamo=True)``: while the exporter traces the
  model, :func:`deformconv.deform_conv2d` emits ``DeformConv`` itself through the
  public ``torch.onnx.ops.symbolic`` (:func:`symbolic_deform_conv`), whatever the
  backend. No translation table is needed, because the exporter's registry is
  built before tracing from torch's and onnxscript's own tables, and it can
  only be extended per call (``custom_translation_table``).
- An ``ExportedProgram`` from ``torch.export.export`` holds
  ``deformconv::deform_conv2d`` nodes; pass ``custom_translation_table=``
  :func:`onnx_translation_table` to ``torch.onnx.export`` for it.

ONNX ``DeformConv`` exists from opset 19 (torch 2.14 exports opset 20 by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deformconv.ops._validation import ConvGeometry

__all__ = ["in_onnx_export", "onnx_translation_table", "symbolic_deform_conv"]

OPSET = 19


def in_onnx_export() -> bool:
    """Whether ``torch.onnx.export`` is tracing the caller right now."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def symbolic_deform_conv(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    geo: ConvGeometry,
) -> Tensor:
    """An ONNX ``DeformConv`` node (valid only while ``torch.onnx.export`` traces).

    Args:
        input: (N, C_in, H_in, W_in).
        offset: (N, 2·G·K_h·K_w, H_out, W_out).
        mask: (N, G·K_h·K_w, H_out, W_out) or None.
        weight: (C_out, C_in/groups, K_h, K_w).
        bias: (C_out,) or None.
        geo: the validated geometry of the call.

    Returns:
        (N, C_out, H_out, W_out), a placeholder that the exporter turns into the node.
    """
    attrs = _attributes(geo.stride, geo.padding, geo.dilation, geo.groups, geo.offset_groups)
    shape = (input.shape[0], weight.shape[0], *geo.out_size)
    return torch.onnx.ops.symbolic(
        "DeformConv", (input, weight, offset, bias, mask), attrs,
        dtype=input.dtype, shape=shape, version=OPSET,
    )  # fmt: skip


def _attributes(
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    offset_groups: int,
) -> dict[str, Any]:
    return {
        "dilations": list(dilation),
        "strides": list(stride),
        "pads": [padding[0], padding[1], padding[0], padding[1]],
        "group": groups,
        "offset_group": offset_groups,
    }


def onnx_translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for exporting graphs that hold our custom op.

    Needed only when exporting an ``ExportedProgram`` (``torch.export.export``'s
    result) or a graph captured with the op; a plain ``torch.onnx.export(model,
    args, dynamo=True)`` emits ``DeformConv`` without it. Needs onnxscript
    (``pip install deformconv[onnx]``).

    Returns:
        ``{torch.ops.deformconv.deform_conv2d.default: translation}``.

    Example:
        >>> import torch
        >>> from deformconv.ops import onnx_translation_table
        >>> list(onnx_translation_table()) == [torch.ops.deformconv.deform_conv2d.default]
        True
    """
    from onnxscript import opset19

    def deform_conv2d(  # noqa: PLR0913 (the op's schema)
        input: Any,
        offset: Any,
        mask: Any,
        weight: Any,
        bias: Any,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        backend: str,
    ) -> Any:
        c_in, c_per_group = int(input.shape[1]), int(weight.shape[1])
        k = int(weight.shape[2]) * int(weight.shape[3])
        attrs = _attributes(
            (stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1]),
            c_in // c_per_group, int(offset.shape[1]) // (2 * k),
        )  # fmt: skip
        return opset19.DeformConv(input, weight, offset, bias, mask, **attrs)

    return {torch.ops.deformconv.deform_conv2d.default: deform_conv2d}
