"""``deformconv example``: a quick tour that checks the install end to end."""

from __future__ import annotations

import argparse

NAME = "example"
HELP = "Run a deformable layer and the op on random data; compare with F.conv2d."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this subcommand's options."""
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Build a fresh layer, check it equals its convolution, then shift the offsets."""
    import torch
    import torch.nn.functional as F

    import deformconv

    torch.manual_seed(args.seed)
    x = torch.randn(2, 16, 32, 32, device=args.device)
    layer = deformconv.DeformConv2d(16, 32, 3, padding=1, modulated=True).to(args.device)
    y = layer(x)
    plain = F.conv2d(x, layer.weight, layer.bias, padding=1)
    print(f"backends on {x.device.type}: {deformconv.available_backends(x.device.type)}")
    gap = (y - plain).abs().max()
    print(f"fresh DeformConv2d output {tuple(y.shape)}; max |y - conv2d| = {gap:.2e}")
    offset = torch.full((2, 18, 32, 32), 0.5, device=args.device)
    y2 = deformconv.deform_conv2d(x, offset, layer.weight, layer.bias, padding=1)
    print(f"with all offsets = 0.5 px: mean |change| = {(y2 - plain).abs().mean():.3f}")
    return 0
