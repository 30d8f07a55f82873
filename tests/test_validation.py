"""Every documented bad input raises its error before any computation."""

from __future__ import annotations

import re

import pytest
import torch

from deformconv import deform_conv2d

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)
OFF = torch.zeros(2, 18, 6, 6)
MASK = torch.ones(2, 9, 6, 6)


def call(**overrides):
    kwargs = {"input": X, "offset": OFF, "weight": W, "bias": None, "mask": None}
    kwargs.update(overrides)
    return deform_conv2d(**kwargs)


CASES = [
    # (overrides, exception, message pattern)
    ({"input": X[0]}, ValueError, "input must be 4-D; got 3-D with shape (4, 8, 8)"),
    ({"input": X.numpy()}, TypeError, "input must be a torch.Tensor; got ndarray"),
    ({"input": X.long()}, TypeError, "input must be a floating-point tensor"),
    ({"offset": OFF.int()}, TypeError, "offset must be a floating-point tensor"),
    ({"offset": OFF[0]}, ValueError, "offset must be 4-D; got 3-D"),
    ({"weight": W[0]}, ValueError, "weight must be 4-D; got 3-D"),
    ({"offset": torch.zeros(2, 17, 6, 6)}, ValueError,
     "offset must have 2*G*K_h*K_w channels for some G dividing C_in=4 (K_h*K_w=9); got 17"),
    ({"offset": torch.zeros(2, 54, 6, 6)}, ValueError,
     "offset must have 2*G*K_h*K_w channels for some G dividing C_in=4 (K_h*K_w=9); got 54"),
    ({"offset": torch.zeros(2, 18, 5, 6)}, ValueError,
     "offset must have the output's spatial size (H_out, W_out)=(6, 6); got (5, 6)"),
    ({"offset": torch.zeros(3, 18, 6, 6)}, ValueError,
     "offset must have the input's batch size N=2; got 3"),
    ({"mask": torch.ones(2, 18, 6, 6)}, ValueError,
     "mask must have G*K_h*K_w=1*9=9 channels (G=1 from offset); got 18"),
    ({"mask": torch.ones(2, 9, 6, 7)}, ValueError,
     "mask must have the output's spatial size (H_out, W_out)=(6, 6); got (6, 7)"),
    ({"mask": torch.ones(1, 9, 6, 6)}, ValueError, "mask must have the input's batch size N=2; got 1"),
    ({"mask": MASK.double()}, ValueError, "mask must have the input's dtype torch.float32; got torch.float64"),
    ({"weight": torch.randn(6, 3, 3, 3)}, ValueError,
     "weight.shape[1] (C_in/groups) must divide C_in=4; got 3"),
    ({"weight": torch.randn(5, 2, 3, 3)}, ValueError,
     "groups=C_in/weight.shape[1]=2 must divide C_out=weight.shape[0]; got C_out=5"),
    ({"weight": W.double()}, ValueError, "weight must have the input's dtype torch.float32; got torch.float64"),
    ({"weight": W.half()}, ValueError, "weight must have the input's dtype torch.float32; got torch.float16"),
    ({"bias": torch.zeros(5)}, ValueError, "bias must have shape (C_out,)=(6,); got (5,)"),
    ({"bias": torch.zeros(6, dtype=torch.int64)}, TypeError, "bias must be a floating-point tensor"),
    ({"stride": 0}, ValueError, "stride must be positive; got (0, 0)"),
    ({"stride": (1, -2)}, ValueError, "stride must be positive; got (1, -2)"),
    ({"dilation": (0, 1)}, ValueError, "dilation must be positive; got (0, 1)"),
    ({"padding": -1}, ValueError, "padding must be non-negative; got (-1, -1)"),
    ({"stride": (1, 2, 3)}, TypeError, "stride must be an int or a tuple of two ints; got (1, 2, 3)"),
    ({"padding": 1.5}, TypeError, "padding must be an int or a tuple of two ints; got 1.5"),
    ({"dilation": True}, TypeError, "dilation must be an int or a tuple of two ints; got True"),
    ({"input": torch.randn(2, 4, 2, 2), "offset": torch.zeros(2, 18, 1, 1)}, ValueError,
     "the output would be empty: H_out, W_out = (H_in + 2*padding - dilation*(K-1) - 1) // stride + 1 = (0, 0)"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "error", "message"), CASES, ids=[c[2][:50] for c in CASES])
def test_bad_input_raises(overrides, error, message):
    with pytest.raises(error, match="^deform_conv2d: " + re.escape(message)):
        call(**overrides)


def test_device_mismatch_raises():
    meta_offset = torch.zeros(2, 18, 6, 6, device="meta")
    with pytest.raises(
        ValueError, match=re.escape("offset must be on the input's device cpu; got meta")
    ):
        call(offset=meta_offset)


def test_errors_precede_any_work(monkeypatch):
    # A bad call must fail in validation, never reach a kernel.
    from deformconv.kernels import reference

    def boom(*args, **kwargs):
        raise AssertionError("kernel ran")

    monkeypatch.setattr(reference, "deform_conv2d", boom)
    with pytest.raises(ValueError, match="offset must have 2"):
        call(offset=torch.zeros(2, 17, 6, 6))


def test_good_call_passes():
    out = call(mask=MASK, bias=torch.zeros(6), stride=(1, 1), padding=[0, 0], dilation=1)
    assert out.shape == (2, 6, 6, 6)
