"""Shared random problem generator for the deform_conv2d tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Config:
    batch: int = 2
    in_channels: int = 4
    out_channels: int = 6
    size: tuple[int, int] = (7, 6)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = False
    bias: bool = True

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )


def make_problem(cfg: Config, dtype=torch.float64, offset_scale: float = 2.0, generator=None):
    """Random (input, offset, weight, bias, mask) for ``cfg``; kwargs for deform_conv2d."""
    g = generator
    k = cfg.kernel[0] * cfg.kernel[1]
    h_out, w_out = cfg.out_size
    x = torch.randn(cfg.batch, cfg.in_channels, *cfg.size, dtype=dtype, generator=g)
    offset = offset_scale * torch.randn(
        cfg.batch, 2 * cfg.offset_groups * k, h_out, w_out, dtype=dtype, generator=g
    )
    weight = torch.randn(
        cfg.out_channels, cfg.in_channels // cfg.groups, *cfg.kernel, dtype=dtype, generator=g
    )
    bias = torch.randn(cfg.out_channels, dtype=dtype, generator=g) if cfg.bias else None
    mask = (
        torch.rand(cfg.batch, cfg.offset_groups * k, h_out, w_out, dtype=dtype, generator=g)
        if cfg.mask
        else None
    )
    return x, offset, weight, bias, mask


def call_kwargs(cfg: Config) -> dict:
    return {"stride": cfg.stride, "padding": cfg.padding, "dilation": cfg.dilation}


# Awkward configurations on purpose: non-square kernels, stride (2, 1), offset groups that
# straddle weight groups, rectangular inputs, odd batch, batch 0.
CONFIGS = {
    "basic": Config(),
    "no_bias": Config(bias=False),
    "modulated": Config(mask=True),
    "stride_2_1": Config(stride=(2, 1)),
    "padding_0": Config(padding=(0, 0)),
    "padding_2_0": Config(padding=(2, 0)),
    "dilation_2_1": Config(dilation=(2, 1), padding=(2, 1)),
    "kernel_2x3": Config(kernel=(2, 3), padding=(0, 1)),
    "kernel_1x1": Config(kernel=(1, 1), padding=(0, 0)),
    "kernel_5x1": Config(kernel=(5, 1), padding=(2, 0), size=(8, 5)),
    "groups_2": Config(groups=2),
    "offset_groups_2": Config(offset_groups=2, mask=True),
    "offset_groups_4_groups_2": Config(in_channels=8, groups=2, offset_groups=4),
    "straddle_og3_g2": Config(in_channels=6, groups=2, offset_groups=3, mask=True),
    "depthwise": Config(in_channels=4, out_channels=4, groups=4, offset_groups=2),
    "odd_batch": Config(batch=3, size=(5, 9)),
    "batch_1_tall": Config(batch=1, size=(11, 4), stride=(2, 2)),
    "everything": Config(
        batch=3,
        in_channels=6,
        out_channels=4,
        size=(9, 8),
        kernel=(3, 2),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(2, 1),
        groups=2,
        offset_groups=3,
        mask=True,
    ),
}
