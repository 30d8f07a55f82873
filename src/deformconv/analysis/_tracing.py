"""Trace the sampling locations of one output unit back through stacked deformable layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from deformconv._utils import pair
from deformconv.nn import DeformConv2d

__all__ = ["SamplingField", "sampling_field", "trace_sampling_locations"]


class SamplingField(NamedTuple):
    """One layer's geometry and the offsets/mask it used for one sample.

    Attributes:
        offset: (2·K_h·K_w, H_out, W_out), one offset group; channel 2k is Δy of kernel
            point k = i·K_w + j, channel 2k + 1 its Δx.
        mask: (K_h·K_w, H_out, W_out) or None (all ones).
        kernel_size: (K_h, K_w).
        stride: (s_h, s_w).
        padding: (p_h, p_w).
        dilation: (d_h, d_w).
    """

    offset: Tensor
    mask: Tensor | None
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def sampling_field(
    layer: nn.Module,
    *,
    sample: int = 0,
    offset_group: int = 0,
    out_size: tuple[int, int] | None = None,
) -> SamplingField:
    """The offsets and mask that ``layer`` used for one sample of its last forward pass.

    Args:
        layer: a :class:`~deformconv.DeformConv2d` that has run forward (its
            ``last_offset``/``last_mask`` are read), or an ``nn.Conv2d`` (zero offsets,
            no mask; then ``out_size`` is required).
        sample: index n in the batch of the last forward pass.
        offset_group: which offset group g to describe.
        out_size: (H_out, W_out), only for ``nn.Conv2d``.

    Returns:
        A :class:`SamplingField` in float64 on the CPU.

    Raises:
        TypeError: ``layer`` is neither kind.
        ValueError: the layer has not run forward, or an index is out of range.

    Example:
        >>> import torch
        >>> from deformconv import DeformConv2d
        >>> layer = DeformConv2d(4, 4, 3, padding=1, modulated=True, record=True)
        >>> _ = layer(torch.randn(2, 4, 6, 6))
        >>> field = sampling_field(layer, sample=1)
        >>> field.offset.shape, field.mask.shape
        (torch.Size([18, 6, 6]), torch.Size([9, 6, 6]))
    """
    where = "sampling_field"
    if isinstance(layer, DeformConv2d):
        if layer.last_offset is None:
            raise ValueError(
                f"{where}: layer has no last_offset; run a forward pass first (record=True)"
            )
        offset, mask = layer.last_offset, layer.last_mask
        groups = layer.offset_groups
        kernel, stride, padding, dilation = (
            layer.kernel_size, layer.stride, layer.padding, layer.dilation
        )  # fmt: skip
    elif isinstance(layer, nn.Conv2d):
        if out_size is None:
            raise ValueError(f"{where}: out_size=(H_out, W_out) is required for an nn.Conv2d")
        kernel = pair(layer.kernel_size, "kernel_size", where)
        stride = pair(layer.stride, "stride", where)
        dilation = pair(layer.dilation, "dilation", where)
        if isinstance(layer.padding, str):
            raise ValueError(f"{where}: string padding {layer.padding!r} is not supported")
        padding = pair(layer.padding, "padding", where)
        offset = torch.zeros(1, 2 * kernel[0] * kernel[1], *out_size)
        mask, groups = None, 1
    else:
        raise TypeError(
            f"{where}: layer must be a DeformConv2d or an nn.Conv2d; got {type(layer).__name__}"
        )
    if not 0 <= sample < offset.shape[0]:
        raise ValueError(f"{where}: sample must be in [0, {offset.shape[0]}); got {sample}")
    if not 0 <= offset_group < groups:
        raise ValueError(f"{where}: offset_group must be in [0, {groups}); got {offset_group}")
    k = kernel[0] * kernel[1]
    g = offset_group
    off = offset[sample, 2 * g * k : 2 * (g + 1) * k].detach().double().cpu()
    msk = None if mask is None else mask[sample, g * k : (g + 1) * k].detach().double().cpu()
    return SamplingField(off, msk, kernel, stride, padding, dilation)


def _interpolate(field: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear interpolation of field (C, H, W) at positions (P,), clamped to the border."""
    _, h, w = field.shape
    y = y.clamp(0, h - 1)
    x = x.clamp(0, w - 1)
    y0, x0 = y.floor().long(), x.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    ly, lx = y - y0, x - x0
    out = (
        field[:, y0, x0] * (1 - ly) * (1 - lx)
        + field[:, y0, x1] * (1 - ly) * lx
        + field[:, y1, x0] * ly * (1 - lx)
        + field[:, y1, x1] * ly * lx
    )
    return out.T  # (P, C)


