"""The benchmark shape suite shared by the CPU and GPU benchmarks.

Each case is one 3x3 deformable layer; offsets are random (std 1 px) so the
bilinear gather does real work, and the plain ``F.conv2d`` on the same shapes
is the floor every ratio is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One benchmark layer."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: tuple[int, int]  # (H_in, W_in)
    stride: int = 1
    offset_groups: int = 1
    modulated: bool = False
    kernel: int = 3

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.size)  # type: ignore[return-value]


SUITE: tuple[Case, ...] = (
    Case("res3 3x3 (ResNet-50)", 8, 128, 128, (28, 28)),
    Case("res4 3x3 (ResNet-50)", 8, 256, 256, (14, 14)),
    Case("res5 3x3 (ResNet-50)", 8, 512, 512, (7, 7)),
    Case("detection B=2 C=64 128x128", 2, 64, 64, (128, 128)),
    Case("stride 2 (res4 entry)", 8, 256, 256, (28, 28), stride=2),
    Case("modulated, 4 offset groups", 8, 256, 256, (14, 14), offset_groups=4, modulated=True),
)


def with_batch(batch: int) -> tuple[Case, ...]:
    """The suite at another batch size (the GPU benchmark adds batch 32)."""
    return tuple(
        Case(
            c.name,
            batch,
            c.in_channels,
            c.out_channels,
            c.size,
            c.stride,
            c.offset_groups,
            c.modulated,
            c.kernel,
        )
        for c in SUITE
    )
