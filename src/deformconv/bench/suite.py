"""The benchmark shape suite: the one definition shared by the CPU and GPU benchmarks.

Each case is one deformable layer; offsets are random (std 1 px) so the bilinear gather
does real work, and the plain ``F.conv2d`` on the same shapes (and groups) is the floor
every ratio is measured against.

:data:`SUITE` holds the dense layers of a ResNet-50 and a detection head; :data:`GROUPED`
the grouped layers of a ResNeXt-50 (32x4d: ``groups = 32``) and depthwise layers
(``groups = C``); :data:`SUITES` names them for ``deformconv bench --suite``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GROUPED", "LARGE", "SUITE", "SUITES", "Case", "with_batch"]


@dataclass(frozen=True)
class Case:
    """One benchmark layer (a 3x3 deformable convolution with ``padding = kernel // 2``)."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: tuple[int, int]
    stride: int = 1
    offset_groups: int = 1
    modulated: bool = False
    kernel: int = 3
    groups: int = 1

    @property
    def padding(self) -> int:
        """Zero padding ``kernel // 2`` (same-size output at stride 1)."""
        return self.kernel // 2

    @property
    def out_size(self) -> tuple[int, int]:
        """(H_out, W_out)."""
        h, w = ((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.size)
        return h, w


SUITE: tuple[Case, ...] = (
    Case("res3 3x3 (ResNet-50)", 8, 128, 128, (28, 28)),
    Case("res4 3x3 (ResNet-50)", 8, 256, 256, (14, 14)),
    Case("res5 3x3 (ResNet-50)", 8, 512, 512, (7, 7)),
    Case("detection B=2 C=64 128x128", 2, 64, 64, (128, 128)),
    Case("stride 2 (res4 entry)", 8, 256, 256, (28, 28), stride=2),
    Case("modulated, 4 offset groups", 8, 256, 256, (14, 14), offset_groups=4, modulated=True),
)

#: The peak-memory case (``--large``); needs a machine with about 24 GiB.
LARGE = Case("large B=32 C=256 56x56", 32, 256, 256, (56, 56))


def with_batch(batch: int, cases: tuple[Case, ...] = SUITE) -> tuple[Case, ...]:
    """The suite at another batch size (the GPU benchmark adds batch 32, serving uses 1)."""
    return tuple(dataclasses.replace(c, batch=batch) for c in cases)


GROUPED: tuple[Case, ...] = (
    Case("ResNeXt res3 3x3, groups 32", 8, 256, 256, (28, 28), groups=32),
    Case("ResNeXt res4 3x3, groups 32", 8, 512, 512, (14, 14), groups=32),
    Case("depthwise 3x3, 64 ch", 8, 64, 64, (56, 56), groups=64),
    Case("depthwise 3x3, 128 ch", 8, 128, 128, (56, 56), groups=128),
)

#: The suites by name (``deformconv bench --suite NAME``); ``-b1``: batch 1 (serving).
SUITES: dict[str, tuple[Case, ...]] = {
    "dense": SUITE,
    "grouped": GROUPED,
    "grouped-b1": with_batch(1, GROUPED),
    "dense-b1": with_batch(1, SUITE[1:4]),  # serving: res4, res5, the detection layer
}
