"""Training helpers: optimizer parameter groups for deformable models, offset recording."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from deformconv.nn import DeformConv2d, DeformRoIPool2d

__all__ = ["param_groups", "recording"]

# Attribute names of offset (and mask) predictors: ours and mmcv's packs (``conv_offset``;
# ``offset_fc``/``mask_fc`` of RoI pooling), detectron2's blocks (``conv2_offset``).
_CONV_PREDICTORS = ("conv_offset",)
_ROI_PREDICTORS = ("offset_fc", "mask_fc")


def _predictor_kind(module_name: str, parent: nn.Module | None) -> str | None:
    """'offset', 'roi_offset' or None for the module called ``module_name``."""
    last = module_name.rpartition(".")[2]
    if last in _ROI_PREDICTORS and (
        isinstance(parent, DeformRoIPool2d) or hasattr(parent, "offset_fc")
    ):
        return "roi_offset"
    if last in _CONV_PREDICTORS or (last.endswith("_offset") and last.startswith("conv")):
        return "offset"
    return None


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    offset_lr_mult: float = 0.1,
    roi_offset_lr_mult: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the offset predictors at a reduced learning rate.

    The groups partition ``model.parameters()`` (every parameter exactly once, shared
    ones included once):

    - ``"offset"``: the offset and mask predictors of deformable convolutions
      (``conv_offset`` of :class:`~deformconv.DeformConv2d` and of mmcv's packs,
      ``conv<i>_offset`` of detectron2's blocks) at ``lr * offset_lr_mult``
      (0.1 in DCNv2);
    - ``"roi_offset"``: the ``offset_fc``/``mask_fc`` heads of deformable RoI pooling
      at ``lr * roi_offset_lr_mult`` (DCNv1 used 0.01; defaults to ``offset_lr_mult``);
    - ``"decay"``: every other parameter with more than one dimension (weights), with
      ``weight_decay``;
    - ``"no_decay"``: the remaining one-dimensional parameters (biases, norm scales).

    Offset predictors get no weight decay: it would pull the offsets toward the
    regular grid. Each group carries ``"name"``, ``"lr"``, ``"lr_mult"`` (its
    multiplier, for schedules that rescale ``lr``) and ``"weight_decay"``; empty groups
    are left out.

    Args:
        model: any ``nn.Module``.
        lr: the base learning rate.
        offset_lr_mult: learning-rate multiplier of the convolution offset predictors.
        roi_offset_lr_mult: learning-rate multiplier of the RoI offset heads.
        weight_decay: weight decay of the ``"decay"`` group.

    Returns:
        A list of parameter-group dicts for any ``torch.optim`` optimizer.

    Example:
        >>> import torch
        >>> from deformconv import DeformConv2d, param_groups
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), DeformConv2d(8, 8, 3))
        >>> groups = param_groups(net, lr=0.1, weight_decay=1e-4)
        >>> for g in groups:
        ...     print(g["name"], len(g["params"]), round(g["lr"], 6))
        decay 2 0.1
        no_decay 2 0.1
        offset 2 0.01
        >>> optimizer = torch.optim.SGD(groups, momentum=0.9)
    """
    where = "param_groups"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module; got {type(model).__name__}")
    roi_mult = offset_lr_mult if roi_offset_lr_mult is None else roi_offset_lr_mult
    checks = {"lr": lr, "offset_lr_mult": offset_lr_mult, "roi_offset_lr_mult": roi_mult,
              "weight_decay": weight_decay}  # fmt: skip
    for name, value in checks.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{where}: {name} must be a non-negative number; got {value!r}")
    modules = dict(model.named_modules())
    kinds: dict[int, str] = {}
    for name, module in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        kind = _predictor_kind(name, parent) if name else None
        if kind is not None:
            for p in module.parameters():
                kinds.setdefault(id(p), kind)
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "offset": [],
                                             "roi_offset": []}  # fmt: skip
    for p in model.parameters():
        kind = kinds.get(id(p)) or ("decay" if p.dim() > 1 else "no_decay")
        groups[kind].append(p)
    mults = {"decay": 1.0, "no_decay": 1.0, "offset": offset_lr_mult, "roi_offset": roi_mult}
    return [
        {
            "name": kind,
            "params": params,
            "lr": lr * mults[kind],
            "lr_mult": mults[kind],
            "weight_decay": weight_decay if kind == "decay" else 0.0,
        }
        for kind, params in groups.items()
        if params
    ]


@contextlib.contextmanager
def recording(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, deformable layers of ``model`` keep the offsets and masks they use.

    Sets ``record`` on every :class:`~deformconv.DeformConv2d` (and on any other
    module with a boolean ``record`` attribute, such as RoI pooling layers that offer
    it) and restores each previous value on exit; the recorded ``last_offset`` /
    ``last_mask`` stay readable after the block.

    Args:
        model: any ``nn.Module``.
        enabled: record (True) or stop recording (False) within the block.

    Yields:
        ``model``.

    Example:
        >>> import torch
        >>> from deformconv import DeformConv2d, recording
        >>> net = torch.nn.Sequential(DeformConv2d(2, 4, 3, padding=1))
        >>> with recording(net):
        ...     _ = net(torch.randn(1, 2, 5, 5))
        >>> net[0].last_offset.shape, net[0].record
        (torch.Size([1, 18, 5, 5]), False)
    """
    layers = [
        m for m in model.modules()
        if isinstance(m, DeformConv2d) or isinstance(getattr(m, "record", None), bool)
    ]  # fmt: skip
    previous = [layer.record for layer in layers]
    try:
        for layer in layers:
            layer.record = enabled  # type: ignore[assignment]
        yield model
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer.record = value
