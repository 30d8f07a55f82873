"""``DeformConv2d``: a drop-in replacement for ``nn.Conv2d`` that owns its offset predictor."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.ops import deform_conv2d
from deformconv.ops._errors import ArgumentError
from deformconv.ops._validation import check_tensor

__all__ = ["MASK_ACTIVATIONS", "DeformConv2d"]

#: The mask activations a modulated layer offers: ``"2sigmoid"`` (``2·sigmoid(logits)``,
#: 1 at initialisation) and ``"sigmoid"`` (``sigmoid(logits)``, as mmcv and detectron2).
MASK_ACTIVATIONS = ("2sigmoid", "sigmoid")


class DeformConv2d(nn.Module):
    r"""Deformable convolution layer (DCNv1; DCNv2 with ``modulated=True``).

    Computes :func:`deformconv.deform_conv2d` with offsets (and a mask) predicted
    from the same input by ``conv_offset``, an ``nn.Conv2d`` with the layer's
    kernel size, stride, padding and dilation and 2·G·K_h·K_w output channels
    (3·G·K_h·K_w when modulated: offsets first, then mask logits).

    ``conv_offset`` starts at zero, so a fresh layer computes exactly the plain
    convolution with the same ``weight`` and ``bias``.

    The mask is ``mask_activation(logits)``. The default, ``"2sigmoid"``
    (``2·sigmoid(logits)``), is 1 at initialisation, so a fresh or converted layer is
    again exactly the plain convolution, and it ranges over (0, 2), free to weight taps
    down or up. ``"sigmoid"`` is the DCNv2 paper's, mmcv's and detectron2's choice: 0.5
    at initialisation (a fresh layer computes half the convolution) and at most 1; use
    it to run weights trained with those libraries (see :mod:`deformconv.compat`).

    With ``record=True`` (an attribute that can be switched at any time, or see
    :func:`deformconv.recording`) each eager forward keeps the detached offsets and mask
    it used in ``last_offset`` and ``last_mask``, for analysis and plots; by default
    nothing is kept (``None``), so layers hold no activations between passes.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w), zero padding.
        dilation: int or (d_h, d_w).
        groups: weight groups; divides C_in and C_out.
        bias: whether to add a learned bias.
        offset_groups: G, offset groups; divides C_in.
        modulated: predict a DCNv2 mask as well.
        mask_activation: ``"2sigmoid"`` (default) or ``"sigmoid"``; see above.
        record: keep the last forward's offsets and mask in ``last_offset``/``last_mask``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: (N, C_in, H_in, W_in)
        - Output: (N, C_out, H_out, W_out) with
          ``H_out = (H_in + 2·p_h - d_h·(K_h - 1) - 1) // s_h + 1`` (likewise W_out).

    Example:
        >>> import torch
        >>> from deformconv import DeformConv2d
        >>> layer = DeformConv2d(16, 32, 3, padding=1, modulated=True, record=True)
        >>> layer(torch.randn(2, 16, 20, 24)).shape
        torch.Size([2, 32, 20, 24])
        >>> layer.last_offset.shape, layer.last_mask.shape
        (torch.Size([2, 18, 20, 24]), torch.Size([2, 9, 20, 24]))
    """

    last_offset: Tensor | None
    last_mask: Tensor | None
    # Eager-only state: TorchScript neither reads nor writes it.
    __jit_ignored_attributes__ = ["last_offset", "last_mask"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        offset_groups: int = 1,
        modulated: bool = False,
        mask_activation: str = "2sigmoid",
        record: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "DeformConv2d"
        if mask_activation not in MASK_ACTIVATIONS:
            raise ValueError(
                f"{where}: mask_activation must be one of {MASK_ACTIVATIONS}; "
                f"got {mask_activation!r}"
            )
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.padding = pair(padding, "padding", where)
        self.dilation = pair(dilation, "dilation", where)
        _check_hyper(
            in_channels, out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            groups, offset_groups,
        )  # fmt: skip
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.offset_groups, self.modulated = groups, offset_groups, modulated
        self.mask_activation, self.record = mask_activation, record
        k_h, k_w = self.kernel_size
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, k_h, k_w, device=device, dtype=dtype)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        )
        points = offset_groups * k_h * k_w
        self.conv_offset = nn.Conv2d(
            in_channels, (3 if modulated else 2) * points, self.kernel_size,
            self.stride, self.padding, self.dilation, bias=True, device=device, dtype=dtype,
        )  # fmt: skip
        self.last_offset = None
        self.last_mask = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``weight``/``bias`` as ``nn.Conv2d`` does and the offset predictor to 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)  # type: ignore[arg-type]

    def offset_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predict the offsets and (when modulated) the mask for ``input``.

        Args:
            input: (N, C_in, H_in, W_in).

        Returns:
            ``(offset, mask)``: (N, 2·G·K_h·K_w, H_out, W_out) and
            (N, G·K_h·K_w, H_out, W_out) or None.
        """
        out = self.conv_offset(input)
        if not self.modulated:
            return out, None
        points = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, logits = out.split([2 * points, points], dim=1)
        if self.mask_activation == "sigmoid":
            return offset, torch.sigmoid(logits)
        return offset, 2 * torch.sigmoid(logits)

    def forward(self, input: Tensor) -> Tensor:
        """Apply the layer; see the class docstring for shapes."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input(input)
        offset, mask = self.offset_and_mask(input)
        if not torch.jit.is_scripting():
            self._record(offset, mask)
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def _check_input(self, input: Tensor) -> None:
        check_tensor("DeformConv2d", "input", input, 4)
        if input.shape[1] != self.in_channels:
            raise ArgumentError(
                f"DeformConv2d: input must have in_channels={self.in_channels} channels; "
                f"got {input.shape[1]}"
            )

    def _record(self, offset: Tensor, mask: Tensor | None) -> None:
        if self.record and not torch.compiler.is_compiling():
            self.last_offset = offset.detach()
            self.last_mask = None if mask is None else mask.detach()

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        offset_groups: int = 1,
        modulated: bool = False,
        mask_activation: str = "2sigmoid",
        record: bool = False,
    ) -> DeformConv2d:
        """Build a layer that computes what ``conv`` computes, with its weights and bias.

        Args:
            conv: an ``nn.Conv2d`` with zero padding (``padding_mode="zeros"``);
                ``padding="same"`` needs odd effective kernel extents. Subclasses that
                override ``forward`` (such as timm's ``Conv2dSame``, which pads by the
                input's size) are refused: the layer would not compute what they compute.
            offset_groups: G for the new layer.
            modulated: predict a DCNv2 mask as well.
            mask_activation: see the class docstring.
            record: see the class docstring.

        Returns:
            A ``DeformConv2d`` on ``conv``'s device and dtype, in ``conv``'s training mode.

        Example:
            >>> import torch
            >>> conv = torch.nn.Conv2d(8, 8, 3, padding=1)
            >>> layer = DeformConv2d.from_conv(conv)
            >>> x = torch.randn(1, 8, 10, 10)
            >>> torch.allclose(layer(x), conv(x), atol=1e-5)
            True
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"DeformConv2d.from_conv: conv must be an nn.Conv2d; got {type(conv).__name__}"
            )
        if not plain_forward(conv):
            raise TypeError(
                f"DeformConv2d.from_conv: {type(conv).__name__} overrides nn.Conv2d's forward, "
                "so a DeformConv2d built from its weights would not compute what it computes; "
                "convert plain nn.Conv2d layers only"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                "DeformConv2d.from_conv: conv.padding_mode must be 'zeros'; "
                f"got {conv.padding_mode!r}"
            )
        padding = _numeric_padding(conv)
        where = "DeformConv2d.from_conv"
        layer = cls(
            conv.in_channels, conv.out_channels, pair(conv.kernel_size, "kernel_size", where),
            pair(conv.stride, "stride", where), padding, pair(conv.dilation, "dilation", where),
            conv.groups, conv.bias is not None,
            offset_groups=offset_groups, modulated=modulated,
            mask_activation=mask_activation, record=record,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        """Like ``nn.Conv2d``'s, plus the deformable arguments that differ from defaults."""
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        for name, default in (("padding", (0, 0)), ("dilation", (1, 1))):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.modulated:
            s += ", modulated=True"
            if self.mask_activation != "2sigmoid":
                s += f", mask_activation={self.mask_activation!r}"
        if self.record:
            s += ", record=True"
        return s


def plain_forward(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` computes what ``nn.Conv2d`` computes (no overridden forward).

    Example:
        >>> plain_forward(nn.Conv2d(2, 2, 3))
        True
    """
    cls = type(conv)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(
                "DeformConv2d.from_conv: padding='same' needs an even dilation*(kernel_size-1) "
                f"(symmetric padding); got {tuple(total)}"
            )
        return (total[0] // 2, total[1] // 2)
    return pair(conv.padding, "conv.padding", "DeformConv2d.from_conv")


def _check_hyper(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    offset_groups: int,
) -> None:
    where = "DeformConv2d"
    counts = {"in_channels": in_channels, "out_channels": out_channels, "groups": groups,
              "offset_groups": offset_groups}  # fmt: skip
    for name, count in counts.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{where}: {name} must be a positive int; got {count!r}")
    pairs = (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
             ("dilation", dilation, 1))  # fmt: skip
    for name, value, minimum in pairs:
        if min(value) < minimum:
            raise ValueError(f"{where}: {name} must be >= {minimum}; got {value}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{where}: groups={groups} must divide in_channels={in_channels} "
            f"and out_channels={out_channels}"
        )
    if in_channels % offset_groups:
        raise ValueError(
            f"{where}: offset_groups={offset_groups} must divide in_channels={in_channels}"
        )
