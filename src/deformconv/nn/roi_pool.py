"""``DeformRoIPool2d``: deformable RoI pooling that owns the paper's offset predictor."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.nn._roi_heads import mask_head, offset_head, reset_heads
from deformconv.ops import deform_roi_pool
from deformconv.ops._errors import ArgumentError
from deformconv.ops._roi_library import deform_roi_pool_op  # noqa: F401  (registers the op)

__all__ = ["ROI_MASK_ACTIVATIONS", "DeformRoIPool2d"]

#: The mask activations of a modulated :class:`DeformRoIPool2d`: ``"2sigmoid"``
#: (``2·sigmoid(logits)``, 1 at initialisation) and ``"sigmoid"`` (mmcv's).
ROI_MASK_ACTIVATIONS = ("2sigmoid", "sigmoid")


class DeformRoIPool2d(nn.Module):
    r"""Deformable RoI pooling (DCNv1 section 2.2; DCNv2 with ``modulated=True``).

    As in the paper: the RoIs are first pooled by plain RoIAlign (the same op with no
    offset), a small fully connected head ``offset_fc`` (Linear → ReLU → Linear → ReLU
    → Linear, as mmcv's ``DeformRoIPoolPack``) maps each pooled RoI to normalised
    offsets (K, 2, out_h, out_w), and the RoIs are pooled again by
    :func:`deformconv.deform_roi_pool` with those offsets (channel 0: x, 1: y; see
    the function for the math, the coordinate convention and the bounds on memory and
    time). When modulated, a second head ``mask_fc`` (Linear → ReLU → Linear) predicts
    mask logits and the mask is ``mask_activation(logits)``.

    The last layer of each head starts at zero. With the default mask activation,
    ``"2sigmoid"`` (``2·sigmoid(logits)``, in (0, 2)), the mask starts at exactly 1, so a
    fresh module — modulated or not — computes exactly ``torchvision.ops.roi_align``
    and can be dropped into a trained detector without changing its output, and the
    mask can learn to weight bins down or up. ``"sigmoid"`` is mmcv's choice
    (``ModulatedDeformRoIPoolPack``): the mask starts at 0.5 (a fresh module halves
    RoIAlign) and stays below 1; choose it to run mmcv's weights. Parameter names and
    shapes match mmcv's ``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``
    (``offset_fc.{0,2,4}``, ``mask_fc.{0,2}``), so their weights load with
    ``load_state_dict(strict=True)``.

    With ``record=True`` (an attribute that can be switched at any time) each eager
    forward keeps the detached offsets and mask it used in ``last_offset`` and
    ``last_mask``, for analysis and plots; by default nothing is kept (``None``).

    TorchScript: ``torch.jit.script(module)`` works (the scripted forward calls the
    registered op ``torch.ops.deformconv.deform_roi_pool`` and follows
    :func:`deformconv.use_backend` when it runs; it records nothing).

    Args:
        output_size: int or (out_h, out_w).
        spatial_scale: image-to-feature-map scale (e.g. 1/16).
        sampling_ratio: samples per bin along each axis; ``<= 0`` adaptive.
        gamma: offset scale γ (0.1 in the paper).
        aligned: the half-pixel convention of :func:`deformconv.deform_roi_pool`.
        in_channels: C, the feature map's channels.
        hidden_features: width of the heads' hidden layers (1024 in the paper).
        modulated: predict a DCNv2 mask per bin as well.
        mask_activation: ``"2sigmoid"`` (default) or ``"sigmoid"``; see above.
        record: keep the last forward's offsets and mask in ``last_offset``/``last_mask``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: (N, C, H_in, W_in) and rois (K, 5) ``[batch_index, x1, y1, x2, y2]``
        - Output: (K, C, out_h, out_w)

    Example:
        >>> import torch
        >>> from deformconv import DeformRoIPool2d
        >>> pool = DeformRoIPool2d(7, spatial_scale=1 / 16, in_channels=32,
        ...                        hidden_features=64, modulated=True, record=True)
        >>> pool
        DeformRoIPool2d(
          output_size=(7, 7), spatial_scale=0.0625, in_channels=32, hidden_features=64, modulated=True
          (offset_fc): Sequential(
            (0): Linear(in_features=1568, out_features=64, bias=True)
            (1): ReLU(inplace=True)
            (2): Linear(in_features=64, out_features=64, bias=True)
            (3): ReLU(inplace=True)
            (4): Linear(in_features=64, out_features=98, bias=True)
          )
          (mask_fc): Sequential(
            (0): Linear(in_features=1568, out_features=64, bias=True)
            (1): ReLU(inplace=True)
            (2): Linear(in_features=64, out_features=49, bias=True)
          )
        )
        >>> x = torch.randn(2, 32, 25, 34)
        >>> rois = torch.tensor([[0.0, 16.0, 16.0, 200.0, 150.0], [1.0, 0.0, 40.0, 90.0, 400.0]])
        >>> pool(x, rois).shape
        torch.Size([2, 32, 7, 7])
        >>> pool.last_offset.shape, pool.last_mask.shape
        (torch.Size([2, 2, 7, 7]), torch.Size([2, 1, 7, 7]))
    """  # noqa: E501  (the repr line in the example)

    last_offset: Tensor | None
    last_mask: Tensor | None
    # Eager-only state: TorchScript neither reads nor writes it.
    __jit_ignored_attributes__ = ["last_offset", "last_mask"]

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        aligned: bool = True,
        *,
        in_channels: int,
        hidden_features: int = 1024,
        modulated: bool = False,
        mask_activation: str = "2sigmoid",
        record: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "DeformRoIPool2d"
        self.output_size = pair(output_size, "output_size", where)
        for name, count in (("in_channels", in_channels), ("hidden_features", hidden_features)):
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{where}: {name} must be a positive int; got {count!r}")
        if min(self.output_size) < 1:
            raise ValueError(f"{where}: output_size must be positive; got {self.output_size}")
        ok = isinstance(spatial_scale, numbers.Real) and not isinstance(spatial_scale, bool)
        if not ok or not math.isfinite(spatial_scale) or spatial_scale <= 0:
            raise ValueError(
                f"{where}: spatial_scale must be a positive finite number; got {spatial_scale!r}"
            )
        if mask_activation not in ROI_MASK_ACTIVATIONS:
            raise ValueError(
                f"{where}: mask_activation must be one of {ROI_MASK_ACTIVATIONS}; "
                f"got {mask_activation!r}"
            )
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio, self.gamma, self.aligned = int(sampling_ratio), float(gamma), aligned
        self.in_channels, self.hidden_features = in_channels, hidden_features
        self.modulated, self.mask_activation, self.record = modulated, mask_activation, record
        bins = self.output_size[0] * self.output_size[1]
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

    def _pool(
        self, input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        if torch.jit.is_scripting():
            # The registered op validates its arguments itself; "auto" follows
            # use_backend when it runs.
            size = [self.output_size[0], self.output_size[1]]
            return torch.ops.deformconv.deform_roi_pool(
                input, rois, offset, mask, size, self.spatial_scale, self.sampling_ratio,
                self.gamma, self.aligned, False, "auto",
            )  # fmt: skip
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma, self.aligned, mask,
        )  # fmt: skip

    def offset_and_mask(self, input: Tensor, rois: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predict the normalised offsets and (when modulated) the mask of every RoI.

        Args:
            input: (N, C, H_in, W_in).
            rois: (K, 5).

        Returns:
            ``(offset, mask)``: (K, 2, out_h, out_w) and (K, 1, out_h, out_w) or None.
        """
        k = rois.shape[0]
        features = self._pool(input, rois, None, None).reshape(k, -1)
        out_h, out_w = self.output_size
        offset = self.offset_fc(features).reshape(k, 2, out_h, out_w)
        if self.mask_fc is None:
            return offset, None
        mask = torch.sigmoid(self.mask_fc(features)).reshape(k, 1, out_h, out_w)
        if self.mask_activation == "2sigmoid":
            mask = 2 * mask
        return offset, mask

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Pool ``rois`` from ``input``; see the class docstring for shapes."""
        if not torch.jit.is_scripting():
            self._check_input(input)
        offset, mask = self.offset_and_mask(input, rois)
        if not torch.jit.is_scripting():
            self._record(offset, mask)
        return self._pool(input, rois, offset, mask)

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"DeformRoIPool2d: input must be a torch.Tensor; got {type(input).__name__}"
            )
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ArgumentError(
                f"DeformRoIPool2d: input must be (N, in_channels={self.in_channels}, H_in, "
                f"W_in); got shape {tuple(input.shape)}"
            )

    def _record(self, offset: Tensor, mask: Tensor | None) -> None:
        if self.record and not torch.compiler.is_compiling():
            self.last_offset = offset.detach()
            self.last_mask = None if mask is None else mask.detach()

    def extra_repr(self) -> str:
        """The output size and scale, then the arguments that differ from defaults."""
        s = f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
        for name, default in (("sampling_ratio", 0), ("gamma", 0.1), ("aligned", True)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        s += f", in_channels={self.in_channels}"
        if self.hidden_features != 1024:
            s += f", hidden_features={self.hidden_features}"
        if self.modulated:
            s += ", modulated=True"
        if self.mask_activation != "2sigmoid":
            s += f", mask_activation={self.mask_activation!r}"
        return s
