"""CPU benchmark: deformable RoI pooling vs ``torchvision.ops.roi_align``.

Usage (from the repository root)::

    python -m benchmarks.bench_roi                  # 2 threads, batch 2, writes bench_roi.md
    python -m benchmarks.bench_roi --batch 1 --repeats 9 --out roi_b1.md

Problem (a Faster R-CNN C4/FPN-like head): a (B, 256, 50, 68) feature map (an
800x1088 image at stride 16, ``spatial_scale=1/16``), 512 RoIs with centres uniform
in the image and log-uniform sides in [32, 512] px (clipped to the image), 7x7 bins,
adaptive sampling (``sampling_ratio=0``), ``aligned=True``. deformconv gets random
offsets (std 0.1, i.e. shifts of about 1% of the RoI size per unit of gamma=0.1).
Forward+backward computes the gradient of the input and (for deformconv) of the offsets
(and mask). Each time is the median of ``--repeats`` runs after one warm-up call, all in
one process, side by side.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import deformconv
from deformconv.bench.cpu import machine_description


def _rois(k: int, batch: int, image: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    h, w = image
    centre = torch.rand(k, 2, generator=gen) * torch.tensor([w, h], dtype=torch.float32)
    log_side = torch.empty(k, 2).uniform_(math.log(32), math.log(512), generator=gen)
    side = log_side.exp()
    lo = (centre - side / 2).clamp(min=0)
    hi = torch.minimum(centre + side / 2, torch.tensor([w, h], dtype=torch.float32))
    index = torch.randint(0, batch, (k, 1), generator=gen).float()
    return torch.cat([index, lo, hi], 1)


def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (max(times) - min(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument("--out", default="bench_roi.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 256, 50, 68, generator=gen)
    rois = _rois(args.rois, args.batch, (800, 1088), gen)
    offset = 0.1 * torch.randn(args.rois, 2, 7, 7, generator=gen)
    mask = torch.rand(args.rois, 1, 7, 7, generator=gen)
    scale = 1 / 16

    def tv(x: torch.Tensor, offset: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        return torchvision.ops.roi_align(x, rois, 7, scale, 0, True)

    def ours(
        x: torch.Tensor, offset: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return deformconv.deform_roi_pool(x, rois, offset, 7, scale, 0, 0.1, True, mask)

    rows = [
        ("torchvision roi_align", tv, "auto", False, False),
        ("deform_roi_pool (fast path)", ours, "auto", True, False),
        ("deform_roi_pool modulated (fast path)", ours, "auto", True, True),
    ]
    if not args.no_reference:
        rows.append(("deform_roi_pool (reference)", ours, "reference", True, False))

    results = []
    for name, fn, backend, with_offset, with_mask in rows:
        with deformconv.use_backend(backend):
            off = offset if with_offset else None
            m = mask if with_mask else None
            with torch.no_grad():
                fwd = _median_ms(lambda fn=fn, off=off, m=m: fn(x, off, m), args.repeats)
            xg = x.clone().requires_grad_()
            og = off.clone().requires_grad_() if off is not None else None
            mg = m.clone().requires_grad_() if m is not None else None

            def step(fn=fn, xg=xg, og=og, mg=mg) -> None:
                fn(xg, og, mg).sum().backward()

            both = _median_ms(step, args.repeats)
        results.append((name, fwd, both))
        print(f"{name:40s} fwd {fwd[0]:8.1f} ms   fwd+bwd {both[0]:8.1f} ms", flush=True)

    base_f, base_b = results[0][1][0], results[0][2][0]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines = [
        f"Deformable RoI pooling vs torchvision.ops.roi_align — {args.rois} RoIs on a "
        f"({args.batch}, 256, 50, 68) map, 7x7 bins, sampling_ratio=0, aligned=True",
        "",
        f"Machine: {machine_description()}; {args.threads} threads; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}; commit {commit}; "
        f"median of {args.repeats} runs.",
        "",
        "| op | fwd (ms) | fwd / roi_align | fwd+bwd (ms) | fwd+bwd / roi_align |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, fwd, both in results:
        lines.append(
            f"| {name} | {fwd[0]:.1f} | {fwd[0] / base_f:.2f}x | {both[0]:.1f} | "
            f"{both[0] / base_b:.2f}x |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).write_text(table + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
