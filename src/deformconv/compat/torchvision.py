"""``torchvision.ops.DeformConv2d`` under its own name: a bare layer fed external offsets.

Same constructor, forward signature, parameter names and initialisation as
torchvision's module, so ``from deformconv.compat.torchvision import DeformConv2d``
replaces ``from torchvision.ops import DeformConv2d`` and its state dicts load with
``strict=True``. For a layer that predicts its own offsets use
:class:`deformconv.DeformConv2d`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.ops import deform_conv2d

__all__ = ["DeformConv2d"]


class DeformConv2d(nn.Module):
    """A deformable convolution whose offsets (and mask) are arguments of ``forward``.

    Computes :func:`deformconv.deform_conv2d` with the layer's ``weight`` and ``bias``.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w).
        dilation: int or (d_h, d_w).
        groups: weight groups; divides C_in and C_out.
        bias: whether to add a learned bias.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - input: (N, C_in, H_in, W_in)
        - offset: (N, 2·G·K_h·K_w, H_out, W_out); mask: (N, G·K_h·K_w, H_out, W_out) or None
        - output: (N, C_out, H_out, W_out),
          ``H_out = (H_in + 2·p_h - d_h·(K_h - 1) - 1) // s_h + 1`` (likewise W_out).

    Example:
        >>> import torch
        >>> from deformconv.compat.torchvision import DeformConv2d
        >>> layer = DeformConv2d(4, 8, 3, padding=1)
        >>> x, offset = torch.randn(2, 4, 10, 10), torch.randn(2, 18, 10, 10)
        >>> layer(x, offset).shape
        torch.Size([2, 8, 10, 10])
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
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        where = "DeformConv2d"
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.padding = pair(padding, "padding", where)
        self.dilation = pair(dilation, "dilation", where)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size,
                        device=device, dtype=dtype)
        )  # fmt: skip
        self.bias = (
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as torchvision does (as ``nn.Conv2d``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """Convolve ``input`` at the positions shifted by ``offset``, weighted by ``mask``."""
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def extra_repr(self) -> str:
        """The arguments that differ from defaults, as torchvision shows them."""
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s
