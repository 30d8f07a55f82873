"""``DeformMultiScaleRoIAlign``: deformable RoI pooling for torchvision's detectors.

This module imports torchvision (an optional dependency); ``deformconv.nn`` loads it
only when ``DeformMultiScaleRoIAlign`` is first used.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.nn._roi_heads import mask_head, offset_head, reset_heads
from deformconv.ops import deform_roi_pool
from deformconv.ops._errors import ArgumentError

try:
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.poolers import LevelMapper
except ImportError as error:  # pragma: no cover - exercised only without torchvision
    raise ImportError(
        "deformconv.nn.DeformMultiScaleRoIAlign needs torchvision "
        "(pip install 'deformconv[detection]')"
    ) from error

__all__ = ["DeformMultiScaleRoIAlign"]

_WHERE = "DeformMultiScaleRoIAlign"


def _infer_scale(feature: Tensor, original_size: tuple[int, int]) -> float:
    """The power of two closest to ``H_feature / H_image`` (torchvision's rule)."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


class DeformMultiScaleRoIAlign(MultiScaleRoIAlign):
    r"""``torchvision.ops.MultiScaleRoIAlign`` whose bins move by learned offsets (DCNv1 §2.2).

    A drop-in ``box_roi_pool`` or ``mask_roi_pool`` for torchvision's ``FasterRCNN``,
    ``MaskRCNN`` and ``KeypointRCNN``. Each RoI is assigned to a feature level exactly
    as ``MultiScaleRoIAlign`` does (the FPN paper's eq. 1 with ``canonical_scale`` and
    ``canonical_level``; each level's scale inferred as the power of two nearest
    ``H_feature / H_image`` on the first call), then pooled as the paper pools it:

    1. RoIAlign (``torchvision.ops.roi_align``'s convention, ``aligned=False``),
    2. a fully connected head ``offset_fc`` (Linear → ReLU → Linear → ReLU → Linear)
       maps the pooled RoI to normalised offsets (K, 2, out_h, out_w) (channel 0: x,
       1: y),
    3. :func:`deformconv.deform_roi_pool` pools again with bin (i, j) shifted by
       ``gamma · offset[:, :, i, j] ∘ (roi_w, roi_h)``. With ``modulated=True`` a
       second head ``mask_fc`` (Linear → ReLU → Linear) predicts a DCNv2 mask
       ``2·sigmoid(logits)`` per bin.

    The last layer of each head starts at zero, so a fresh module returns exactly what
    ``MultiScaleRoIAlign`` returns (offsets 0, mask 1). The heads have the parameter
    names of :class:`~deformconv.DeformRoIPool2d` (and of mmcv's ``DeformRoIPoolPack``).

    **One offset head for all levels.** The heads are shared across pyramid levels, as
    torchvision's box head after ``MultiScaleRoIAlign`` is: the level mapping already
    sends each RoI to the level where it covers a similar number of feature-map
    pixels, and offsets are normalised by the RoI's size, so the same head can serve
    every level; sharing lets it learn from every RoI instead of a per-level fraction,
    and keeps the parameter count independent of the number of levels. (mmdetection's
    ``SingleRoIExtractor`` with ``DeformRoIPoolPack`` builds one head per level
    instead; the paper used a single level.)

    Under autocast the heads run in the autocast dtype and the pooling in float32 (as
    torchvision's ``roi_align`` does); the result has the feature maps' dtype. With
    ``record=True`` (or within :func:`deformconv.recording`) each forward outside
    torch.compile keeps the detached offsets and mask of every RoI, in the order of the
    concatenated boxes, in ``last_offset`` and ``last_mask``.

    Args:
        featmap_names: names of the feature maps to pool from (keys of the features'
            dict), finest level first.
        output_size: int or (out_h, out_w), e.g. 7 for a box head, 14 for a mask head.
        sampling_ratio: samples per bin along each axis; ``<= 0`` adaptive
            (``ceil(roi_h / out_h) x ceil(roi_w / out_w)``).
        in_channels: C, the feature maps' channels (the same on every level).
        gamma: offset scale γ (0.1 in the paper).
        hidden_features: width of the heads' hidden layers (1024 in the paper).
        modulated: predict a DCNv2 mask per bin as well.
        canonical_scale: the FPN level mapping's canonical box size (224).
        canonical_level: the level a box of ``canonical_scale`` pixels maps to (4).
        record: keep the last forward's offsets and mask in ``last_offset``/``last_mask``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: features ``{name: (N, C, H_l, W_l)}``, boxes ``[(K_n, 4)]`` per image
          as (x1, y1, x2, y2) in image pixels, image sizes ``[(H_n, W_n)]``
        - Output: (K, C, out_h, out_w) with ``K = sum_n K_n``, in box order

    Example:
        >>> import torch
        >>> from deformconv.nn import DeformMultiScaleRoIAlign
        >>> pool = DeformMultiScaleRoIAlign(["p2", "p3"], 7, 2, in_channels=16,
        ...                                 hidden_features=64, record=True)
        >>> features = {"p2": torch.randn(2, 16, 32, 32), "p3": torch.randn(2, 16, 16, 16)}
        >>> boxes = [torch.tensor([[4.0, 8.0, 60.0, 90.0]]),
        ...          torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 40.0, 127.0, 120.0]])]
        >>> pool(features, boxes, [(128, 128), (128, 128)]).shape
        torch.Size([3, 16, 7, 7])
        >>> pool.last_offset.shape
        torch.Size([3, 2, 7, 7])
    """

    in_channels: int
    hidden_features: int
    gamma: float
    modulated: bool
    record: bool
    offset_fc: nn.Sequential
    mask_fc: nn.Sequential | None
    last_offset: Tensor | None
    last_mask: Tensor | None

    def __init__(
        self,
        featmap_names: list[str],
        output_size: IntPair,
        sampling_ratio: int,
        *,
        in_channels: int,
        gamma: float = 0.1,
        hidden_features: int = 1024,
        modulated: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        record: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        size = pair(output_size, "output_size", _WHERE)
        if min(size) < 1:
            raise ValueError(f"{_WHERE}: output_size must be positive; got {size}")
        if not isinstance(featmap_names, list | tuple) or not featmap_names:
            raise ValueError(
                f"{_WHERE}: featmap_names must be a non-empty list of names; got {featmap_names!r}"
            )
        if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
            raise TypeError(f"{_WHERE}: sampling_ratio must be an int; got {sampling_ratio!r}")
        for name, count in (("in_channels", in_channels), ("hidden_features", hidden_features)):
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{_WHERE}: {name} must be a positive int; got {count!r}")
        ok = isinstance(gamma, numbers.Real) and not isinstance(gamma, bool)
        if not ok or not math.isfinite(gamma):
            raise ValueError(f"{_WHERE}: gamma must be a finite number; got {gamma!r}")
        super().__init__(
            list(featmap_names),
            size,
            int(sampling_ratio),
            canonical_scale=canonical_scale,
            canonical_level=canonical_level,
        )
        self.in_channels, self.hidden_features = in_channels, hidden_features
        self.gamma, self.modulated, self.record = float(gamma), modulated, record
        bins = size[0] * size[1]
        self.offset_fc = offset_head(in_channels * bins, hidden_features, bins, device, dtype)
        self.mask_fc = (
            mask_head(in_channels * bins, hidden_features, bins, device, dtype)
            if modulated
            else None
        )
        self.last_offset = None
        self.last_mask = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init for the hidden layers; the last layers to 0."""
        reset_heads(self.offset_fc, self.mask_fc)

    def _setup(self, features: list[Tensor], image_shapes: list[tuple[int, int]]) -> None:
        """Infer each level's scale and build the level mapper (once, as torchvision)."""
        if not image_shapes:
            raise ArgumentError(f"{_WHERE}: image_shapes must not be empty; got []")
        original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [_infer_scale(f, original) for f in features]
        k_min, k_max = (int(-math.log2(s)) for s in (scales[0], scales[-1]))
        self.scales = scales
        self.map_levels = LevelMapper(
            k_min,
            k_max,
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
        )

    def _pool_level(
        self, feature: Tensor, rois: Tensor, scale: float
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pool ``rois`` from one level: RoIAlign → heads → deformable pooling."""
        compute = torch.float32 if feature.dtype in (torch.float16, torch.bfloat16) else None
        x = feature if compute is None else feature.to(compute)
        rois = rois.to(x.dtype)
        args = (self.output_size, scale, self.sampling_ratio, self.gamma, False)
        with torch.autocast(x.device.type, enabled=False):
            plain = deform_roi_pool(x, rois, None, *args)
        k = rois.shape[0]
        flat = plain.flatten(1).to(next(self.offset_fc.parameters()).dtype)
        offset = self.offset_fc(flat).reshape(k, 2, *self.output_size)
        mask = None
        if self.mask_fc is not None:
            logits = self.mask_fc(flat).reshape(k, 1, *self.output_size)
            mask = 2 * torch.sigmoid(logits)
        with torch.autocast(x.device.type, enabled=False):
            out = deform_roi_pool(
                x, rois, offset.to(x.dtype), *args, None if mask is None else mask.to(x.dtype)
            )
        return out.to(feature.dtype), offset, mask

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Pool ``boxes`` from the feature maps ``x``; see the class docstring for shapes."""
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ArgumentError(
                f"{_WHERE}: x must contain the feature maps {self.featmap_names}; "
                f"got keys {list(x)}"
            )
        for f in features:
            if f.dim() != 4 or f.shape[1] != self.in_channels:
                raise ArgumentError(
                    f"{_WHERE}: every feature map must be (N, in_channels={self.in_channels}, "
                    f"H, W); got {tuple(f.shape)}"
                )
        if self.scales is None or self.map_levels is None:
            self._setup(features, image_shapes)
        assert self.scales is not None and self.map_levels is not None  # set by _setup
        ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(ids), torch.cat(boxes)], dim=1)
        if len(features) == 1:
            result, offset, mask = self._pool_level(features[0], rois, self.scales[0])
        else:
            levels = self.map_levels(boxes)
            k, (oh, ow) = rois.shape[0], self.output_size
            dtype, device = features[0].dtype, features[0].device
            result = torch.zeros(k, self.in_channels, oh, ow, dtype=dtype, device=device)
            offset = torch.zeros(k, 2, oh, ow, dtype=dtype, device=device)
            mask = torch.ones(k, 1, oh, ow, dtype=dtype, device=device) if self.modulated else None
            for level, (feature, scale) in enumerate(zip(features, self.scales, strict=False)):
                index = torch.where(levels == level)[0]
                out, out_offset, out_mask = self._pool_level(feature, rois[index], scale)
                result = result.index_put((index,), out.to(dtype))
                offset = offset.index_put((index,), out_offset.to(dtype))
                if mask is not None and out_mask is not None:
                    mask = mask.index_put((index,), out_mask.to(dtype))
        if self.record and not torch.compiler.is_compiling():
            self.last_offset = offset.detach()
            self.last_mask = None if mask is None else mask.detach()
        return result

    def extra_repr(self) -> str:
        """The pooling arguments, then those that differ from the defaults."""
        s = (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, in_channels={self.in_channels}"
        )
        if self.gamma != 0.1:
            s += f", gamma={self.gamma}"
        if self.hidden_features != 1024:
            s += f", hidden_features={self.hidden_features}"
        if self.modulated:
            s += ", modulated=True"
        for name, default in (("canonical_scale", 224), ("canonical_level", 4)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def __repr__(self) -> str:
        """``nn.Module``'s repr (the parent's hides the heads)."""
        return nn.Module.__repr__(self)
