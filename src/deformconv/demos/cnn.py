"""The demo's small CNN: a stride-4 stem and three 3x3 conv blocks, then global pooling."""

from __future__ import annotations

from torch import Tensor, nn

from deformconv.models import deformify

__all__ = ["DEFORMABLE_LAYERS", "SmallCNN", "build_model"]

# The three convolutions that become deformable (the paper's res5a-c analogues).
DEFORMABLE_LAYERS = ("blocks.0.conv", "blocks.1.conv", "blocks.2.conv")


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Stem (two stride-2 3x3 convs: 64x64 -> 16x16), three 3x3 blocks, pool, linear.

    Unit (i, j) of the 16x16 maps is centred on input pixel (4i, 4j).

    Args:
        width: channels of the 16x16 maps (the stem's first conv has width // 2).
        num_classes: output classes.

    Shape:
        - Input: (N, 1, H, W), H and W multiples of 4.
        - Output: (N, num_classes) logits.

    Example:
        >>> import torch
        >>> SmallCNN(width=16)(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 10])
    """

    stride = 4

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        half = max(width // 2, 1)
        self.stem = nn.Sequential(
            nn.Conv2d(1, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(_Block(width), _Block(width), _Block(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits; see the class docstring for shapes."""
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def build_model(*, width: int, deformable: bool, modulated: bool = False) -> SmallCNN:
    """The demo model, plain or with its last three convolutions deformable.

    Build both under the same ``torch.manual_seed`` and they start from the same
    weights (``deformify`` keeps them, with zero offsets).

    Example:
        >>> net = build_model(width=8, deformable=True)
        >>> net.deformified
        ['blocks.0.conv', 'blocks.1.conv', 'blocks.2.conv']
    """
    model = SmallCNN(width=width)
    if deformable:
        deformify(model, last=3, modulated=modulated)
        if tuple(getattr(model, "deformified", ())) != DEFORMABLE_LAYERS:  # pragma: no cover
            raise RuntimeError(f"build_model: converted {model.deformified}")
    return model
