"""Deformable RoI pooling in the ecosystem: autocast like roi_align, torch.compile
(fullgraph), torch.export, and opcheck of the ``deformconv::deform_roi_pool`` ops.

Tests taking ``backend`` run once per CPU backend (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import deformconv
from _references import naive_deform_roi_pool
from deformconv import DeformRoIPool2d, deform_ps_roi_pool, deform_roi_pool
from deformconv.ops._roi_library import deform_roi_pool_backward_op, deform_roi_pool_op

ROIS = torch.tensor(
    [[0, 1.3, 2.2, 20.1, 17.7], [1, -3.1, 4.3, 12.9, 30.2], [1, 8.7, 0.6, 9.9, 2.3]]
)
# One rounding to the low-precision output, nothing more (computed in float32).
ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _problem(dtype=torch.float32, c=4, ps=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c * (4 if ps else 1), 9, 10, generator=g).to(dtype)
    offset = (0.3 * torch.randn(3, 2, 2, 2, generator=g)).to(dtype)
    mask = torch.rand(3, 1, 2, 2, generator=g).to(dtype)
    return x, ROIS.to(dtype), offset, mask


# --- autocast ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_accepts_low_precision_features_with_float32_boxes(backend, dtype):
    x, rois, offset, mask = _problem()
    x_low = x.to(dtype).requires_grad_()
    offset_low = offset.to(dtype)  # what an offset head returns under autocast
    with deformconv.use_backend(backend), torch.autocast("cpu", dtype=dtype):
        out = deform_roi_pool(x_low, rois, offset_low, 2, 0.5, mask=mask)
    assert out.dtype == dtype  # the input's dtype, as roi_align under autocast
    exact = naive_deform_roi_pool(x_low.double(), rois, offset_low.double(), (2, 2), 0.5, mask=mask)
    tol = ULP[dtype] * exact.abs().max().item()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=tol)
    out.float().sum().backward()
    assert x_low.grad is not None and x_low.grad.dtype == dtype


def test_autocast_matches_roi_align_dtypes(backend):
    tv = pytest.importorskip("torchvision")
    x, rois, _, _ = _problem()
    for features in (x, x.bfloat16()):
        with deformconv.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            ours = deform_roi_pool(features, rois, None, 2, 0.5)
            theirs = tv.ops.roi_align(features, rois, 2, 0.5, 0, True)
        assert ours.dtype == theirs.dtype == features.dtype
        # Both compute in float32 (summation orders differ), then round to the input's dtype.
        ulp = ULP.get(features.dtype, 2**-22)
        atol = 2 * ulp * theirs.abs().max().item()
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=atol)


def test_mixed_dtypes_outside_autocast_raise(backend):
    x, rois, _, _ = _problem()
    with deformconv.use_backend(backend), pytest.raises(RuntimeError, match="rois must have"):
        deform_roi_pool(x.bfloat16(), rois, None, 2)


def test_module_under_autocast(backend):
    pool = DeformRoIPool2d(2, 0.5, in_channels=4, hidden_features=8, modulated=True)
    x, rois, _, _ = _problem()
    with deformconv.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x.bfloat16(), rois)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4, 2, 2)
    out.float().sum().backward()
    assert pool.offset_fc[0].weight.grad is not None


# --- torch.compile and torch.export --------------------------------------------------------


def _grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), tensors)


@pytest.mark.parametrize("ps", [False, True], ids=["plain", "ps"])
def test_compile_fullgraph_matches_eager(backend, ps):
    torch._dynamo.reset()
    x, rois, offset, mask = (t.requires_grad_(t is not ROIS) for t in _problem(ps=ps))
    rois = rois.detach()
    fn = deform_ps_roi_pool if ps else deform_roi_pool

    def f(x, rois, offset, mask):
        return fn(x, rois, offset, 2, 0.5, mask=mask) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # a graph break raises
    with deformconv.use_backend(backend):
        eager = f(x, rois, offset, mask)
        out = compiled(x, rois, offset, mask)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        for a, b in zip(
            _grads(out, (x, offset, mask)), _grads(eager, (x, offset, mask)), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_module_fullgraph(backend):
    torch._dynamo.reset()
    pool = DeformRoIPool2d(2, 0.5, in_channels=4, hidden_features=8, modulated=True)
    with torch.no_grad():
        pool.offset_fc[4].bias.normal_()
    x, rois, _, _ = _problem()
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    with deformconv.use_backend(backend):
        torch.testing.assert_close(compiled(x, rois), pool(x, rois), rtol=1e-6, atol=1e-6)


def test_export_captures_one_node_per_pooling(backend):
    pool = DeformRoIPool2d(2, 0.5, in_channels=4, hidden_features=8, modulated=True).eval()
    with torch.no_grad():
        pool.offset_fc[4].bias.normal_()
    x, rois, _, _ = _problem()
    with deformconv.use_backend(backend):
        program = torch.export.export(pool, (x, rois))
        expected = pool(x, rois)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("deformconv.deform_roi_pool.default") == 2  # RoIAlign, then deformable
    torch.testing.assert_close(program.module()(x, rois), expected, rtol=1e-6, atol=1e-6)


# --- the custom ops ----------------------------------------------------------------------


def _op_args(backend: str, ps: bool, requires_grad: bool = True):
    x, rois, offset, mask = _problem(ps=ps)
    x, offset, mask = (t.requires_grad_(requires_grad) for t in (x, offset, mask))
    return (x, rois, offset, mask, [2, 2], 0.5, 0, 0.1, True, ps, backend)


@pytest.mark.parametrize("ps", [False, True], ids=["plain", "ps"])
@pytest.mark.parametrize("op_backend", ["reference", "embedding_bag", "auto"])
def test_opcheck_forward(op_backend, ps):
    torch.library.opcheck(deform_roi_pool_op.default, _op_args(op_backend, ps))


@pytest.mark.parametrize("op_backend", ["reference", "embedding_bag"])
def test_opcheck_backward(op_backend):
    args = _op_args(op_backend, False, requires_grad=False)
    grad = torch.randn(3, 4, 2, 2)
    for wanted in ([True, True, True], [False, True, False]):
        torch.library.opcheck(deform_roi_pool_backward_op.default, (grad, *args, wanted))


def test_op_without_offset_and_mask():
    x, rois, _, _ = _problem()
    out = deform_roi_pool_op(x, rois, None, None, [2, 2], 0.5, 0, 0.1, True, False, "auto")
    torch.testing.assert_close(out, naive_deform_roi_pool(x, rois, None, (2, 2), 0.5).float())


def test_backward_computes_only_what_is_needed():
    x, rois, offset, mask = _problem()
    args = (x, rois, offset, mask, [2, 2], 0.5, 0, 0.1, True, False, "embedding_bag")
    grads = deform_roi_pool_backward_op(torch.ones(3, 4, 2, 2), *args, [False, True, False])
    assert [g.numel() for g in grads] == [0, offset.numel(), 0]
