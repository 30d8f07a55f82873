"""Runs the direct Triton kernels on CPU tensors under Triton's interpreter; saves results.

``python tests/_triton_direct_interpret.py OUT.pt`` (spawned by ``test_grouped.py`` in a
fresh process, because ``TRITON_INTERPRET=1`` must be set before Triton is imported) runs
every case of ``CASES`` through ``deformconv.kernels._triton_direct.forward`` and
``backward`` and saves the inputs, the output and the gradients; the parent test compares
them with the reference backend. Nothing here judges the results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cases import Config, call_kwargs, make_problem  # noqa: E402
from _triton_interpret import NEEDS_GRAD, needs_grad_key  # noqa: E402

CASES: dict[str, tuple[Config, torch.dtype]] = {
    "depthwise": (Config(batch=2, in_channels=4, out_channels=4, groups=4, size=(5, 4)), torch.float64),
    "depthwise_x2_modulated": (Config(in_channels=3, out_channels=6, groups=3, mask=True, size=(4, 5)), torch.float64),
    "groups_2_offset_groups_4": (Config(in_channels=8, out_channels=6, groups=2, offset_groups=4, mask=True, stride=(2, 1)), torch.float64),
    "straddle_float32": (Config(in_channels=6, out_channels=4, groups=2, offset_groups=3, mask=True, dilation=(2, 1), padding=(2, 1)), torch.float32),
    "batch_0": (Config(batch=0, in_channels=4, out_channels=4, groups=4), torch.float64),
}  # fmt: skip


# The backward of NEEDS_GRAD_CASE with only some gradients asked for (the same patterns
# as the column Triton kernels' test).
NEEDS_GRAD_CASE = "groups_2_offset_groups_4"


def make_case(name: str) -> dict[str, object]:
    cfg, dtype = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x, offset, weight, bias, mask = make_problem(cfg, dtype, generator=gen)
    tensors = {"input": x, "offset": offset, "mask": mask, "weight": weight, "bias": bias}
    out_shape = (cfg.batch, cfg.out_channels, *cfg.out_size)
    grad_output = torch.randn(out_shape, generator=gen, dtype=dtype)
    return {**tensors, "grad_output": grad_output, **call_kwargs(cfg)}


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    from deformconv.kernels import _triton_direct

    results = {}
    for name in CASES:
        c = make_case(name)
        args = (c["stride"], c["padding"], c["dilation"])
        tensors = [c[k] for k in ("input", "offset", "mask", "weight", "bias")]
        out = _triton_direct.forward(*tensors, *args)
        grads = _triton_direct.backward(c["grad_output"], *tensors, *args)
        results[name] = {**c, "out": out, "grads": list(grads)}
    c = make_case(NEEDS_GRAD_CASE)
    args = (c["stride"], c["padding"], c["dilation"])
    tensors = [c[k] for k in ("input", "offset", "mask", "weight", "bias")]
    results["needs_grad"] = {
        needs_grad_key(needs): list(
            _triton_direct.backward(c["grad_output"], *tensors, *args, needs_grad=needs)
        )
        for needs in NEEDS_GRAD
    }
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
