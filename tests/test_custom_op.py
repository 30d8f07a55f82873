"""torch.library.opcheck on deformconv::deform_conv2d and its backward, every CPU backend.

``backend`` is parametrized by conftest.py; ``reference`` runs behind the op as well.
"""

from __future__ import annotations

import pytest
import torch

import deformconv
from _cases import Config, make_problem
from deformconv.ops._library import deform_conv2d_backward_op, deform_conv2d_op

CASES = {
    "v1": Config(batch=2, in_channels=4, out_channels=2, size=(5, 4), stride=(2, 1)),
    "modulated_no_bias": Config(
        batch=1,
        in_channels=4,
        out_channels=2,
        size=(4, 5),
        mask=True,
        bias=False,
        groups=2,
        offset_groups=2,
    ),  # fmt: skip
}


def _args(cfg: Config, backend: str, requires_grad: bool = True):
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32, offset_scale=1.0)
    tensors = [
        None if t is None else t.requires_grad_(requires_grad)
        for t in (x, offset, mask, weight, bias)
    ]
    return (*tensors, list(cfg.stride), list(cfg.padding), list(cfg.dilation), backend)


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_forward(backend, case):
    torch.library.opcheck(deform_conv2d_op.default, _args(CASES[case], backend))


NEEDS = {"all": [True] * 5, "first_layer": [False, True, True, True, True], "weight": [False, False, False, True, True]}  # fmt: skip


@pytest.mark.parametrize("needs", list(NEEDS))
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_backward(backend, case, needs):
    args = _args(CASES[case], backend, requires_grad=False)
    cfg = CASES[case]
    grad_output = torch.randn(cfg.batch, cfg.out_channels, *cfg.out_size)
    torch.library.opcheck(deform_conv2d_backward_op.default, (grad_output, *args, NEEDS[needs]))


def test_opcheck_double_backward(backend):
    """The backward op's own autograd formula (double backward) passes opcheck.

    The formula is the same on every backend (it differentiates the reference), so its
    AOT-dispatch check (about a minute of tracing) runs once, on the reference backend;
    the other backends run the remaining checks.
    """
    cfg = CASES["modulated_no_bias"]
    args = _args(cfg, backend, requires_grad=True)
    grad_output = torch.randn(cfg.batch, cfg.out_channels, *cfg.out_size, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if backend == "reference":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(
        deform_conv2d_backward_op.default, (grad_output, *args, [True] * 5), test_utils=utils
    )


@pytest.mark.parametrize("needs", list(NEEDS))
def test_backward_op_computes_only_needed_gradients(backend, needs):
    cfg = CASES["v1"]
    args = _args(cfg, backend, requires_grad=False)
    grad_output = torch.randn(cfg.batch, cfg.out_channels, *cfg.out_size)
    got = deform_conv2d_backward_op(grad_output, *args, NEEDS[needs])
    full = deform_conv2d_backward_op(grad_output, *args, [True] * 5)
    for g, f, n, t in zip(got, full, NEEDS[needs], args[:5], strict=True):
        if n and t is not None:
            torch.testing.assert_close(g, f)
        else:
            assert g.numel() == 0


def test_op_equals_public_function(backend):
    """The op's output and gradients (via the backward op) equal eager reference autograd."""
    cfg = CASES["modulated_no_bias"]
    args = _args(cfg, backend)
    out = deform_conv2d_op(*args)
    out.square().sum().backward()
    op_grads = [t.grad.clone() for t in args[:5] if t is not None]
    for t in args[:5]:
        if t is not None:
            t.grad = None
    x, offset, mask, weight, bias = args[:5]
    with deformconv.use_backend("reference"):
        ref = deformconv.deform_conv2d(
            x, offset, weight, bias, cfg.stride, cfg.padding, cfg.dilation, mask
        )
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, t in zip(op_grads, [t for t in args[:5] if t is not None], strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-4)
