"""GPU benchmark: deformconv (Triton) vs F.conv2d (cuDNN) vs torchvision on CUDA.

Usage (from the repository root, on a machine with a CUDA device)::

    python -m benchmarks.bench_gpu                       # float32, the suite at its batch and 32
    python -m benchmarks.bench_gpu --dtype float16 --out gpu_fp16.md
    python -m benchmarks.bench_gpu --quick               # 2 shapes, fewer repeats (a smoke run)

For every shape of ``deformconv.bench.suite`` (``SUITE`` plus ``with_batch(32)``) and each
of forward and forward+backward, it times ``F.conv2d`` on the same shapes (the floor: one
cuDNN convolution), ``deformconv.deform_conv2d`` on the backend ``auto`` picks for CUDA
(``triton`` when Triton is importable), ``torchvision.ops.deform_conv2d`` (the peer),
the implicit-GEMM Triton forward (``implicit GEMM``, forward only: gathered tiles straight
into ``tl.dot``, no column buffer) and, unless ``--no-reference``, deformconv's
pure-PyTorch reference. Each time is the median
of ``--repeats`` (>= 5) CUDA-event timings after ``--warmup`` calls; peak memory is
``torch.cuda.max_memory_allocated`` during one call, above what the inputs hold. Offsets
are random (std 1 px) with fixed seeds; a sanity column gives deformconv's largest
difference from torchvision's forward output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from deformconv.bench.suite import SUITE, Case, with_batch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
#: The implicit-GEMM Triton forward (no column buffer), timed beside the column path that
#: ``deformconv`` dispatches to; forward only (its backward is the column one).
IMPLICIT = "implicit GEMM"


def _tensors(case: Case, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = case.kernel
    h_out, w_out = case.out_size

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, device="cuda", generator=gen) * scale
        return t.to(dtype)

    c_in, c_out, g = case.in_channels, case.out_channels, case.offset_groups
    return {
        "input": randn(case.batch, c_in, *case.size),
        "offset": randn(case.batch, 2 * g * k * k, h_out, w_out),
        "weight": randn(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5),
        "bias": randn(c_out),
        "mask": (
            torch.rand(case.batch, g * k * k, h_out, w_out, device="cuda", generator=gen).to(dtype)
            if case.modulated
            else None
        ),
    }


def _impls(case: Case, with_reference: bool) -> dict[str, Callable[..., torch.Tensor]]:
    import deformconv

    kw = {"stride": case.stride, "padding": case.padding}
    impls: dict[str, Callable[..., torch.Tensor]] = {
        "F.conv2d": lambda input, offset, weight, bias, mask: F.conv2d(input, weight, bias, **kw),
        "deformconv": lambda input, offset, weight, bias, mask: deformconv.deform_conv2d(
            input, offset, weight, bias, mask=mask, **kw
        ),
    }
    if deformconv.available_backends("cuda")[0] == "triton":
        from deformconv.kernels import _triton_implicit

        def implicit(input, offset, weight, bias, mask):  # type: ignore[no-untyped-def]
            args = (case.stride, case.stride), (case.padding, case.padding), (1, 1)
            return _triton_implicit.forward(input, offset, mask, weight, bias, *args)

        impls[IMPLICIT] = implicit
    try:
        import torchvision.ops

        impls["torchvision"] = lambda input, offset, weight, bias, mask: (
            torchvision.ops.deform_conv2d(input, offset, weight, bias, mask=mask, **kw)
        )
    except ImportError:
        pass
    if with_reference:

        def reference(input, offset, weight, bias, mask):  # type: ignore[no-untyped-def]
            with deformconv.use_backend("reference"):
                return deformconv.deform_conv2d(input, offset, weight, bias, mask=mask, **kw)

        impls["reference"] = reference
    return impls


def _timed(step: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of ``step`` by CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def _peak_mib(step: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(
    impl: Callable[..., torch.Tensor],
    tensors: dict[str, torch.Tensor | None],
    mode: str,
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    if mode == "fwd":

        def step() -> object:
            with torch.no_grad():
                return impl(**tensors)

    else:
        leaves = {k: None if t is None else t.detach().requires_grad_() for k, t in tensors.items()}
        grad = None

        def step() -> object:
            nonlocal grad
            out = impl(**leaves)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            for t in leaves.values():  # free the gradients: each step starts from none
                if t is not None:
                    t.grad = None
            return None

    median, low, high = _timed(step, warmup, repeats)
    return {"ms": median, "min_ms": low, "max_ms": high, "peak_mib": _peak_mib(step)}


def _header(dtype: str, repeats: int, warmup: int) -> str:
    import deformconv

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    versions = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    for name in ("torchvision", "triton"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    backend = deformconv.available_backends("cuda")[0]
    return (
        f"GPU: {torch.cuda.get_device_name()} · host {platform.node()} · {', '.join(versions)} · "
        f"deformconv backend `{backend}` · commit {commit} · {dtype} · "
        f"median of {repeats} after {warmup} warm-up calls (CUDA events)"
    )


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _table(rows: list[dict[str, object]], impls: list[str], mode: str) -> str:
    others = [i for i in impls if i not in ("F.conv2d", "deformconv")]
    cols = ["shape", "B", *[f"{i} ms" for i in impls], "dc / conv2d"]
    cols += [f"{i} / dc" for i in others] + ["dc peak MiB", "conv2d peak MiB"]
    if mode == "fwd":
        cols.append("max abs diff vs tv")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        res = row[mode]
        assert isinstance(res, dict)
        ms = {i: res[i]["ms"] if i in res else None for i in impls}
        dc = ms["deformconv"]

        def ratio(a: float | None, b: float | None) -> str:
            return "n/a" if a is None or b is None else f"{a / b:.2f}x"

        cells = [str(row["shape"]), str(row["batch"]), *[_fmt(ms[i]) for i in impls]]
        cells.append(ratio(dc, ms["F.conv2d"]))
        cells += [ratio(ms[i], dc) for i in others]
        cells.append(_fmt(res.get("deformconv", {}).get("peak_mib"), ".0f"))
        cells.append(_fmt(res.get("F.conv2d", {}).get("peak_mib"), ".0f"))
        if mode == "fwd":
            cells.append(_fmt(row.get("diff_vs_torchvision"), ".1e"))  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_vs_torchvision(impls: dict, tensors: dict) -> float | None:
    if "torchvision" not in impls:
        return None
    with torch.no_grad():
        a = impls["deformconv"](**tensors).float()
        b = impls["torchvision"](**tensors).float()
    return (a - b).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per cell (>= 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="*", default=[32], help="extra batch sizes")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--quick", action="store_true", help="2 shapes, 5 repeats: a smoke run")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU.", file=sys.stderr)  # fmt: skip
        return 2
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5; got {args.repeats}")
    dtype = DTYPES[args.dtype]
    cases = [*SUITE, *(c for b in args.batch for c in with_batch(b))]
    if args.quick:
        cases, args.repeats = [SUITE[1], with_batch(32)[1]], 5

    rows: list[dict[str, object]] = []
    names: list[str] = []
    for index, case in enumerate(cases):
        tensors = _tensors(case, dtype, seed=index)
        impls = _impls(case, with_reference=not args.no_reference)
        names = list(impls)
        row: dict[str, object] = {"shape": case.name, "batch": case.batch}
        for mode in MODES:
            results = {}
            for name, impl in impls.items():
                if name == IMPLICIT and mode != "fwd":
                    continue
                try:
                    results[name] = _measure(impl, tensors, mode, args.warmup, args.repeats)
                except (RuntimeError, NotImplementedError) as error:  # e.g. OOM, unsupported dtype
                    print(f"  {case.name} B={case.batch} {mode} {name}: {error}", file=sys.stderr)
                torch.cuda.empty_cache()
            row[mode] = results
        row["diff_vs_torchvision"] = _diff_vs_torchvision(impls, tensors)
        rows.append(row)
        dc = row["fwd+bwd"].get("deformconv", {}).get("ms")  # type: ignore[union-attr]
        print(f"[{index + 1}/{len(cases)}] {case.name} B={case.batch}: fwd+bwd {_fmt(dc)} ms",
              file=sys.stderr)  # fmt: skip

    text = [f"# GPU benchmark\n\n{_header(args.dtype, args.repeats, args.warmup)}\n"]
    for mode in MODES:
        text.append(f"## {mode}\n\n{_table(rows, names, mode)}\n")
    text.append("dc = deformconv; `x / dc` > 1 means deformconv is faster than x.")
    markdown = "\n".join(text)
    print(markdown)
    if args.out:
        args.out.write_text(markdown + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