def trace_sampling_locations(
    layers: Sequence[nn.Module | SamplingField],
    unit: tuple[int, int],
    *,
    sample: int = 0,
    offset_group: int = 0,
    out_size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampling locations of one output unit traced back through stacked layers (Figure 7).

    ``layers`` are given in forward order, each one reading (directly, or through
    spatially neutral layers such as 1x1 convs, norms and activations) the map the
    previous one wrote. Starting from ``unit`` on the last layer's output, each layer
    maps every point to its K_h·K_w sampling locations
    ``p·stride - padding + p_k·dilation + Δp_k(p)`` on its input. Where ``p`` is
    fractional (every layer but the last), the offset and mask fields are
    interpolated bilinearly at ``p`` (clamped to the map's border). Three 3x3 layers
    give 9·9·9 = 729 points.

    Args:
        layers: ``DeformConv2d`` layers that have run forward, ``nn.Conv2d`` layers
            (zero offsets), or :class:`SamplingField` records, in forward order.
        unit: (row, col) of the output unit on the last layer's output map.
        sample: index n in the batch of the last forward pass.
        offset_group: which offset group g to follow.
        out_size: (H_out, W_out) of the last layer; needed only when it is an
            ``nn.Conv2d``. An ``nn.Conv2d`` elsewhere takes its output size from the
            next layer (the smallest input size consistent with that layer's output).

    Returns:
        ``(points, weights)``: points (K^L, 2) as (y, x) in float64 coordinates of the
        first layer's input map, ordered with the last layer's kernel point as the
        slowest index; weights (K^L,), the product of the masks along each path
        (all ones for unmodulated layers).

    Example:
        >>> import torch
        >>> from deformconv import DeformConv2d
        >>> net = torch.nn.Sequential(*[DeformConv2d(2, 2, 3, padding=1, record=True)
        ...                           for _ in range(3)])
        >>> _ = net(torch.randn(1, 2, 9, 9))
        >>> points, weights = trace_sampling_locations(list(net), unit=(4, 4))
        >>> points.shape, weights.shape
        (torch.Size([729, 2]), torch.Size([729]))
        >>> points.min(0).values.tolist(), points.max(0).values.tolist()  # zero offsets
        ([1.0, 1.0], [7.0, 7.0])
    """
    where = "trace_sampling_locations"
    if len(layers) == 0:
        raise ValueError(f"{where}: layers must not be empty")
    fields: list[SamplingField] = []
    # Walk backwards so an nn.Conv2d can take its output size from the next layer's input.
    for layer in reversed(list(layers)):
        if isinstance(layer, SamplingField):
            field = layer
        elif isinstance(layer, nn.Conv2d) and not isinstance(layer, DeformConv2d):
            if out_size is None:
                raise ValueError(
                    f"{where}: out_size is required when the last layer is an nn.Conv2d"
                )
            field = sampling_field(layer, out_size=out_size)
        else:
            field = sampling_field(layer, sample=sample, offset_group=offset_group)
        fields.append(field)
        h, w = field.offset.shape[-2:]
        (s_h, s_w), (p_h, p_w) = field.stride, field.padding
        (d_h, d_w), (k_h, k_w) = field.dilation, field.kernel_size
        out_size = ((h - 1) * s_h - 2 * p_h + d_h * (k_h - 1) + 1,
                    (w - 1) * s_w - 2 * p_w + d_w * (k_w - 1) + 1)  # fmt: skip
    last_h, last_w = fields[0].offset.shape[-2:]
    if not (0 <= unit[0] < last_h and 0 <= unit[1] < last_w):
        raise ValueError(f"{where}: unit must lie in the {last_h}x{last_w} output; got {unit}")

    y = torch.tensor([float(unit[0])], dtype=torch.float64)
    x = torch.tensor([float(unit[1])], dtype=torch.float64)
    weights = torch.ones(1, dtype=torch.float64)
    for field in fields:  # last layer first
        (k_h, k_w), k = field.kernel_size, field.kernel_size[0] * field.kernel_size[1]
        off = _interpolate(field.offset, y, x).reshape(-1, k, 2)  # (P, K, 2)
        grid_y = torch.arange(k_h, dtype=torch.float64).repeat_interleave(k_w)
        grid_x = torch.arange(k_w, dtype=torch.float64).repeat(k_h)
        new_y = (y[:, None] * field.stride[0] - field.padding[0]
                 + grid_y * field.dilation[0] + off[..., 0])  # fmt: skip
        new_x = (x[:, None] * field.stride[1] - field.padding[1]
                 + grid_x * field.dilation[1] + off[..., 1])  # fmt: skip
        if field.mask is not None:
            weights = (weights[:, None] * _interpolate(field.mask, y, x)).reshape(-1)
        else:
            weights = weights.repeat_interleave(k)
        y, x = new_y.reshape(-1), new_x.reshape(-1)
    return torch.stack([y, x], dim=1), weights
