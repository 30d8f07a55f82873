"""Load mmdetection / detectron2 DCN ResNet weights into a deformified torchvision ResNet."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deformconv.models import deformify
from deformconv.nn import DeformConv2d

__all__ = ["convert_resnet_state_dict", "load_dcn_resnet"]

LAYOUTS = ("mmdet", "detectron2")

# detectron2 ResNet key -> torchvision ResNet key (stage resN is torchvision's layer{N-1}).
_D2_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^stem\.conv1\.weight$"), "conv1.weight"),
    (re.compile(r"^stem\.conv1\.norm\.(\w+)$"), r"bn1.\1"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.weight$"), r"layer{\1}.\2.conv\3.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$"), r"layer{\1}.\2.bn\3.\4"),
    (re.compile(r"^res(\d)\.(\d+)\.conv2_offset\.(\w+)$"), r"layer{\1}.\2.conv2.conv_offset.\3"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.weight$"), r"layer{\1}.\2.downsample.0.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$"), r"layer{\1}.\2.downsample.1.\3"),
    (re.compile(r"^linear\.(\w+)$"), r"fc.\1"),
]


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict inside a checkpoint file's dict (mmdet: 'state_dict'; detectron2: 'model')."""
    for key in ("state_dict", "model"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    return {k: torch.as_tensor(v) for k, v in checkpoint.items() if not isinstance(v, Mapping)}


def _detect_layout(keys: list[str]) -> str:
    if any(re.search(r"(^|\.)(stem\.conv1|res[2-5]\.\d+)\.", k) for k in keys):
        return "detectron2"
    if any(re.search(r"(^|\.)layer[1-4]\.\d+\.", k) for k in keys):
        return "mmdet"
    raise ValueError(
        "convert_resnet_state_dict: cannot tell the layout: no mmdetection "
        "('layer1.0.…') or detectron2 ('res2.0.…', 'stem.conv1.…') ResNet keys"
    )


def _strip_prefix(state: dict[str, Tensor], layout: str, prefix: str | None) -> dict[str, Tensor]:
    if prefix is None:
        candidates = ["backbone.bottom_up.", "backbone.", ""] if layout == "detectron2" else [
            "backbone.", ""]  # fmt: skip
        prefix = next(p for p in candidates if any(k.startswith(p) for k in state))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def convert_resnet_state_dict(
    state_dict: Mapping[str, Any], layout: str = "auto", *, prefix: str | None = None
) -> dict[str, Tensor]:
    """Rename the keys of an mmdetection or detectron2 ResNet to torchvision's ResNet keys.

    A deformable ``conv2`` becomes a :class:`~deformconv.DeformConv2d` in the
    torchvision model, so its offset predictor is ``layer{i}.{j}.conv2.conv_offset.*``:
    mmdetection already uses these names (``DCN``/``DCNv2`` are mmcv packs holding
    ``conv_offset``); detectron2's ``res{i+1}.{j}.conv2_offset.*`` is renamed to it,
    as are its ``stem.conv1``, ``res{s}.{j}.conv{k}[.norm]`` and ``shortcut[.norm]``.
    Keys outside the backbone (necks, heads) are dropped.

    Args:
        state_dict: a state dict, or a checkpoint dict holding one under
            ``"state_dict"`` (mmdetection) or ``"model"`` (detectron2); values may be
            tensors or numpy arrays (detectron2's ``.pkl`` files).
        layout: ``"mmdet"``, ``"detectron2"`` or ``"auto"`` (told by the keys).
        prefix: the backbone's key prefix; by default ``"backbone."`` (mmdetection
            detectors), ``"backbone.bottom_up."`` then ``"backbone."`` (detectron2),
            else none.

    Returns:
        The backbone's tensors under torchvision ResNet names.

    Raises:
        ValueError: an unknown layout, or no ResNet keys.

    Example:
        >>> import torch
        >>> d2 = {"backbone.bottom_up.res5.0.conv2_offset.weight": torch.zeros(27, 512, 3, 3),
        ...       "backbone.bottom_up.res5.0.conv2.norm.running_mean": torch.zeros(512),
        ...       "roi_heads.box_predictor.cls_score.bias": torch.zeros(81)}
        >>> sorted(convert_resnet_state_dict(d2))
        ['layer4.0.bn2.running_mean', 'layer4.0.conv2.conv_offset.weight']
    """
    where = "convert_resnet_state_dict"
    state = _unwrap(state_dict)
    if layout == "auto":
        layout = _detect_layout(list(state))
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: layout must be 'auto' or one of {LAYOUTS}; got {layout!r}")
    state = _strip_prefix(state, layout, prefix)
    if layout == "mmdet":
        return state
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, template in _D2_RULES:
            match = pattern.match(key)
            if match:
                new = match.expand(template)
                new = re.sub(r"layer\{(\d)\}", lambda m: f"layer{int(m.group(1)) - 1}", new)
                out[new] = value
                break
    return out


def _offset_config(
    name: str, conv: nn.Module, channels: int, modulated: bool | None
) -> tuple[int, bool]:
    """(offset groups, modulated) of the layer whose offset predictor has ``channels``."""
    where = "load_dcn_resnet"
    kernel: tuple[int, int] = conv.kernel_size  # type: ignore[assignment]
    c_in: int = conv.in_channels  # type: ignore[assignment]
    k = kernel[0] * kernel[1]
    options = [
        (channels // (f * k), f == 3)
        for f in (2, 3)
        if channels % (f * k) == 0 and c_in % (channels // (f * k)) == 0
    ]
    if modulated is not None:
        options = [o for o in options if o[1] == modulated]
    if len(options) != 1:
        raise ValueError(
            f"{where}: cannot tell from {channels} offset channels whether {name!r} "
            f"(K_h*K_w={k}, C_in={c_in}) is modulated; pass modulated=True or False"
            if len(options) > 1
            else f"{where}: {name!r} has {channels} offset channels, which is neither "
            f"2*G*{k} nor 3*G*{k} for a G dividing C_in={c_in}"
            + ("" if modulated is None else f" with modulated={modulated}")
        )
    return options[0]


def load_dcn_resnet(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    layout: str = "auto",
    *,
    prefix: str | None = None,
    modulated: bool | None = None,
    stride_in_1x1: bool | None = None,
) -> nn.Module:
    """Load an mmdetection or detectron2 DCN ResNet checkpoint into a torchvision ResNet.

    The keys are converted by :func:`convert_resnet_state_dict`. Every convolution that
    has an offset predictor in the checkpoint is made deformable by
    :func:`deformconv.deformify` (unless it is one already), with the checkpoint's
    offset groups and ``mask_activation="sigmoid"`` (mmcv's and detectron2's mask), and
    the weights are loaded. Then the model computes what the source backbone computed
    (given the source's input normalisation).

    Strict, except for the keys a detection backbone does not have: the classifier
    ``fc.*`` and BatchNorm's ``num_batches_tracked`` (detectron2 freezes its norms)
    keep the model's values.

    Args:
        model: a torchvision ResNet with Bottleneck blocks (resnet50, resnet101,
            resnext…), plain or already deformified.
        state_dict: the checkpoint's state dict or the checkpoint dict itself.
        layout: ``"mmdet"``, ``"detectron2"`` or ``"auto"``.
        prefix: see :func:`convert_resnet_state_dict`.
        modulated: whether the deformable layers are DCNv2; by default told from the
            number of offset channels (an error where it is ambiguous).
        stride_in_1x1: the checkpoint strides its stages in the 1x1 ``conv1`` (detectron2's
            ``RESNETS.STRIDE_IN_1X1``, True by default there and for its MSRA weights;
            mmdetection's ``style="caffe"``) rather than in the 3x3 ``conv2`` as
            torchvision does; the model's strides are moved to match. Default: True for
            detectron2, False for mmdetection.

    Returns:
        ``model``, converted in place and loaded.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the checkpoint does not fit the model (keys missing or unexpected,
            offset channels that fit no layer).

    Example:
        >>> import torch, torchvision
        >>> from deformconv.compat import load_dcn_resnet
        >>> source = torchvision.models.resnet50()
        >>> state = {f"backbone.{k}": v for k, v in source.state_dict().items()
        ...          if not k.startswith("fc.")}
        >>> state["backbone.layer4.0.conv2.conv_offset.weight"] = torch.zeros(27, 512, 3, 3)
        >>> state["backbone.layer4.0.conv2.conv_offset.bias"] = torch.zeros(27)
        >>> model = load_dcn_resnet(torchvision.models.resnet50(), state)
        >>> model.deformified, model.layer4[0].conv2.mask_activation
        (['layer4.0.conv2'], 'sigmoid')
    """
    where = "load_dcn_resnet"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module; got {type(model).__name__}")
    state = _unwrap(state_dict)
    if layout == "auto":
        layout = _detect_layout(list(state))
    converted = convert_resnet_state_dict(state, layout, prefix=prefix)
    if stride_in_1x1 is None:
        stride_in_1x1 = layout == "detectron2"
    modules = dict(model.named_modules())
    suffix = ".conv_offset.weight"
    for key in sorted(k for k in converted if k.endswith(suffix)):
        name = key[: -len(suffix)]
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d | DeformConv2d):
            raise ValueError(
                f"{where}: the checkpoint has an offset predictor for {name!r}, which is not "
                "a convolution of model"
            )
        groups, is_modulated = _offset_config(name, conv, converted[key].shape[0], modulated)
        if isinstance(conv, DeformConv2d):
            if (conv.offset_groups, conv.modulated) != (groups, is_modulated):
                raise ValueError(
                    f"{where}: {name!r} is a DeformConv2d with offset_groups="
                    f"{conv.offset_groups}, modulated={conv.modulated}; the checkpoint has "
                    f"offset_groups={groups}, modulated={is_modulated}"
                )
            conv.mask_activation = "sigmoid"
        else:
            deformify(
                model, names=[name], offset_groups=groups, modulated=is_modulated,
                mask_activation="sigmoid",
            )  # fmt: skip
    if stride_in_1x1:
        _move_strides_to_1x1(model)
    result = model.load_state_dict(converted, strict=False)
    missing = [
        k for k in result.missing_keys
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]  # fmt: skip
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{where}: the {layout} checkpoint does not fit model: "
            f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}"
            f"{' …' if len(result.unexpected_keys) > 8 else ''}"
        )
    return model


def _move_strides_to_1x1(model: nn.Module) -> None:
    """Stride each Bottleneck's 1x1 ``conv1`` instead of its 3x3 ``conv2``."""
    for module in model.modules():
        conv1, conv2 = getattr(module, "conv1", None), getattr(module, "conv2", None)
        if not (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d | DeformConv2d)):
            continue
        if conv1.kernel_size != (1, 1) or tuple(conv2.stride) == (1, 1):
            continue
        conv1.stride = tuple(conv2.stride)  # type: ignore[assignment]
        conv2.stride = (1, 1)
        if isinstance(conv2, DeformConv2d):
            conv2.conv_offset.stride = (1, 1)
