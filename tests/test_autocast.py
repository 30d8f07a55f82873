"""Mixed precision: autocast returns the autocast dtype, computed in float32; half inputs work."""

from __future__ import annotations

import pytest
import torch

import deformconv
from _cases import Config, make_problem
from _ecosystem import PATHS, TinyNet, on_path
from _references import naive_deform_conv2d

CFG = Config(batch=2, in_channels=4, out_channels=3, size=(6, 5), mask=True, offset_groups=2)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# One rounding to the low-precision output, nothing more (computed in float32).
ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _problem(dtype=torch.float32, device="cpu"):
    x, offset, weight, bias, mask = make_problem(CFG, dtype=torch.float64, offset_scale=1.0)
    exact = naive_deform_conv2d(x, offset, weight, bias, padding=CFG.padding, mask=mask)
    tensors = [t.to(device, dtype) for t in (x, offset, weight, bias, mask)]
    return tensors, exact


def _check_rounded(out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype):
    """``exact`` is computed from the same (rounded) inputs: only the output's rounding remains."""
    assert out.dtype == dtype
    tol = ULP[dtype] * exact.abs().max().item()
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=tol)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_autocast_bfloat16(path):
    (x, offset, weight, bias, mask), exact = _problem()
    offset = offset.bfloat16()  # what an offset conv returns under autocast: mixed dtypes
    x.requires_grad_(True)
    with on_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
        out = deformconv.deform_conv2d(x, offset, weight, bias, padding=CFG.padding, mask=mask)
    exact_bf16_offset = naive_deform_conv2d(
        x.detach().double(), offset.double(), weight.double(), bias.double(), padding=CFG.padding,
        mask=mask.double(),
    )  # fmt: skip
    _check_rounded(out, exact_bf16_offset, torch.bfloat16)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("path", PATHS)
def test_custom_op_autocast_computes_in_float32(path):
    """register_autocast: the op itself casts its floating arguments to float32."""
    (x, offset, weight, bias, mask), exact = _problem(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.deformconv.deform_conv2d(
            x, offset, mask, weight, bias, [1, 1], list(CFG.padding), [1, 1],
            "reference" if path == "reference-op" else path,
        )  # fmt: skip
    assert out.dtype == torch.float32


@pytest.mark.parametrize("path", PATHS)
def test_model_under_cpu_autocast(path):
    model = TinyNet(modulated=True)
    x = torch.randn(2, 3, 9, 7)
    with on_path(path):
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
    assert model.deform1.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_half_inputs_work_on_every_path(path, dtype):
    (x, offset, weight, bias, mask), _ = _problem(dtype)
    exact = naive_deform_conv2d(
        *(t.double() for t in (x, offset, weight, bias)), padding=CFG.padding, mask=mask.double()
    )
    tensors = [t.requires_grad_(True) for t in (x, offset, weight, bias, mask)]
    x, offset, weight, bias, mask = tensors
    with on_path(path):
        out = deformconv.deform_conv2d(x, offset, weight, bias, padding=CFG.padding, mask=mask)
    _check_rounded(out, exact, dtype)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in tensors)
    assert all(torch.isfinite(t.grad).all() for t in tensors)


@CUDA
def test_cuda_autocast_float16():
    (x, offset, weight, bias, mask), exact = _problem(device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = deformconv.deform_conv2d(x, offset, weight, bias, padding=CFG.padding, mask=mask)
    _check_rounded(out, exact, torch.float16)
