"""gradcheck / gradgradcheck in float64 for every differentiable argument."""

from __future__ import annotations

import pytest
import torch

import deformconv
from _cases import CONFIGS, Config, call_kwargs, make_problem
from deformconv import deform_conv2d

SMALL = {
    "modulated": Config(batch=2, in_channels=2, out_channels=2, size=(5, 4), mask=True),
    "groups_stride": Config(
        batch=1,
        in_channels=4,
        out_channels=2,
        size=(6, 5),
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 1),
        dilation=(1, 2),
        groups=2,
        offset_groups=2,
    ),  # fmt: skip
    "no_bias": Config(batch=1, in_channels=2, out_channels=3, size=(4, 4), bias=False, mask=True),
}


def _inputs(cfg: Config):
    x, offset, weight, bias, mask = make_problem(cfg, offset_scale=1.0)
    # Keep sample positions away from integer coordinates, where bilinear interpolation has a
    # kink and finite differences disagree with the (one-sided) analytic derivative.
    offset = offset.round() + 0.3 + 0.4 * torch.rand_like(offset)
    tensors = [x, offset, weight, bias, mask]
    return [t.requires_grad_(True) if t is not None else None for t in tensors]


@pytest.mark.parametrize("name", list(SMALL))
def test_gradcheck(backend, name):
    cfg = SMALL[name]
    x, offset, weight, bias, mask = _inputs(cfg)

    def fn(x, offset, weight, bias, mask):
        with deformconv.use_backend(backend):
            return deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))

    assert torch.autograd.gradcheck(fn, (x, offset, weight, bias, mask), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["modulated", "groups_stride"])
def test_gradgradcheck_reference(name):
    cfg = SMALL[name]
    x, offset, weight, bias, mask = _inputs(cfg)

    def fn(x, offset, weight, bias, mask):
        with deformconv.use_backend("reference"):
            return deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))

    assert torch.autograd.gradgradcheck(fn, (x, offset, weight, bias, mask), eps=1e-6, atol=1e-5)


def test_offset_gradient_is_zero_for_non_finite_offsets(backend):
    cfg = CONFIGS["modulated"]
    x, offset, weight, bias, mask = make_problem(cfg)
    offset[:, :4] = float("nan")
    offset[:, 4:6] = float("inf")
    offset.requires_grad_(True)
    x.requires_grad_(True)
    with deformconv.use_backend(backend):
        out = deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(offset.grad).all()
    torch.testing.assert_close(offset.grad[:, :6], torch.zeros_like(offset.grad[:, :6]))


@pytest.mark.parametrize("frozen", ["offset_weight", "weight_only"])
def test_gradient_of_one_argument_covers_every_channel(backend, frozen):
    """Only some arguments need a gradient, on layers wider than a kernel's channel block.

    Kernels skip the gradients nobody asked for; the input gradient must still cover every
    channel (128 per offset group here, more than one block of the fast kernels).
    """
    if backend == "reference":
        pytest.skip("the reference backend is this test's oracle")
    cfg = Config(batch=1, in_channels=128, out_channels=8, size=(6, 6), mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64, offset_scale=1.0)
    frozen_names = {"offset_weight": ("offset", "weight", "mask"), "weight_only": ("weight",)}
    tensors = {"input": x, "offset": offset, "weight": weight, "mask": mask}
    leaves = {k: t.requires_grad_(k not in frozen_names[frozen]) for k, t in tensors.items()}
    wanted = [t for t in leaves.values() if t.requires_grad]
    grad_out = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with deformconv.use_backend(backend):
        out = deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], bias,
                            padding=1, mask=leaves["mask"])  # fmt: skip
    got = torch.autograd.grad(out, wanted, grad_out)
    with deformconv.use_backend("reference"):
        out = deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], bias,
                            padding=1, mask=leaves["mask"])  # fmt: skip
        expected = torch.autograd.grad(out, wanted, grad_out)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
