"""The segmentation demo's network: a small fully convolutional net with a dilated stride-8 head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from deformconv.models import deformify

__all__ = ["HEAD_LAYERS", "VARIANTS", "SegmentationFCN", "build_segmenter"]

# The three 3x3 convolutions of the head (the paper's res5a-c analogues), in forward order.
HEAD_LAYERS = ("head.0.conv", "head.1.conv", "head.2.conv")

VARIANTS = (
    "plain",
    "deform_last1",
    "deform_last2",
    "deform_last3",
    "atrous4",
    "atrous6",
    "atrous8",
)
"""``plain``: the head's convs at the base dilation; ``deform_lastN``: the last N of them
converted with :func:`deformconv.deformify`; ``atrousD``: all three at dilation D."""


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class SegmentationFCN(nn.Module):
    """Stem (three stride-2 3x3 blocks and one 3x3 block), a dilated head, 1x1 classifier.

    The stem takes the image to stride 8 (width/4, width/2, width, width channels);
    the head is three 3x3 conv-BN-ReLU blocks at ``dilation`` (the paper's res5 at
    dilation 2); a 1x1 conv gives per-unit logits. Unit (i, j) of the stride-8 maps is
    centred on pixel (8i, 8j), and the logits are upsampled bilinearly so that pixel
    (8i, 8j) takes exactly unit (i, j)'s logits (the last 7 rows and columns repeat
    the border).

    Args:
        width: channels of the stride-8 maps.
        num_classes: output classes (background + 10 digits).
        dilation: dilation (and padding) of the head's three 3x3 convolutions.

    Shape:
        - Input: (N, 1, H, W), H and W multiples of 8.
        - Output: (N, num_classes, H, W) logits.

    Example:
        >>> import torch
        >>> SegmentationFCN(width=16)(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 11, 64, 64])
    """

    stride = 8

    def __init__(self, width: int = 64, num_classes: int = 11, dilation: int = 2) -> None:
        super().__init__()
        quarter, half = max(width // 4, 1), max(width // 2, 1)
        self.stem = nn.Sequential(
            _Block(1, quarter, stride=2),
            _Block(quarter, half, stride=2),
            _Block(half, width, stride=2),
            _Block(width, width),
        )
        self.head = nn.Sequential(*(_Block(width, width, dilation=dilation) for _ in range(3)))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def features(self, x: Tensor) -> Tensor:
        """The stem's stride-8 maps (N, width, H/8, W/8), the head's input."""
        return self.stem(x)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits; see the class docstring for shapes."""
        logits = self.classifier(self.head(self.stem(x)))
        h, w = logits.shape[-2:]
        s = self.stride
        up = F.interpolate(
            logits, size=(s * (h - 1) + 1, s * (w - 1) + 1), mode="bilinear", align_corners=True
        )
        return F.pad(up, (0, s - 1, 0, s - 1), mode="replicate")


def build_segmenter(
    variant: str, *, width: int = 64, dilation: int = 2, modulated: bool = False
) -> SegmentationFCN:
    """The network of one experiment variant (see :data:`VARIANTS`).

    Build two variants under the same ``torch.manual_seed`` and they start from the
    same weights (``deformify`` keeps them, with zero offsets).

    Args:
        variant: one of :data:`VARIANTS`.
        width: channels of the stride-8 maps.
        dilation: base dilation of the head (``atrousD`` overrides it with D).
        modulated: make the deformable layers modulated (DCNv2).

    Example:
        >>> build_segmenter("deform_last2", width=8).deformified
        ['head.1.conv', 'head.2.conv']
    """
    if variant not in VARIANTS:
        raise ValueError(
            f"build_segmenter: variant must be one of {list(VARIANTS)}; got {variant!r}"
        )
    if variant.startswith("atrous"):
        dilation = int(variant.removeprefix("atrous"))
    model = SegmentationFCN(width=width, dilation=dilation)
    if variant.startswith("deform_last"):
        count = int(variant.removeprefix("deform_last"))
        deformify(model, names=list(HEAD_LAYERS[-count:]), modulated=modulated)
    return model
