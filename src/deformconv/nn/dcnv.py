"""DCNv3 (InternImage) and DCNv4 (FlashInternImage) modules.

Same constructor arguments, forward signatures, parameter names and state-dict keys as
OpenGVLab's ``DCNv3`` (``ops_dcnv3/modules/dcnv3.py``) and ``DCNv4``
(``DCNv4/modules/dcnv4.py``), so their checkpoints load with ``load_state_dict`` and
compute what they computed, without CUDA extensions. The core op is
:func:`deformconv.dcnv3` / :func:`deformconv.dcnv4`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformconv.ops.dcnv import dcnv3, dcnv4

__all__ = ["DCNv3", "DCNv4"]


class _ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C) (a view)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _norm(channels: int, norm_layer: str, device: Any, dtype: torch.dtype | None) -> nn.Sequential:
    # InternImage's build_norm_layer(channels, norm_layer, 'channels_first', 'channels_last'):
    # the layer indices (and so the state-dict keys dw_conv.1.1.* / dw_conv.1.0.*) match.
    if norm_layer == "LN":
        return nn.Sequential(
            _ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6, device=device, dtype=dtype)
        )
    if norm_layer == "BN":
        return nn.Sequential(
            nn.BatchNorm2d(channels, device=device, dtype=dtype), _ToChannelsLast()
        )
    raise ValueError(f"DCNv3: norm_layer must be 'LN' or 'BN'; got {norm_layer!r}")


def _act(act_layer: str) -> nn.Module:
    layers: dict[str, type[nn.Module]] = {"ReLU": nn.ReLU, "SiLU": nn.SiLU, "GELU": nn.GELU}
    if act_layer not in layers:
        raise ValueError(f"DCNv3: act_layer must be one of {list(layers)}; got {act_layer!r}")
    return layers[act_layer]()


def _check_common(where: str, channels: int, group: int, kernel_size: int,
                  remove_center: bool) -> None:  # fmt: skip
    if group < 1 or channels < 1 or channels % group != 0:
        raise ValueError(
            f"{where}: channels must be a positive multiple of group={group}; got {channels}"
        )
    if kernel_size < 1:
        raise ValueError(f"{where}: kernel_size must be positive; got {kernel_size}")
    if remove_center and kernel_size % 2 == 0:
        raise ValueError(f"{where}: remove_center needs an odd kernel_size; got {kernel_size}")


class DCNv3(nn.Module):
    r"""InternImage's DCNv3 block: projections around the :func:`deformconv.dcnv3` core.

    ``input_proj`` gives the sampled values; a depthwise conv, a norm and an activation
    (``dw_conv``) give the features from which ``offset`` and ``mask`` (softmax over
    each group's P points) are predicted; the core's result goes through
    ``output_proj``. With ``center_feature_scale`` the core's result is blended with the
    projected input by a learned per-group gate.

    Args:
        channels: C, a multiple of ``group``.
        kernel_size: K of the K x K sampling grid.
        dw_kernel_size: the depthwise conv's kernel size (default ``kernel_size``).
        stride: the core's stride (InternImage uses 1: the offsets are predicted at the
            input's resolution).
        pad: the core's zero padding.
        dilation: the core's dilation.
        group: G, the number of groups (heads) with their own offsets and mask.
        offset_scale: scale of the kernel's footprint and of the offsets.
        act_layer: ``"GELU"``, ``"ReLU"`` or ``"SiLU"`` after the depthwise conv's norm.
        norm_layer: ``"LN"`` (LayerNorm, eps 1e-6) or ``"BN"`` (BatchNorm2d).
        center_feature_scale: learn the gate (parameters
            ``center_feature_scale_proj_weight`` (G, C) and ``..._bias`` (G,)).
        remove_center: leave out the centre point (P = K² - 1; odd K).
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        - input: (N, H, W, C), channels last.
        - output: (N, H_out, W_out, C), ``H_out = (H + 2·pad - dilation·(K-1) - 1) // stride + 1``.

    Example:
        >>> import torch, deformconv
        >>> layer = deformconv.nn.DCNv3(channels=16, group=4)
        >>> layer(torch.randn(2, 8, 8, 16)).shape
        torch.Size([2, 8, 8, 16])
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_common("DCNv3", channels, group, kernel_size, remove_center)
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        points = kernel_size * kernel_size - self.remove_center
        factory = {"device": device, "dtype": dtype}
        self.dw_conv = nn.Sequential(
            nn.Conv2d(
                channels,
                channels,
                dw_kernel_size,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
                **factory,
            ),  # fmt: skip
            _norm(channels, norm_layer, device, dtype),
            _act(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2, **factory)
        self.mask = nn.Linear(channels, group * points, **factory)
        self.input_proj = nn.Linear(channels, channels, **factory)
        self.output_proj = nn.Linear(channels, channels, **factory)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.zeros(group, channels, **factory)
            )
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """InternImage's initialisation: zero offsets and mask logits, Xavier projections."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def extra_repr(self) -> str:
        """Non-default hyper-parameters."""
        parts = [f"channels={self.channels}", f"group={self.group}"]
        defaults = {"kernel_size": 3, "stride": 1, "pad": 1, "dilation": 1, "offset_scale": 1.0}
        parts += [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        if self.dw_kernel_size != self.kernel_size:
            parts.append(f"dw_kernel_size={self.dw_kernel_size}")
        if self.center_feature_scale:
            parts.append("center_feature_scale=True")
        if self.remove_center:
            parts.append("remove_center=True")
        return ", ".join(parts)

    def forward(self, input: Tensor) -> Tensor:
        """(N, H, W, C) -> (N, H_out, W_out, C); see the class docstring."""
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(x1)
        mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1)
        mask = mask.reshape(n, h, w, -1).to(x.dtype)
        x = dcnv3(
            x, offset.to(x.dtype), mask, self.kernel_size, self.stride, self.pad, self.dilation,
            self.group, self.offset_scale, bool(self.remove_center),
        )  # fmt: skip
        if self.center_feature_scale:
            scale = F.linear(
                x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            ).sigmoid()
            scale = scale.repeat_interleave(self.group_channels, dim=-1)
            x = x * (1 - scale) + x_proj * scale
        return self.output_proj(x)  # type: ignore[no-any-return]


class DCNv4(nn.Module):
    r"""FlashInternImage's DCNv4 block around the :func:`deformconv.dcnv4` core.

    ``value_proj`` gives the sampled values; one linear layer ``offset_mask`` (after an
    optional depthwise conv ``offset_mask_dw``) predicts the offsets and the raw mask,
    G·3·P channels padded to a multiple of 8; ``output_proj`` mixes the result. With
    ``without_pointwise`` the two projections are left out. With
    ``center_feature_scale`` the result is blended with the projected input by a learned
    per-group gate computed from the result (as OpenGVLab's module does).

    Args:
        channels: C, a multiple of ``group``.
        kernel_size: K of the K x K sampling grid.
        stride: the core's stride (1 in FlashInternImage).
        pad: the core's zero padding.
        dilation: the core's dilation.
        group: G, the number of groups (heads).
        offset_scale: scale of the kernel's footprint and of the offsets.
        dw_kernel_size: if given, a depthwise conv of this size runs on the input before
            ``offset_mask``.
        center_feature_scale: learn the gate.
        remove_center: leave out the centre point (P = K² - 1; odd K).
        output_bias: ``output_proj`` has a bias.
        without_pointwise: no ``value_proj`` / ``output_proj``.
        device: where to create the parameters.
        dtype: the parameters' dtype.
        **kwargs: ``act_layer`` and ``norm_layer`` are accepted and ignored, as
            OpenGVLab's module ignores them.

    Shape:
        - input: (N, L, C) with ``shape=(H, W)``, L = H·W (H = W = √L when ``shape`` is
          None), or (N, H, W, C).
        - output: (N, L, C), or (N, H, W, C) for a 4-D input (stride 1, same-size padding).

    Example:
        >>> import torch, deformconv
        >>> layer = deformconv.nn.DCNv4(channels=32, group=2)
        >>> layer(torch.randn(2, 6 * 5, 32), shape=(6, 5)).shape
        torch.Size([2, 30, 32])
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - {"act_layer", "norm_layer"})
        if unknown:
            raise TypeError(f"DCNv4: unexpected keyword arguments {unknown}")
        _check_common("DCNv4", channels, group, kernel_size, remove_center)
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.without_pointwise = without_pointwise
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        factory = {"device": device, "dtype": dtype}
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(
                channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
                groups=channels, **factory,
            )  # fmt: skip
        self.offset_mask = nn.Linear(channels, math.ceil(self.K * 3 / 8) * 8, **factory)
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels, **factory)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias, **factory)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.zeros(group, channels, **factory)
            )
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenGVLab's initialisation: a zero ``offset_mask``, Xavier projections."""
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def extra_repr(self) -> str:
        """Non-default hyper-parameters."""
        parts = [f"channels={self.channels}", f"group={self.group}"]
        defaults = {"kernel_size": 3, "stride": 1, "pad": 1, "dilation": 1, "offset_scale": 1.0,
                    "dw_kernel_size": None}  # fmt: skip
        parts += [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        for flag in ("center_feature_scale", "remove_center", "without_pointwise"):
            if getattr(self, flag):
                parts.append(f"{flag}=True")
        if not self.without_pointwise and self.output_proj.bias is None:
            parts.append("output_bias=False")
        return ", ".join(parts)

    def forward(self, input: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
        """(N, L, C) with ``shape=(H, W)``, or (N, H, W, C); see the class docstring."""
        four_d = input.dim() == 4
        if four_d:
            n, h, w, c = input.shape
            input = input.reshape(n, h * w, c)
        else:
            n, length, c = input.shape
            h, w = shape if shape is not None else (math.isqrt(length), math.isqrt(length))
            if h * w != length:
                raise ValueError(
                    f"DCNv4: input's L={length} must equal H*W for shape=(H, W)={(h, w)}"
                    + (" (H = W = isqrt(L) without shape)" if shape is None else "")
                )
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, h, w, -1)
        if self.dw_kernel_size is not None:
            om_input = self.offset_mask_dw(input.reshape(n, h, w, c).permute(0, 3, 1, 2))
            om_input = om_input.permute(0, 2, 3, 1).reshape(n, h * w, c)
        else:
            om_input = input
        offset_mask = self.offset_mask(om_input).reshape(n, h, w, -1)
        x_proj = x
        x = dcnv4(
            x, offset_mask.to(x.dtype), self.kernel_size, self.stride, self.pad, self.dilation,
            self.group, self.offset_scale, bool(self.remove_center),
        )  # fmt: skip
        if self.center_feature_scale:
            scale = F.linear(
                x, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            ).sigmoid()
            scale = scale.repeat_interleave(self.group_channels, dim=-1)
            x = x * (1 - scale) + x_proj * scale
        h_out, w_out = x.shape[1], x.shape[2]
        x = x.reshape(n, h_out * w_out, -1)
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x.reshape(n, h_out, w_out, -1) if four_d else x
