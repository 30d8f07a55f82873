"""Runs the Triton kernels on CPU tensors under Triton's interpreter and saves the results.

``python tests/_triton_interpret.py OUT.pt`` (spawned by ``test_triton_kernels.py`` in a
fresh process, because ``TRITON_INTERPRET=1`` must be set before Triton is first
imported) runs every case of ``CASES`` through ``deformconv.kernels._triton.forward`` and
``backward`` and saves, per case, the inputs, the output and the gradients. The parent
test compares them with the reference kernel and the naive loop oracle; nothing here
judges the results.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cases import CONFIGS, Config, call_kwargs, make_problem  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    cfg: Config
    dtype: torch.dtype = torch.float64
    offsets: str = "random"  # random | integer | borders | off_map | nonfinite
    chunked: bool = False  # one image per chunk (WORKSPACE_BYTES = 1)


_MOD = Config(mask=True)
_PLAIN = (
    "basic no_bias modulated stride_2_1 padding_0 dilation_2_1 kernel_2x3 kernel_5x1 groups_2 "
    "offset_groups_2 straddle_og3_g2 depthwise odd_batch batch_1_tall everything"
).split()
CASES: dict[str, Case] = {
    **{name: Case(CONFIGS[name]) for name in _PLAIN},
    "batch_0": Case(Config(batch=0, mask=True)),
    "chunked_odd_batch": Case(Config(batch=3, size=(5, 9), mask=True), chunked=True),
    "integer_positions": Case(_MOD, offsets="integer"),
    "border_positions": Case(_MOD, offsets="borders"),
    "off_the_map": Case(_MOD, offsets="off_map"),
    "nan_inf_offsets": Case(_MOD, offsets="nonfinite"),
    "float32_everything": Case(CONFIGS["everything"], dtype=torch.float32),
    "float32_borders": Case(_MOD, dtype=torch.float32, offsets="borders"),
    "float16_modulated": Case(_MOD, dtype=torch.float16),
    "bfloat16_modulated": Case(_MOD, dtype=torch.bfloat16),
}


def special_offsets(
    kind: str,
    offset: torch.Tensor,
    base: tuple[torch.Tensor, torch.Tensor],
    size: tuple[int, int],
    generator: torch.Generator,
) -> torch.Tensor:
    """Offsets whose positions are integers, on the borders, off the map or not finite.

    ``base`` holds the positions of zero offsets, (N, G, K, H_out, W_out) each.
    """
    n, _, h_out, w_out = offset.shape
    shape = base[0].shape
    if kind == "integer":
        target_y = base[0] + torch.randint(-3, 4, shape, generator=generator)
        target_x = base[1] + torch.randint(-3, 4, shape, generator=generator)
    elif kind == "borders":
        # Exactly on -1, 0, H-1, H (and half-way outside) in each direction, mixed with
        # ordinary positions in the other.
        def pick(extent: int) -> torch.Tensor:
            choices = torch.tensor(
                [-1.5, -1.0, -0.5, 0.0, extent - 1.0, extent - 0.5, extent, extent + 0.5, 1.25],
                dtype=torch.float64,
            )
            return choices[torch.randint(0, len(choices), shape, generator=generator)]

        target_y, target_x = pick(size[0]), pick(size[1])
    elif kind == "off_map":
        huge = torch.tensor([1e3, -1e3, 1e30, -1e30, 2.0**31, 0.3])
        target_y = base[0] + huge[torch.randint(0, 6, shape, generator=generator)]
        target_x = base[1] + huge[torch.randint(0, 6, shape, generator=generator)]
    elif kind == "nonfinite":
        bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 0.0])
        target_y = base[0] + bad[torch.randint(0, 5, shape, generator=generator)]
        target_x = base[1] + bad[torch.randint(0, 5, shape, generator=generator)]
    else:
        raise ValueError(kind)
    dy, dx = target_y - base[0], target_x - base[1]
    return torch.stack([dy, dx], dim=3).reshape(n, -1, h_out, w_out).to(offset.dtype)


def make_case(name: str) -> dict[str, object]:
    """Inputs of case ``name`` (deterministic), as a dict of tensors/None and arguments."""
    from deformconv.kernels.reference import sampling_positions

    case = CASES[name]
    cfg = case.cfg
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x, offset, weight, bias, mask = make_problem(cfg, torch.float64, generator=gen)
    if case.offsets != "random":
        base = sampling_positions(
            torch.zeros_like(offset), cfg.kernel, cfg.stride, cfg.padding, cfg.dilation
        )
        offset = special_offsets(case.offsets, offset, base, cfg.size, gen)
    tensors = {"input": x, "offset": offset, "mask": mask, "weight": weight, "bias": bias}
    tensors = {k: None if t is None else t.to(case.dtype) for k, t in tensors.items()}
    out_shape = (cfg.batch, cfg.out_channels, *cfg.out_size)
    grad_output = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(case.dtype)
    return {**tensors, "grad_output": grad_output, **call_kwargs(cfg)}


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    from deformconv.kernels import _triton

    results = {}
    for name, case in CASES.items():
        c = make_case(name)
        args = (c["stride"], c["padding"], c["dilation"])
        tensors = [c[k] for k in ("input", "offset", "mask", "weight", "bias")]
        _triton.WORKSPACE_BYTES = 1 if case.chunked else 256 * 2**20
        out = _triton.forward(*tensors, *args)
        grads = _triton.backward(c["grad_output"], *tensors, *args)
        results[name] = {**c, "out": out, "grads": list(grads)}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
