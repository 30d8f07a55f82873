"""Where the numba backend's time goes: ``python benchmarks/profile_cpu.py [--threads 2]``.

Wraps the two Numba kernels (``_im2col``, ``_col2im``) and the matrix products (oneDNN's
and ``torch.mm``) with timers and runs the kernel module's ``forward`` and ``backward``
on each layer of the benchmark suite, interleaved with ``F.conv2d``'s forward and
forward + backward on the same tensors; everything else (layout copies, Python) is the
remainder. Prints the median of 7 runs in ms, and the matrix products' time as a
multiple of ``F.conv2d``'s: the ratio to ``F.conv2d`` that this design cannot go below
unless its products get faster, whatever the gather and the copies cost.

``--crossover``: instead, times the two formulations of a grouped convolution side by
side, column + GEMM (``kernels/_numba.py``) and direct (``kernels/_numba_direct.py``),
forward + backward over group widths ``C_in / groups`` from 1 to 128 (C = 256, 14x14 and
28x28, batch 8), which is how the dispatch threshold ``MAX_GROUP_CHANNELS`` was chosen.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deformconv.bench.cpu import _inputs, settle_allocator  # noqa: E402
from deformconv.bench.suite import SUITE, Case  # noqa: E402
from deformconv.kernels import _numba as K  # noqa: E402
from deformconv.kernels import _numba_direct as D  # noqa: E402
from deformconv.kernels import _onednn  # noqa: E402

_spent = {"im2col": 0.0, "col2im": 0.0, "gemm": 0.0}
_RUNS = 7


def _timed(name: str, kernel: Any) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = kernel(*args, **kwargs)
        _spent[name] += time.perf_counter() - start
        return result

    return wrapper


def _time_products() -> None:
    """Route every matrix product of the kernel module through a timer."""
    for name in ("forward_rows", "backward_rows", "weight_rows_into"):
        setattr(_onednn, name, _timed("gemm", getattr(_onednn, name)))
    K._gemm = _timed("gemm", K._gemm)  # type: ignore[assignment]
    # The kernel module's own torch.mm calls (several weight groups, few pixels); this
    # script's F.conv2d does not go through the Python attribute.
    torch.mm = _timed("gemm", torch.mm)


def _conv_fb(t: dict[str, Any], case: Case) -> None:
    x, w, b = (t[k].detach().requires_grad_() for k in ("x", "w", "b"))
    y = F.conv2d(x, w, b, stride=case.stride, padding=case.padding, groups=case.groups)
    y.backward(t["grad"])


def _median_row(fns: list[Callable[[], Any]]) -> list[list[float]]:
    """Per function: the run (ms: total, im2col, col2im, GEMMs) of median total time."""
    runs: list[list[list[float]]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(_RUNS):
        for i, fn in enumerate(fns):
            _spent.update(im2col=0.0, col2im=0.0, gemm=0.0)
            start = time.perf_counter()
            fn()
            total = time.perf_counter() - start
            runs[i].append([v * 1e3 for v in (total, *_spent.values())])
    return [sorted(r)[len(r) // 2] for r in runs]


def main(argv: list[str] | None = None) -> int:
    """Print the forward/backward split per suite layer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crossover", action="store_true", help="column vs direct by width")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.crossover:
        return _crossover()
    settle_allocator()
    K._im2col = _timed("im2col", K._im2col)  # type: ignore[assignment]
    K._col2im = _timed("col2im", K._col2im)  # type: ignore[assignment]
    _time_products()
    print(
        "layer | forward ms: conv2d, ours (gather, GEMMs, rest), GEMMs / conv2d"
        " | forward + backward ms: conv2d, ours (gather, col2im, GEMMs, rest), GEMMs / conv2d"
    )
    for shape in SUITE:
        case = Case(**{f: getattr(shape, f) for f in Case.__dataclass_fields__})
        t = _inputs(case, requires_grad=False)
        geo = ((case.stride,) * 2, (case.padding,) * 2, (1, 1))
        args_ = (t["x"], t["off"], t["mask"], t["w"], t["b"], *geo)

        def conv(t: dict[str, Any] = t, case: Case = case) -> None:
            F.conv2d(t["x"], t["w"], t["b"], stride=case.stride, padding=case.padding)

        def fwd_bwd(a: tuple[Any, ...] = args_, g: torch.Tensor = t["grad"]) -> None:
            K.forward(*a)
            K.backward(g, *a)

        fwd, conv_f, fb, conv_fb = _median_row(
            [
                functools.partial(K.forward, *args_),
                conv,
                fwd_bwd,
                functools.partial(_conv_fb, t, case),
            ]
        )
        f, fi, _, fg = fwd
        b, bi, bc, bg = fb
        print(
            f"{case.name} | {conv_f[0]:.1f}, {f:.1f} ({fi:.1f}, {fg:.1f}, {f - fi - fg:.1f}),"
            f" {fg / conv_f[0]:.2f}x | {conv_fb[0]:.1f}, {b:.1f} ({bi:.1f}, {bc:.1f}, {bg:.1f},"
            f" {b - bi - bc - bg:.1f}), {bg / conv_fb[0]:.2f}x"
        )
    return 0


def _column_fwd_bwd(*args: Any) -> None:
    # The column + GEMM path whatever the dispatch would choose.
    saved = D.prefers_direct
    D.prefers_direct = lambda *a: False  # type: ignore[assignment]
    try:
        K.backward(args[0], *args[1:])
        K.forward(*args[1:])
    finally:
        D.prefers_direct = saved  # type: ignore[assignment]


def _direct_fwd_bwd(*args: Any) -> None:
    D.backward(args[0], *args[1:])
    D.forward(*args[1:])


def _crossover() -> int:
    print("layer (N, C, H×W) | groups | C/groups | column ms | direct ms | direct / column")
    for size in (14, 28):
        for groups in (256, 64, 32, 16, 8, 4, 2):
            case = Case("crossover", 8, 256, 256, (size, size), groups=groups)
            t = _inputs(case, requires_grad=False)
            geo = ((1, 1), (1, 1), (1, 1))
            args_ = (t["grad"], t["x"], t["off"], t["mask"], t["w"], t["b"], *geo)
            times: dict[str, list[float]] = {"column": [], "direct": []}
            fns = {"column": _column_fwd_bwd, "direct": _direct_fwd_bwd}
            for fn in fns.values():
                fn(*args_)
            for _ in range(5):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn(*args_)
                    times[name].append((time.perf_counter() - start) * 1e3)
            col, dire = (sorted(times[n])[2] for n in ("column", "direct"))
            print(
                f"(8, 256, {size}×{size}) | {groups} | {256 // groups} | {col:.1f} | {dire:.1f}"
                f" | {dire / col:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
