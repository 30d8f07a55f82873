"""Runs the Triton kernels on CPU tensors under Triton's interpreter and saves the results.

``python tests/_triton_interpret.py OUT.pt`` (spawned by ``test_triton_kernels.py`` in a
fresh process, because ``TRITON_INTERPRET=1`` must be set before Triton is first
imported) runs every case of ``CASES`` through ``deformconv.kernels._triton.forward`` and
``backward`` and saves, per case, the inputs, the output, the gradients and the chunks
the kernels were run on, and the output of the implicit-GEMM forward
(``_triton_implicit.forward``); then the gradients of one case for each ``needs_grad`` of
``NEEDS_GRAD``. The parent test compares them with the reference kernel and the naive loop
oracle; nothing here judges the results.
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
    # Output pixels per chunk: WORKSPACE_BYTES is set so that a chunk holds this many
    # (0: the default bound, one chunk here).
    chunk_pixels: int = 0


_MOD = Config(mask=True)
_PLAIN = (
    "basic no_bias modulated stride_2_1 padding_0 dilation_2_1 kernel_2x3 kernel_5x1 groups_2 "
    "offset_groups_2 straddle_og3_g2 depthwise odd_batch batch_1_tall everything"
).split()
CASES: dict[str, Case] = {
    **{name: Case(CONFIGS[name]) for name in _PLAIN},
    "batch_0": Case(Config(batch=0, mask=True)),
    # Two whole images (of 45 pixels), then one.
    "chunked_odd_batch": Case(Config(batch=3, size=(5, 9), mask=True), chunk_pixels=90),
    # Ranges of the pixels of one image (few programs: the interpreter is slow), here 12
    # pixels as 7 + 5, across output rows.
    "split_image_modulated": Case(
        Config(
            in_channels=2,
            out_channels=4,
            size=(4, 5),
            kernel=(2, 2),
            padding=(0, 0),
            groups=2,
            offset_groups=2,
            mask=True,
        ),
        chunk_pixels=7,
    ),
    # 10 pixels as 4 + 4 + 2; offset groups straddle the weight groups.
    "split_image_plain": Case(
        Config(
            batch=1,
            in_channels=6,
            out_channels=4,
            size=(4, 5),
            kernel=(1, 3),
            stride=(2, 1),
            padding=(0, 1),
            groups=2,
            offset_groups=3,
        ),
        chunk_pixels=4,
    ),
    "integer_positions": Case(_MOD, offsets="integer"),
    "border_positions": Case(_MOD, offsets="borders"),
    "off_the_map": Case(_MOD, offsets="off_map"),
    "nan_inf_offsets": Case(_MOD, offsets="nonfinite"),
    "float32_everything": Case(CONFIGS["everything"], dtype=torch.float32),
    "float32_borders": Case(_MOD, dtype=torch.float32, offsets="borders"),
    "float16_modulated": Case(_MOD, dtype=torch.float16),
    "bfloat16_modulated": Case(_MOD, dtype=torch.bfloat16),
}
# The backward of NEEDS_GRAD_CASE with only some gradients asked for.
NEEDS_GRAD_CASE = "split_image_modulated"  # run under the default bound
NEEDS_GRAD = [
    (True, False, False, False, False),
    (False, True, False, False, False),
    (False, False, True, False, False),
    (False, False, False, True, True),
    (False, False, False, False, False),
]


def needs_grad_key(needs_grad: tuple[bool, ...]) -> str:
    return "".join("TF"[not n] for n in needs_grad)


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
    from deformconv.kernels import _triton, _triton_implicit

    plans: list[list[tuple[int, int, int, int]]] = []
    chunks = _triton._Geometry.chunks

    def recorded(self, element_size, buffers):  # type: ignore[no-untyped-def]
        plans.append(chunks(self, element_size, buffers))
        return plans[-1]

    _triton._Geometry.chunks = recorded
    default_bound = _triton.WORKSPACE_BYTES
    results: dict[str, object] = {}
    for name, case in CASES.items():
        c = make_case(name)
        args = (c["stride"], c["padding"], c["dilation"])
        tensors = [c[k] for k in ("input", "offset", "mask", "weight", "bias")]
        x, weight = c["input"], c["weight"]
        # Column bytes of one pixel: C_in·K_h·K_w values per buffer.
        per_pixel = x.shape[1] * weight.shape[2] * weight.shape[3] * x.element_size()
        plans.clear()
        _triton.WORKSPACE_BYTES = case.chunk_pixels * per_pixel or default_bound
        out = _triton.forward(*tensors, *args)
        _triton.WORKSPACE_BYTES = 2 * case.chunk_pixels * per_pixel or default_bound  # 2 buffers
        grads = _triton.backward(c["grad_output"], *tensors, *args)
        implicit_out = _triton_implicit.forward(*tensors, *args)
        results[name] = {**c, "out": out, "grads": list(grads), "chunks": list(plans),
                         "implicit_out": implicit_out}  # fmt: skip
    _triton.WORKSPACE_BYTES = default_bound
    c = make_case(NEEDS_GRAD_CASE)
    args = (c["stride"], c["padding"], c["dilation"])
    tensors = [c[k] for k in ("input", "offset", "mask", "weight", "bias")]
    results["needs_grad"] = {
        needs_grad_key(needs): list(
            _triton.backward(c["grad_output"], *tensors, *args, needs_grad=needs)
        )
        for needs in NEEDS_GRAD
    }
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
