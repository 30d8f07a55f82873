"""Where the numba backend's time goes: ``python benchmarks/profile_cpu.py [--threads 2]``.

Wraps the two Numba kernels (``_im2col``, ``_col2im``) with timers and runs the kernel
module's ``forward`` and ``backward`` on each layer of the benchmark suite; everything
else (BLAS GEMMs, layout copies) is the remainder. Prints the median of 5 runs in ms.

``--crossover``: instead, times the two formulations of a grouped convolution side by
side, column + GEMM (``kernels/_numba.py``) and direct (``kernels/_numba_direct.py``),
forward + backward over group widths ``C_in / groups`` from 1 to 128 (C = 256, 14x14 and
28x28, batch 8), which is how the dispatch threshold ``MAX_GROUP_CHANNELS`` was chosen.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deformconv.bench.cpu import _inputs  # noqa: E402
from deformconv.bench.suite import SUITE, Case  # noqa: E402
from deformconv.kernels import _numba as K  # noqa: E402
from deformconv.kernels import _numba_direct as D  # noqa: E402

_spent = {"im2col": 0.0, "col2im": 0.0}


def _timed(name: str, kernel: Any) -> Callable[..., None]:
    def wrapper(*args: Any) -> None:
        start = time.perf_counter()
        kernel(*args)
        _spent[name] += time.perf_counter() - start

    return wrapper


def main(argv: list[str] | None = None) -> int:
    """Print the forward/backward split per suite layer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crossover", action="store_true", help="column vs direct by width")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.crossover:
        return _crossover()
    K._im2col = _timed("im2col", K._im2col)  # type: ignore[assignment]
    K._col2im = _timed("col2im", K._col2im)  # type: ignore[assignment]
    print("layer | forward ms: total, gather | backward ms: total, gather, col2im, rest")
    for shape in SUITE:
        case = Case(**{f: getattr(shape, f) for f in Case.__dataclass_fields__})
        t = _inputs(case, requires_grad=False)
        geo = ((case.stride,) * 2, (case.padding,) * 2, (1, 1))
        args_ = (t["x"], t["off"], t["mask"], t["w"], t["b"], *geo)
        rows = []
        calls = (
            lambda a=args_: K.forward(*a),
            lambda a=args_, g=t["grad"]: K.backward(g, *a),
        )
        for fn in calls:
            fn()
            runs = []
            for _ in range(5):
                _spent.update(im2col=0.0, col2im=0.0)
                start = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - start, _spent["im2col"], _spent["col2im"]))
            runs.sort()
            rows.append([v * 1e3 for v in runs[len(runs) // 2]])
        (f, fi, _), (b, bi, bc) = rows
        print(f"{case.name} | {f:.1f}, {fi:.1f} | {b:.1f}, {bi:.1f}, {bc:.1f}, {b - bi - bc:.1f}")
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
