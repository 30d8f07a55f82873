"""DCNv3/DCNv4 Triton kernels: on CPU under Triton's interpreter (CI), on CUDA where there is one.

The kernels run in a fresh subprocess (``_dcnv_triton_interpret.py``: the interpreter must
be switched on before Triton is first imported) that saves inputs, outputs and gradients;
they are compared here with the naive loop oracle and the reference kernel's gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deformconv
from _dcnv_oracle import naive_dcnv3
from _dcnv_triton_interpret import CASES, FLOAT32_CASES
from deformconv.kernels import dcnv_reference

pytest.importorskip("triton")

HERE = Path(__file__).parent
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
KEYS = ("kernel_size", "stride", "padding", "dilation", "group", "offset_scale", "remove_center")
RESULTS = [f"{name}-float64" for name in CASES] + [f"{name}-float32" for name in FLOAT32_CASES]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcnv_triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_dcnv_triton_interpret.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("name", RESULTS)
def test_forward_matches_naive_loops(interpreted, name):
    c = interpreted[name]
    dtype = c["input"].dtype
    expected = naive_dcnv3(c["input"], c["offset"], c["mask"], *(c[k] for k in KEYS))
    assert c["out"].dtype == dtype and c["out"].shape == expected.shape
    torch.testing.assert_close(c["out"].double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("name", RESULTS)
def test_backward_matches_reference(interpreted, name):
    c = interpreted[name]
    dtype = c["input"].dtype
    expected = dcnv_reference.backward(
        *(c[k].double() for k in ("grad_output", "input", "offset", "mask")),
        *(c[k] for k in KEYS),
    )  # fmt: skip
    for got, want in zip(c["grads"], expected, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_nonfinite_offsets_have_zero_gradient(interpreted):
    c = interpreted["nonfinite_offsets-float64"]
    bad = ~torch.isfinite(c["offset"]) | (c["offset"].abs() > 1e20)
    pair_bad = bad.reshape(*bad.shape[:3], -1, 2).any(-1)
    assert pair_bad.any() and (~pair_bad).any()
    _, grad_offset, grad_mask = c["grads"]
    assert torch.isfinite(c["out"]).all() and all(torch.isfinite(g).all() for g in c["grads"])
    assert (grad_offset.reshape(*pair_bad.shape, 2)[pair_bad] == 0).all()
    assert (grad_mask[pair_bad] == 0).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_dcnv3_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 7, 32, generator=g)
    offset = 2 * torch.randn(2, 9, 7, 4 * 8 * 2, generator=g)
    mask = torch.rand(2, 9, 7, 4 * 8, generator=g)
    kwargs = {"group": 4, "remove_center": True, "offset_scale": 1.5}

    def run(backend, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in (x, offset, mask)]
        with deformconv.use_backend(backend):
            out = deformconv.dcnv3(*leaves, **kwargs)
        out.float().square().sum().backward()
        return [t.float().cpu() for t in (out, *(leaf.grad for leaf in leaves))]

    assert deformconv.available_backends("cuda")[0] == "triton"
    tol = {torch.float32: 1e-4, torch.float16: 2e-2}[dtype]
    for got, want in zip(run("triton", "cuda"), run("reference", "cpu"), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max()))
