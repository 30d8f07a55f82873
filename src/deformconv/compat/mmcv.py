"""mmcv's deformable layers under their own names, arguments and parameter names.

``deformconv.compat.mmcv`` mirrors ``mmcv.ops``: :class:`DeformConv2d` and
:class:`ModulatedDeformConv2d` take external offsets (and mask);
:class:`DeformConv2dPack` and :class:`ModulatedDeformConv2dPack` (mmdetection's
``DCN`` / ``DCNv2``) own a ``conv_offset`` predictor; :class:`DeformRoIPool`,
:class:`DeformRoIPoolPack` and :class:`ModulatedDeformRoIPoolPack` pool RoIs. State
dicts saved from mmcv load with ``strict=True`` and the modules compute what mmcv's
compute, including its conventions:

- ``ModulatedDeformConv2dPack`` splits ``conv_offset``'s 3·G·K_h·K_w channels with
  ``torch.chunk(out, 3, dim=1)`` into two offset halves (concatenated: the
  torchvision layout) and mask logits, and the mask is ``sigmoid(logits)``.
- ``ModulatedDeformRoIPoolPack``'s mask is ``sigmoid`` too (``mask_fc`` ends with
  ``nn.Sigmoid``) and multiplies the pooled values; RoI pooling uses the half-pixel
  (``aligned=True``) convention and offsets ordered (x, y), as mmcv's kernels.

Differences: none in what is computed. mmcv zero-pads inputs smaller than the kernel
before its kernel runs; the op here computes the same values without padding, and
raises for inputs whose output would be empty. ``im2col_step`` is accepted and stored
but has no effect.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.ops import deform_conv2d, deform_roi_pool
from deformconv.ops._errors import ArgumentError

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
]


def _deform_groups(cls: str, deform_groups: int, deformable_groups: int | None) -> int:
    if deformable_groups is None:
        return deform_groups
    warnings.warn(
        f"{cls}: deformable_groups is deprecated, use deform_groups", FutureWarning, stacklevel=3
    )
    return deformable_groups


class _DeformBase(nn.Module):
    """Hyper-parameters shared by mmcv's deformable convolutions."""

    def __init__(
        self,
        where: str,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
        deform_groups: int,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{where}: groups={groups} must divide in_channels={in_channels} "
                f"and out_channels={out_channels}"
            )
        if deform_groups < 1 or in_channels % deform_groups:
            raise ValueError(
                f"{where}: deform_groups={deform_groups} must divide in_channels={in_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.padding = pair(padding, "padding", where)
        self.dilation = pair(dilation, "dilation", where)
        self.groups, self.deform_groups = groups, deform_groups
        # As mmcv: compatibility with code that inspects nn.Conv2d's attributes.
        self.transposed = False
        self.output_padding = (0,)

    def extra_repr(self) -> str:
        """The layer's hyper-parameters, named as mmcv names them."""
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, deform_groups={self.deform_groups}"
        )

    def _check_offset(self, where: str, offset: Tensor, factor: int) -> None:
        expected = factor * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        if offset.dim() == 4 and offset.shape[1] != expected:
            name = "offset" if factor == 2 else "mask"
            rule = "2*" if factor == 2 else ""
            raise ArgumentError(
                f"{where}: {name} must have {rule}deform_groups*K_h*K_w={expected} channels "
                f"(deform_groups={self.deform_groups}); got {offset.shape[1]}"
            )


class DeformConv2d(_DeformBase):
    """mmcv's ``DeformConv2d``: DCNv1 with external offsets and no bias.

    Computes :func:`deformconv.deform_conv2d` (no mask, no bias).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w).
        dilation: int or (d_h, d_w).
        groups: weight groups.
        deform_groups: G, offset groups.
        bias: must be False (as in mmcv).
        im2col_step: accepted for compatibility; no effect.
        deformable_groups: deprecated name of ``deform_groups``.

    Shape:
        - x: (N, C_in, H_in, W_in); offset: (N, 2·G·K_h·K_w, H_out, W_out)
        - output: (N, C_out, H_out, W_out)

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import DeformConv2d
        >>> layer = DeformConv2d(4, 8, 3, padding=1, deform_groups=2)
        >>> layer(torch.randn(1, 4, 9, 9), torch.randn(1, 36, 9, 9)).shape
        torch.Size([1, 8, 9, 9])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        where = type(self).__name__
        deform_groups = _deform_groups(where, deform_groups, deformable_groups)
        super().__init__(
            where, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deform_groups,
        )  # fmt: skip
        if bias:
            raise ValueError(f"{where}: bias={bias} is not supported (mmcv's layer has no bias)")
        self.im2col_step = im2col_step
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as mmcv does: Kaiming-uniform for ReLU."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        """Convolve ``x`` at the positions shifted by ``offset``."""
        if not torch.jit.is_scripting():
            self._check_offset(type(self).__name__, offset, 2)
        return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation)


class DeformConv2dPack(DeformConv2d):
    """mmcv's ``DeformConv2dPack`` (mmdetection's ``DCN``): DCNv1 owning ``conv_offset``.

    ``conv_offset`` is an ``nn.Conv2d`` with the layer's geometry and 2·G·K_h·K_w
    output channels, zero at initialisation (the plain convolution). Arguments are
    those of :class:`DeformConv2d`.

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import DeformConv2dPack
        >>> layer = DeformConv2dPack(4, 8, 3, padding=1)
        >>> sorted(layer.state_dict())
        ['conv_offset.bias', 'conv_offset.weight', 'weight']
        >>> layer(torch.randn(1, 4, 9, 9)).shape
        torch.Size([1, 8, 9, 9])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k_h, k_w = self.kernel_size
        self.conv_offset = nn.Conv2d(
            self.in_channels, self.deform_groups * 2 * k_h * k_w, self.kernel_size,
            self.stride, self.padding, self.dilation, bias=True,
        )  # fmt: skip
        self.init_offset()

    def init_offset(self) -> None:
        """Zero the offset predictor."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Predict offsets from ``x`` and convolve."""
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation)


