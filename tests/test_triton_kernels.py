"""Triton kernels: run on CPU under Triton's interpreter (CI), on CUDA where there is one.

The interpreter must be switched on before Triton is first imported, and other tests in
this process may have imported it already, so the kernels run in a fresh subprocess
(``_triton_interpret.py``) that saves inputs, outputs and gradients; the comparisons with
the reference kernel (its autograd gradients) and the naive loop oracle happen here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deformconv
from _references import naive_deform_conv2d
from _triton_interpret import CASES, NEEDS_GRAD, NEEDS_GRAD_CASE, needs_grad_key
from deformconv.kernels import reference

pytest.importorskip("triton")

HERE = Path(__file__).parent
# Tolerances relative to the largest magnitude of the expected tensor.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
NAMES = ("input", "offset", "mask", "weight", "bias")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_triton_interpret.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def _reference(c: dict, dtype: torch.dtype):
    """Reference output and autograd gradients, computed in ``dtype`` from the same inputs."""
    leaves = [None if c[k] is None else c[k].detach().to(dtype).requires_grad_() for k in NAMES]
    out = reference.deform_conv2d(*leaves, c["stride"], c["padding"], c["dilation"])
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, used, c["grad_output"].to(dtype)))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=rtol,
        atol=rtol * scale,
        msg=lambda m: f"{what}: {m}",
    )


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(interpreted, name):
    c = interpreted[name]
    dtype = CASES[name].dtype
    # Half inputs: the reference computes in float32 (the contract); compare with that.
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    expected_out, expected_grads = _reference(c, ref_dtype)
    assert c["out"].dtype == dtype
    _close(c["out"], expected_out, RTOL[dtype], "output")
    for key, got, want in zip(NAMES, c["grads"], expected_grads, strict=True):
        if want is None:
            assert got is None, key
            continue
        assert got.dtype == dtype, key
        _close(got, want, RTOL[dtype], f"grad_{key}")


@pytest.mark.parametrize("name", list(CASES))
def test_implicit_gemm_forward_matches_reference(interpreted, name):
    c = interpreted[name]
    dtype = CASES[name].dtype
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    expected_out, _ = _reference(c, ref_dtype)
    assert c["implicit_out"].dtype == dtype
    _close(c["implicit_out"], expected_out, RTOL[dtype], "implicit-GEMM output")


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case.chunk_pixels])
def test_chunks_cover_every_pixel_once(interpreted, name):
    # The forward's and the backward's chunks, under a workspace bound of chunk_pixels
    # pixels: each (image, pixel) once, no chunk above the bound, an image split when it
    # does not fit (the gradients of these cases are checked by test_matches_reference).
    c, pixels = interpreted[name], CASES[name].chunk_pixels
    n, length = c["out"].shape[0], c["out"].shape[2] * c["out"].shape[3]
    assert len(c["chunks"]) == 2  # forward, backward
    for plan in c["chunks"]:
        assert len(plan) > 1
        seen = torch.zeros(n, length, dtype=torch.int64)
        for b0, b1, l0, l1 in plan:
            assert 0 < (b1 - b0) * (l1 - l0) <= pixels
            seen[b0:b1, l0:l1] += 1
        assert (seen == 1).all()
        assert any(l1 - l0 < length for _, _, l0, l1 in plan) == (pixels < length)


@pytest.mark.parametrize("needs_grad", NEEDS_GRAD, ids=needs_grad_key)
def test_needs_grad_computes_only_what_is_needed(interpreted, needs_grad):
    # Asked-for gradients equal the reference's; the others are None (the contract lets
    # a kernel return None for a gradient that is not needed).
    c = interpreted[NEEDS_GRAD_CASE]
    grads = interpreted["needs_grad"][needs_grad_key(needs_grad)]
    _, expected = _reference(c, torch.float64)
    for key, need, got, want in zip(NAMES, needs_grad, grads, expected, strict=True):
        if need:
            assert got is not None and got.dtype == want.dtype, key
            _close(got, want, RTOL[torch.float64], f"grad_{key}")
        else:
            assert got is None, f"grad_{key} was computed although not needed"


@pytest.mark.parametrize(
    "name", ["everything", "straddle_og3_g2", "border_positions", "nan_inf_offsets"]
)
def test_forward_matches_naive_loops(interpreted, name):
    c = interpreted[name]
    expected = naive_deform_conv2d(
        c["input"], c["offset"], c["weight"], c["bias"], c["stride"], c["padding"],
        c["dilation"], mask=c["mask"],
    )  # fmt: skip
    _close(c["out"], expected, 1e-10, "output")


def test_nonfinite_offsets_have_zero_gradient(interpreted):
    c = interpreted["nan_inf_offsets"]
    bad = ~torch.isfinite(c["offset"])
    assert bad.any()
    assert torch.isfinite(c["out"]).all()
    assert all(torch.isfinite(g).all() for g in c["grads"] if g is not None)
    # Δy and Δx of a sample share the fate of the position: a non-finite pair reads 0.
    pair_bad = bad.reshape(*bad.shape[:1], -1, 2, *bad.shape[2:]).any(2, keepdim=True)
    grad_offset = c["grads"][1].reshape(pair_bad.shape[0], -1, 2, *bad.shape[2:])
    assert (grad_offset * pair_bad == 0).all()
    assert (grad_offset[~pair_bad.expand_as(grad_offset)] != 0).any()


def test_registered_for_cuda_only():
    from deformconv.ops import _backend

    (entry,) = [b for b in _backend._FAST if b.name == "triton"]
    assert entry.device_types == ("cuda",)
    assert "triton" not in deformconv.available_backends("cpu")
    if not torch.cuda.is_available():
        assert "triton" not in deformconv.available_backends("cuda")


CUDA_CASES = ["basic", "modulated", "everything", "offset_groups_4_groups_2", "odd_batch"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_op_matches_reference(name, dtype):
    from _cases import CONFIGS, call_kwargs, make_problem

    cfg = CONFIGS[name]
    tensors = [
        None if t is None else t.cuda().to(dtype)
        for t in make_problem(cfg, torch.float32, offset_scale=2.0)
    ]

    def run(backend):
        leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
        x, offset, weight, bias, mask = leaves
        with deformconv.use_backend(backend):
            out = deformconv.deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
        out.backward(torch.ones_like(out))
        return [out.detach(), *(None if t is None else t.grad for t in leaves)]

    assert deformconv.available_backends("cuda")[0] == "triton"
    for got, want in zip(run("triton"), run("reference"), strict=True):
        if want is None:
            assert got is None
            continue
        _close(got.float(), want.float(), RTOL[dtype], name)
