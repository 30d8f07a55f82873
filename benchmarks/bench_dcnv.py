"""CPU speed of deformconv.dcnv3 vs what InternImage users run without CUDA, and vs deform_conv2d.

Three implementations of the same DCNv3 core, side by side in one process:

- ``deformconv.dcnv3`` on the chosen backend (``numba`` by default);
- ``grid_sample``: InternImage's pure-PyTorch fallback construction (``dcnv3_core_pytorch``:
  one ``F.grid_sample`` over (N·G, C_g, H, W) planes, then the mask-weighted sum);
- ``deform_conv2d`` at equal work: the depthwise special case of DCNv2
  (``groups = C``, weights of ones, G offset groups, same number of bilinear samples).

Forward, and forward + backward (gradients of input, offset and mask), median of
``--repeats`` runs after a warm-up, on InternImage-like shapes (3x3, stride 1, pad 1).

    python benchmarks/bench_dcnv.py --threads 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import deformconv
from deformconv.bench.cpu import machine_description, settle_allocator

SHAPES = [(8, 56, 56, 64, 4), (8, 28, 28, 128, 8), (8, 14, 14, 256, 16)]


def grid_sample_dcnv3(x, offset, mask, group):
    """InternImage's construction: padded input, normalised grid, ``F.grid_sample``, sum."""
    n, h, w, c = x.shape
    p = 9
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    hp, wp = h + 2, w + 2
    ref_y = (1.5 + torch.arange(h, dtype=x.dtype)) / hp
    ref_x = (1.5 + torch.arange(w, dtype=x.dtype)) / wp
    gx, gy = torch.meshgrid(
        torch.arange(-1, 2, dtype=x.dtype) / wp,
        torch.arange(-1, 2, dtype=x.dtype) / hp,
        indexing="ij",
    )
    off = offset.reshape(n, h, w, group, p, 2)
    loc_x = ref_x[None, None, :, None, None] + gx.reshape(p) + off[..., 0] / wp
    loc_y = ref_y[None, :, None, None, None] + gy.reshape(p) + off[..., 1] / hp
    grid = torch.stack([2 * loc_x - 1, 2 * loc_y - 1], -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, h * w, p, 2)
    planes = xp.permute(0, 3, 1, 2).reshape(n * group, c // group, hp, wp)
    samples = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # fmt: skip
    m = mask.reshape(n, h * w, group, p).permute(0, 2, 1, 3).reshape(n * group, 1, h * w, p)
    return (samples * m).sum(-1).reshape(n, c, h, w).permute(0, 2, 3, 1)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (and JIT compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench(shape: tuple[int, int, int, int, int], repeats: int, backend: str) -> dict[str, float]:
    n, h, w, c, group = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, w, c, generator=g)
    offset = 2 * torch.randn(n, h, w, group * 18, generator=g)
    mask = torch.softmax(torch.randn(n, h, w, group, 9, generator=g), -1).reshape(n, h, w, -1)
    # The same samples as deform_conv2d's (N, 2·G·9, H, W) (Δy, Δx) row-major offsets.
    off_tv = offset.reshape(n, h, w, group, 3, 3, 2).transpose(4, 5).flip(-1)
    off_tv = off_tv.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()
    mask_tv = mask.reshape(n, h, w, group, 3, 3).transpose(4, 5).reshape(n, h, w, -1)
    mask_tv = mask_tv.permute(0, 3, 1, 2).contiguous()
    x_nchw = x.permute(0, 3, 1, 2).contiguous()
    ones = torch.ones(c, 1, 3, 3)
    grad = torch.randn(n, h, w, c, generator=g)

    def ours() -> torch.Tensor:
        with deformconv.use_backend(backend):
            return deformconv.dcnv3(x, offset, mask, group=group)

    def ref() -> torch.Tensor:
        return grid_sample_dcnv3(x, offset, mask, group)

    def dcn() -> torch.Tensor:
        with deformconv.use_backend(backend):
            out = deformconv.deform_conv2d(x_nchw, off_tv, ones, padding=1, mask=mask_tv)
        return out.permute(0, 2, 3, 1)

    torch.testing.assert_close(ours(), ref(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(), dcn(), rtol=1e-4, atol=1e-4)
    result = {}
    for name, fn, inputs in (
        ("dcnv3", ours, (x, offset, mask)),
        ("grid_sample", ref, (x, offset, mask)),
        ("deform_conv2d", dcn, (x_nchw, off_tv, mask_tv)),
    ):
        with torch.no_grad():
            result[f"{name}_fwd"] = _median_ms(fn, repeats)
        for t in inputs:
            t.requires_grad_(True)

        def step(fn: Callable[[], torch.Tensor] = fn, inputs: tuple = inputs) -> None:
            torch.autograd.grad(fn(), inputs, grad)

        result[f"{name}_fwd_bwd"] = _median_ms(step, repeats)
        for t in inputs:
            t.requires_grad_(False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settle_allocator()  # as a running model's: no one pays page faults on every call
    print(
        f"# {machine_description()}, "
        f"{args.threads} threads; torch {torch.__version__}; deformconv {_commit()}; "
        f"backend {args.backend}; median of {args.repeats} (ms)\n"
    )
    print("| shape (N, H, W, C), G | dcnv3 fwd | grid_sample fwd | deform_conv2d fwd "
          "| dcnv3 fwd+bwd | grid_sample fwd+bwd | deform_conv2d fwd+bwd "
          "| speed-up vs grid_sample fwd / fwd+bwd |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in SHAPES:
        r = bench(shape, args.repeats, args.backend)
        rows.append({"shape": shape, **r})
        print(
            f"| {shape[:4]}, {shape[4]} | {r['dcnv3_fwd']:.1f} | {r['grid_sample_fwd']:.1f} "
            f"| {r['deform_conv2d_fwd']:.1f} | {r['dcnv3_fwd_bwd']:.1f} "
            f"| {r['grid_sample_fwd_bwd']:.1f} | {r['deform_conv2d_fwd_bwd']:.1f} "
            f"| {r['grid_sample_fwd'] / r['dcnv3_fwd']:.1f}x / "
            f"{r['grid_sample_fwd_bwd'] / r['dcnv3_fwd_bwd']:.1f}x |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