class ModulatedDeformConv2d(_DeformBase):
    """mmcv's ``ModulatedDeformConv2d``: DCNv2 with external offsets and mask.

    Computes :func:`deformconv.deform_conv2d` with ``mask`` as given (a raw multiplier).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w).
        dilation: int or (d_h, d_w).
        groups: weight groups.
        deform_groups: G, offset groups.
        bias: whether to add a learned bias (zero at initialisation).
        deformable_groups: deprecated name of ``deform_groups``.

    Shape:
        - x: (N, C_in, H_in, W_in); offset: (N, 2·G·K_h·K_w, H_out, W_out);
          mask: (N, G·K_h·K_w, H_out, W_out)
        - output: (N, C_out, H_out, W_out)

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import ModulatedDeformConv2d
        >>> layer = ModulatedDeformConv2d(4, 8, 3, padding=1)
        >>> x = torch.randn(1, 4, 9, 9)
        >>> layer(x, torch.randn(1, 18, 9, 9), torch.rand(1, 9, 9, 9)).shape
        torch.Size([1, 8, 9, 9])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        where = type(self).__name__
        deform_groups = _deform_groups(where, deform_groups, deformable_groups)
        super().__init__(
            where, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deform_groups,
        )  # fmt: skip
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise as mmcv does: uniform ±1/sqrt(C_in·K_h·K_w), zero bias."""
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        """Convolve ``x`` at the positions shifted by ``offset``, weighted by ``mask``."""
        if not torch.jit.is_scripting():
            self._check_offset(type(self).__name__, offset, 2)
            self._check_offset(type(self).__name__, mask, 1)
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (mmdetection's ``DCNv2``), owning ``conv_offset``.

    ``conv_offset`` has 3·G·K_h·K_w output channels, zero at initialisation;
    ``o1, o2, m = torch.chunk(conv_offset(x), 3, dim=1)``, the offset is
    ``cat(o1, o2)`` and the mask ``sigmoid(m)`` (0.5 at initialisation, so a fresh
    layer computes half the plain convolution, as mmcv's does). Arguments are those
    of :class:`ModulatedDeformConv2d`.

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import ModulatedDeformConv2dPack
        >>> layer = ModulatedDeformConv2dPack(4, 8, 3, padding=1)
        >>> sorted(layer.state_dict())
        ['bias', 'conv_offset.bias', 'conv_offset.weight', 'weight']
        >>> layer(torch.randn(1, 4, 9, 9)).shape
        torch.Size([1, 8, 9, 9])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k_h, k_w = self.kernel_size
        self.conv_offset = nn.Conv2d(
            self.in_channels, self.deform_groups * 3 * k_h * k_w, self.kernel_size,
            self.stride, self.padding, self.dilation, bias=True,
        )  # fmt: skip
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise as mmcv does; ``conv_offset`` zero."""
        super().init_weights()
        if hasattr(self, "conv_offset"):
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Predict offsets and mask from ``x`` and convolve."""
        o1, o2, logits = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(logits)
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: deformable RoI pooling with external offsets.

    Computes :func:`deformconv.deform_roi_pool` with ``aligned=True`` (mmcv's
    half-pixel convention); offset channel 0 is x, 1 is y.

    Args:
        output_size: int or (out_h, out_w).
        spatial_scale: image-to-feature-map scale.
        sampling_ratio: samples per bin along each axis; ``<= 0`` adaptive.
        gamma: offset scale γ.

    Shape:
        - input: (N, C, H_in, W_in); rois: (K, 5); offset: (K, 2, out_h, out_w) or None
        - output: (K, C, out_h, out_w)

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import DeformRoIPool
        >>> pool = DeformRoIPool(3, spatial_scale=0.5)
        >>> rois = torch.tensor([[0.0, 2.0, 2.0, 12.0, 10.0]])
        >>> pool(torch.randn(1, 4, 8, 8), rois, torch.zeros(1, 2, 3, 3)).shape
        torch.Size([1, 4, 3, 3])
    """

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = pair(output_size, "output_size", type(self).__name__)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def _pool(
        self, input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript calls the registered op, which validates its arguments and
            # follows use_backend when it runs.
            size = [self.output_size[0], self.output_size[1]]
            return torch.ops.deformconv.deform_roi_pool(
                input, rois, offset, mask, size, self.spatial_scale, self.sampling_ratio,
                self.gamma, True, False, "auto",
            )  # fmt: skip
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma, True, mask,
        )  # fmt: skip

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        """Pool ``rois`` from ``input``, bins shifted by ``offset``."""
        return self._pool(input, rois, offset, None)


def _offset_fc(channels: int, bins: int, hidden: int) -> nn.Sequential:
    last = nn.Linear(hidden, bins * 2)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Linear(bins * channels, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        last,
    )


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: deformable RoI pooling owning ``offset_fc``.

    The RoIs are pooled with no offset, ``offset_fc`` (Linear → ReLU → Linear → ReLU →
    Linear, last layer zero) maps each to (2, out_h, out_w) offsets, and the RoIs are
    pooled again with them.

    Args:
        output_size: int or (out_h, out_w).
        output_channels: C, the feature map's channels.
        deform_fc_channels: hidden width of ``offset_fc``.
        spatial_scale: image-to-feature-map scale.
        sampling_ratio: samples per bin along each axis; ``<= 0`` adaptive.
        gamma: offset scale γ.

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import DeformRoIPoolPack
        >>> pool = DeformRoIPoolPack(3, 4, deform_fc_channels=16, spatial_scale=0.5)
        >>> rois = torch.tensor([[0.0, 2.0, 2.0, 12.0, 10.0]])
        >>> pool(torch.randn(1, 4, 8, 8), rois).shape
        torch.Size([1, 4, 3, 3])
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels, self.deform_fc_channels = output_channels, deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _offset_fc(output_channels, bins, deform_fc_channels)

    def _check_channels(self, input: Tensor) -> None:
        if input.dim() == 4 and input.shape[1] != self.output_channels:
            raise ArgumentError(
                f"{type(self).__name__}: input must have output_channels="
                f"{self.output_channels} channels; got {input.shape[1]}"
            )

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        """Predict offsets per RoI and pool."""
        if not torch.jit.is_scripting():
            self._check_channels(input)
        k = rois.shape[0]
        x = self._pool(input, rois, None, None).reshape(k, -1)
        offset = self.offset_fc(x).reshape(k, 2, self.output_size[0], self.output_size[1])
        return self._pool(input, rois, offset, None)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: as :class:`DeformRoIPoolPack`, plus ``mask_fc``.

    ``mask_fc`` is Linear → ReLU → Linear (zero) → Sigmoid; the pooled values are
    multiplied by its (K, 1, out_h, out_w) output (0.5 at initialisation, as mmcv's).
    Arguments are those of :class:`DeformRoIPoolPack`.

    Example:
        >>> import torch
        >>> from deformconv.compat.mmcv import ModulatedDeformRoIPoolPack
        >>> pool = ModulatedDeformRoIPoolPack(3, 4, deform_fc_channels=16, spatial_scale=0.5)
        >>> sorted({k.rsplit(".", 1)[0] for k in pool.state_dict()})
        ['mask_fc.0', 'mask_fc.2', 'offset_fc.0', 'offset_fc.2', 'offset_fc.4']
        >>> rois = torch.tensor([[0.0, 2.0, 2.0, 12.0, 10.0]])
        >>> pool(torch.randn(1, 4, 8, 8), rois).shape
        torch.Size([1, 4, 3, 3])
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(
            output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma
        )
        bins = self.output_size[0] * self.output_size[1]
        last = nn.Linear(deform_fc_channels, bins)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mask_fc = nn.Sequential(
            nn.Linear(bins * output_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            last,
            nn.Sigmoid(),
        )

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        """Predict offsets and a mask per RoI and pool."""
        if not torch.jit.is_scripting():
            self._check_channels(input)
        k = rois.shape[0]
        out_h, out_w = self.output_size
        x = self._pool(input, rois, None, None).reshape(k, -1)
        offset = self.offset_fc(x).reshape(k, 2, out_h, out_w)
        mask = self.mask_fc(x).reshape(k, 1, out_h, out_w)
        return self._pool(input, rois, offset, mask)
