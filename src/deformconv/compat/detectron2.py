"""detectron2's deformable layers under their own names, arguments and parameter names.

``deformconv.compat.detectron2`` mirrors ``detectron2.layers``: :class:`DeformConv`
(DCNv1) and :class:`ModulatedDeformConv` (DCNv2) are bare layers that take external
offsets (and mask) and apply an optional ``norm`` and ``activation`` after the
convolution, as detectron2's do. In detectron2's ``DeformBottleneckBlock`` the offsets
come from a sibling ``conv2_offset`` convolution; with ``deform_modulated`` its output
is split by ``torch.chunk(out, 3, dim=1)`` into two offset halves (concatenated) and
mask logits, and the mask is ``sigmoid(logits)``. Unlike detectron2's, these layers
also run on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deformconv._utils import IntPair, pair
from deformconv.ops import deform_conv2d

__all__ = ["DeformConv", "ModulatedDeformConv"]


class _Detectron2Deform(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
        deformable_groups: int,
        bias: bool,
        norm: nn.Module | None,
        activation: Callable[[Tensor], Tensor] | None,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{where}: groups={groups} must divide in_channels={in_channels} "
                f"and out_channels={out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.padding = pair(padding, "padding", where)
        self.dilation = pair(dilation, "dilation", where)
        self.groups, self.deformable_groups = groups, deformable_groups
        self.with_bias = bias
        self.norm = norm
        self.activation = activation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this first: say clearly what cannot be scripted.
        if self.activation is not None and not isinstance(self.activation, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: torch.jit.script cannot compile activation="
                f"{getattr(self.activation, '__name__', self.activation)!r}, a plain function; "
                "pass an nn.Module (e.g. nn.ReLU()), or use torch.export or torch.compile"
            )
        return self

    def _finish(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        """detectron2's repr."""
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.with_bias}"
        )


class DeformConv(_Detectron2Deform):
    """detectron2's ``DeformConv``: DCNv1 with external offsets, then ``norm`` and ``activation``.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (K_h, K_w).
        stride: int or (s_h, s_w).
        padding: int or (p_h, p_w).
        dilation: int or (d_h, d_w).
        groups: weight groups.
        deformable_groups: G, offset groups.
        bias: must be False (as in detectron2).
        norm: a module applied to the output (its parameters are saved as ``norm.*``).
        activation: a callable applied last.

    Shape:
        - x: (N, C_in, H_in, W_in); offset: (N, 2·G·K_h·K_w, H_out, W_out)
        - output: (N, C_out, H_out, W_out)

    Example:
        >>> import torch
        >>> from deformconv.compat.detectron2 import DeformConv
        >>> layer = DeformConv(4, 8, 3, padding=1, norm=torch.nn.BatchNorm2d(8))
        >>> layer(torch.randn(2, 4, 9, 9), torch.randn(2, 18, 9, 9)).shape
        torch.Size([2, 8, 9, 9])
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
        deformable_groups: int = 1,
        bias: bool = False,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if bias:
            raise ValueError("DeformConv: bias is not supported (detectron2's layer has none)")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deformable_groups, False, norm, activation,
        )  # fmt: skip

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """Convolve ``x`` at the positions shifted by ``offset``; then norm and activation."""
        out = deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation)
        return self._finish(out)


class ModulatedDeformConv(_Detectron2Deform):
    """detectron2's ``ModulatedDeformConv``: DCNv2 with external offsets and mask.

    Arguments are those of :class:`DeformConv`, except that ``bias`` defaults to True
    (zero at initialisation). ``mask`` is a raw multiplier (detectron2's blocks pass
    ``sigmoid(logits)``).

    Shape:
        - x: (N, C_in, H_in, W_in); offset: (N, 2·G·K_h·K_w, H_out, W_out);
          mask: (N, G·K_h·K_w, H_out, W_out)
        - output: (N, C_out, H_out, W_out)

    Example:
        >>> import torch
        >>> from deformconv.compat.detectron2 import ModulatedDeformConv
        >>> layer = ModulatedDeformConv(4, 8, 3, padding=1)
        >>> x = torch.randn(2, 4, 9, 9)
        >>> layer(x, torch.randn(2, 18, 9, 9), torch.rand(2, 9, 9, 9)).shape
        torch.Size([2, 8, 9, 9])
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
        deformable_groups: int = 1,
        bias: bool = True,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            deformable_groups, bias, norm, activation,
        )  # fmt: skip

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """Convolve ``x`` at the shifted positions, weighted by ``mask``; then norm, activation."""
        out = deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )
        return self._finish(out)
