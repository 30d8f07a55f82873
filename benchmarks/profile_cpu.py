"""Where the numba backend's time goes: ``python benchmarks/profile_cpu.py [--threads 2]``.

Wraps the two Numba kernels (``_im2col``, ``_col2im``) with timers and runs the kernel
module's ``forward`` and ``backward`` on each layer of the benchmark suite; everything
else (BLAS GEMMs, layout copies) is the remainder. Prints the median of 5 runs in ms.
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    sys.exit(main())
