"""The fully connected heads that predict a deformable RoI pooling's offsets and mask.

Shared by :class:`~deformconv.nn.DeformRoIPool2d` and
:class:`~deformconv.nn.DeformMultiScaleRoIAlign`, with mmcv's layout (``offset_fc.{0,2,4}``,
``mask_fc.{0,2}``), so checkpoints of either load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mask_head", "offset_head", "reset_heads"]


def _mlp(
    sizes: list[int], device: torch.device | str | None, dtype: torch.dtype | None
) -> nn.Sequential:
    """Linear layers of the given sizes with a ReLU between each two."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        if i:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(n_in, n_out, device=device, dtype=dtype))
    return nn.Sequential(*layers)


def offset_head(
    in_features: int,
    hidden: int,
    bins: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """Linear → ReLU → Linear → ReLU → Linear: a pooled RoI to its ``2 · bins`` offsets."""
    return _mlp([in_features, hidden, hidden, 2 * bins], device, dtype)


def mask_head(
    in_features: int,
    hidden: int,
    bins: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """Linear → ReLU → Linear: a pooled RoI to its ``bins`` mask logits."""
    return _mlp([in_features, hidden, bins], device, dtype)


def reset_heads(*heads: nn.Sequential | None) -> None:
    """``nn.Linear``'s default init for the hidden layers; the last layers to 0.

    Zero last layers make a fresh module pool exactly like its plain counterpart.
    """
    for head in heads:
        if head is None:
            continue
        for layer in head:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        last = head[-1]
        assert isinstance(last, nn.Linear)  # for mypy: built by the functions above
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
