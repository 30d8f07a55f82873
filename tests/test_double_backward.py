"""Double backward through every path: gradgradcheck in float64 (finite differences).

The fast backends run behind the ``deformconv::deform_conv2d`` custom op, whose backward
op has its own autograd formula; ``reference-op`` is the reference kernel behind the op
(what ``torch.export`` runs); ``reference`` is the eager, plain-torch path.
"""

from __future__ import annotations

import pytest
import torch

import deformconv
from _cases import Config, call_kwargs, make_problem
from _ecosystem import OP_PATH, PATHS, on_path
from deformconv import deform_conv2d
from deformconv.kernels import reference
from deformconv.ops._library import _ReferenceKernels

CASES = {
    "modulated": Config(batch=2, in_channels=2, out_channels=2, size=(4, 4), mask=True),
    "groups_stride": Config(
        batch=1,
        in_channels=4,
        out_channels=2,
        size=(5, 4),
        kernel=(2, 3),
        stride=(2, 1),
        dilation=(1, 2),
        groups=2,
        offset_groups=2,
    ),  # fmt: skip
}


def _inputs(cfg: Config) -> list[torch.Tensor | None]:
    x, offset, weight, bias, mask = make_problem(cfg, offset_scale=1.0)
    # Positions away from integers, where bilinear interpolation has a kink.
    offset = offset.round() + 0.3 + 0.4 * torch.rand_like(offset)
    return [None if t is None else t.requires_grad_() for t in (x, offset, weight, bias, mask)]


def _fn(cfg: Config, path: str):
    def fn(x, offset, weight, bias, mask):
        with on_path(path, _ReferenceKernels):
            return deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))

    return fn


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_gradgradcheck(path, name):
    cfg = CASES[name]
    inputs = tuple(_inputs(cfg))
    assert torch.autograd.gradgradcheck(_fn(cfg, path), inputs, eps=1e-6, atol=1e-5)


def test_default_backend_is_twice_differentiable():
    """The default backend (``auto``) with no use_backend: a gradient penalty works."""
    cfg = CASES["modulated"]
    x, offset, weight, bias, mask = _inputs(cfg)
    out = deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    (g_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    g_x.square().sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert offset.grad is not None and offset.grad.abs().sum() > 0


@pytest.mark.parametrize("path", ["reference", OP_PATH])
def test_gradgradcheck_chunked_reference(path, monkeypatch):
    """Under a tiny workspace the reference splits images into pixel ranges: still exact."""
    monkeypatch.setattr(reference, "WORKSPACE_BYTES", 15000)  # two pixel ranges per image
    cfg = Config(batch=1, in_channels=2, out_channels=2, size=(4, 4), mask=True)
    per_pixel = 4 * 2 * 9 * 8 + 9 * (4 * 8 + 12 * 8)  # the planner's float64 bytes per pixel
    assert len(reference._chunks(1, 2, 9, 1, 16, 8)) == 2 and 15000 // per_pixel < 16
    inputs = tuple(_inputs(cfg))
    assert torch.autograd.gradgradcheck(_fn(cfg, path), inputs, eps=1e-6, atol=1e-5)


def test_first_layer_double_backward_with_frozen_input():
    """Input without requires_grad (a network's first layer): second derivatives still flow."""
    cfg = CASES["modulated"]
    x, offset, weight, bias, mask = _inputs(cfg)
    x = x.detach()
    with deformconv.use_backend(deformconv.available_backends("cpu")[0]):
        out = deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    (g_w,) = torch.autograd.grad(out.sin().sum(), weight, create_graph=True)
    (gg_off,) = torch.autograd.grad(g_w.square().sum(), offset)
    with deformconv.use_backend("reference"):
        ref = deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    (r_w,) = torch.autograd.grad(ref.sin().sum(), weight, create_graph=True)
    (rr_off,) = torch.autograd.grad(r_w.square().sum(), offset)
    torch.testing.assert_close(gg_off, rr_off)
