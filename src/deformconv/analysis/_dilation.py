"""Effective dilation: mean distance between adjacent sampling locations of a filter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.nn import DeformConv2d

__all__ = ["effective_dilation", "layer_effective_dilation"]


def effective_dilation(offset: Tensor, kernel_size: IntPair, dilation: IntPair = 1) -> Tensor:
    """Effective dilation of every filter application (the paper's Table 2 measure).

    The mean Euclidean distance between the sampling locations of horizontally and
    vertically adjacent kernel points (K_h·(K_w-1) + (K_h-1)·K_w pairs), in units of the
    layer's input map. With zero offsets it equals the dilation (``(d_h + d_w) / 2``
    weighted by the pair counts when they differ).

    Args:
        offset: (N, 2·G·K_h·K_w, H_out, W_out) in the torchvision layout.
        kernel_size: int or (K_h, K_w), not 1x1.
        dilation: int or (d_h, d_w).

    Returns:
        (N, G, H_out, W_out) in ``offset``'s dtype.

    Example:
        >>> import torch
        >>> effective_dilation(torch.zeros(1, 18, 4, 4), 3, dilation=2).unique()
        tensor([2.])
    """
    where = "effective_dilation"
    k_h, k_w = pair(kernel_size, "kernel_size", where)
    d_h, d_w = pair(dilation, "dilation", where)
    k = k_h * k_w
    if k < 2:
        raise ValueError(f"{where}: kernel_size must have more than one point; got {(k_h, k_w)}")
    if offset.dim() != 4 or offset.shape[1] % (2 * k):
        raise ValueError(
            f"{where}: offset must be (N, 2*G*K_h*K_w, H_out, W_out) with K_h*K_w={k}; "
            f"got shape {tuple(offset.shape)}"
        )
    n, c, h, w = offset.shape
    off = offset.reshape(n, c // (2 * k), k_h, k_w, 2, h, w)
    rows = torch.arange(k_h, device=offset.device, dtype=offset.dtype) * d_h
    cols = torch.arange(k_w, device=offset.device, dtype=offset.dtype) * d_w
    y = off[:, :, :, :, 0] + rows[:, None, None, None]  # (N, G, K_h, K_w, H, W)
    x = off[:, :, :, :, 1] + cols[None, :, None, None]
    total = offset.new_zeros(n, c // (2 * k), h, w)
    pairs = 0
    if k_w > 1:
        dist = torch.hypot(y[:, :, :, 1:] - y[:, :, :, :-1], x[:, :, :, 1:] - x[:, :, :, :-1])
        total = total + dist.sum(dim=(2, 3))
        pairs += k_h * (k_w - 1)
    if k_h > 1:
        dist = torch.hypot(y[:, :, 1:] - y[:, :, :-1], x[:, :, 1:] - x[:, :, :-1])
        total = total + dist.sum(dim=(2, 3))
        pairs += (k_h - 1) * k_w
    return total / pairs


def layer_effective_dilation(layer: nn.Module) -> Tensor:
    """Effective dilation of a ``DeformConv2d`` over its last forward pass.

    Args:
        layer: a :class:`~deformconv.DeformConv2d` that has run forward.

    Returns:
        (N, G, H_out, W_out), from ``layer.last_offset``.

    Example:
        >>> import torch
        >>> from deformconv import DeformConv2d
        >>> layer = DeformConv2d(4, 4, 3, padding=2, dilation=2, record=True)
        >>> _ = layer(torch.randn(2, 4, 8, 8))
        >>> d = layer_effective_dilation(layer)
        >>> d.shape, d.mean().item()
        (torch.Size([2, 1, 8, 8]), 2.0)
    """
    if not isinstance(layer, DeformConv2d):
        raise TypeError(
            f"layer_effective_dilation: layer must be a DeformConv2d; got {type(layer).__name__}"
        )
    if layer.last_offset is None:
        raise ValueError(
            "layer_effective_dilation: layer has no last_offset; run forward first (record=True)"
        )
    return effective_dilation(layer.last_offset, layer.kernel_size, layer.dilation)
