"""Every documented bad input raises its error before any computation."""

from __future__ import annotations

import re

import pytest
import torch

from deformconv import deform_conv2d
from deformconv.ops._errors import ArgumentError, ArgumentTypeError

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
     "the shape of the offset tensor at dimension 1 is not valid: offset must have 2*G*K_h*K_w "
     "channels for some G dividing C_in=4 (K_h*K_w=9); got 17"),
    ({"offset": torch.zeros(2, 54, 6, 6)}, ValueError,
     "the shape of the offset tensor at dimension 1 is not valid: offset must have 2*G*K_h*K_w "
     "channels for some G dividing C_in=4 (K_h*K_w=9); got 54"),
    ({"offset": torch.zeros(2, 18, 5, 6)}, ValueError,
     "offset must have the output's spatial size (H_out, W_out)=(6, 6); got (5, 6)"),
    ({"offset": torch.zeros(3, 18, 6, 6)}, ValueError,
     "offset must have the input's batch size N=2; got 3"),
    ({"mask": torch.ones(2, 18, 6, 6)}, ValueError,
     "mask.shape[1] is not valid: mask must have G*K_h*K_w=1*9=9 channels (G=1 from offset); "
     "got 18"),
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


# torchvision raises RuntimeError for every mistake in a tensor's values, sizes or dtype
# kind; only a non-tensor argument or a malformed stride/padding/dilation is a TypeError.
PLAIN_TYPE_ERRORS = {"input must be a torch.Tensor", "stride must be an int or a tuple",
                     "padding must be an int or a tuple", "dilation must be an int or a tuple"}  # fmt: skip


@pytest.mark.parametrize(("overrides", "error", "message"), CASES, ids=[c[2][:50] for c in CASES])
def test_bad_input_is_also_a_runtime_error(overrides, error, message):
    if any(message.startswith(m) for m in PLAIN_TYPE_ERRORS):
        with pytest.raises(TypeError) as info:
            call(**overrides)
        assert not isinstance(info.value, RuntimeError)
    else:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call(**overrides)


def test_error_classes():
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, RuntimeError)
    assert issubclass(ArgumentTypeError, TypeError)
    assert issubclass(ArgumentTypeError, RuntimeError)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # A wrongly sized offset or mask in another dtype: the size is reported, as torchvision.
        ({"input": X.double(), "offset": torch.zeros(2, 4, 6, 6, dtype=torch.float64)},
         "the shape of the offset tensor at dimension 1 is not valid"),
        ({"mask": torch.ones(2, 4, 6, 6, dtype=torch.float64)}, "mask.shape[1] is not valid"),
        ({"offset": torch.zeros(3, 18, 6, 6, dtype=torch.float64)}, "offset must have the input's batch size"),
        ({"bias": torch.zeros(5, dtype=torch.float64)}, "bias must have shape (C_out,)=(6,); got (5,)"),
    ],
)  # fmt: skip
def test_sizes_are_checked_before_dtypes(overrides, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
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
