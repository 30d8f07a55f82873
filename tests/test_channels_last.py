"""channels_last inputs: accepted on every path, output in the input's memory format."""

from __future__ import annotations

import pytest
import torch

import deformconv
from _cases import Config, make_problem
from _ecosystem import OP_PATH, PATHS, SpyKernels, TinyNet, grads, on_path

CL = torch.channels_last
CFG = Config(batch=2, in_channels=4, out_channels=6, size=(7, 6), mask=True, offset_groups=2)


def _run(tensors, path):
    x, offset, weight, bias, mask = tensors
    with on_path(path):
        out = deformconv.deform_conv2d(x, offset, weight, bias, padding=CFG.padding, mask=mask)
        out.square().sum().backward()
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_matches_contiguous(path):
    base = make_problem(CFG, dtype=torch.float32, offset_scale=1.0)
    plain = [t.clone().requires_grad_(True) for t in base]
    last = [
        (t.clone().contiguous(memory_format=CL) if t.dim() == 4 else t.clone()).requires_grad_(True)
        for t in base
    ]
    assert not last[0].is_contiguous()
    SpyKernels.calls.clear()
    out_p, grads_p = _run(plain, path)
    out_l, grads_l = _run(last, path)
    assert out_l.is_contiguous(memory_format=CL) and not out_l.is_contiguous()
    assert out_p.is_contiguous()
    torch.testing.assert_close(out_l, out_p)
    for g_l, g_p in zip(grads_l, grads_p, strict=True):
        torch.testing.assert_close(g_l, g_p)
    if path == OP_PATH:  # fast kernels always receive contiguous tensors (one copy, in ops)
        assert SpyKernels.calls == [True] * 4


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_model(path):
    torch.manual_seed(0)
    model = TinyNet(modulated=True)
    x = torch.randn(2, 3, 9, 7)
    with on_path(path):
        expected = model(x)
        expected.sum().backward()
        expected_grads = grads(model)
        model.zero_grad()
        model = model.to(memory_format=CL)
        out = model(x.contiguous(memory_format=CL))
        out.sum().backward()
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():  # nn.Conv2d sums in another order in channels_last
        atol = 1e-5 * expected_grads[name].abs().max().item()
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-5, atol=atol, msg=name)


# Shapes that take each formulation of the numba backend: one weight group through
# oneDNN's matrix product (over 2**21 multiply-adds per chunk) and through torch.mm,
# several groups on the column path (80 channels a group), the direct kernels (8 a
# group) and depthwise; stride 2 and a mask on the way.
NUMBA_LAYOUTS = {
    "onednn": Config(batch=2, in_channels=64, out_channels=64, size=(20, 20)),
    "mm": Config(batch=1, in_channels=8, out_channels=12, size=(9, 7), mask=True),
    "column_groups": Config(batch=2, in_channels=160, out_channels=32, size=(6, 5), groups=2),
    "direct": Config(batch=2, in_channels=32, out_channels=16, size=(8, 8), groups=4),
    "depthwise": Config(batch=2, in_channels=16, out_channels=16, size=(9, 8), groups=16),
    "stride2": Config(
        batch=2, in_channels=24, out_channels=16, size=(11, 9), stride=(2, 2), mask=True,
        offset_groups=2,
    ),
}  # fmt: skip


@pytest.mark.skipif("numba" not in PATHS, reason="needs the numba backend")
@pytest.mark.parametrize("input_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("name", list(NUMBA_LAYOUTS))
def test_numba_reads_and_writes_channels_last(name, input_layout):
    # The numba kernels take a channels_last input, weight and grad_output as they are
    # (a model converted with .to(memory_format=torch.channels_last)) and give the
    # output, grad_input and grad_weight back channels_last; also a channels_last weight
    # with an NCHW input. The values must be the reference's on the same tensors laid
    # out NCHW.
    cfg = NUMBA_LAYOUTS[name]
    g = torch.Generator().manual_seed(3)
    base = make_problem(cfg, dtype=torch.float32, offset_scale=1.0, generator=g)
    kwargs = {"stride": cfg.stride, "padding": cfg.padding, "mask": base[4]}
    x_format = CL if input_layout == "channels_last" else torch.contiguous_format
    x_cl = base[0].contiguous(memory_format=x_format).requires_grad_(True)
    w_cl = base[2].contiguous(memory_format=CL).requires_grad_(True)
    offset, bias = (t.clone().requires_grad_(True) for t in (base[1], base[3]))
    with deformconv.use_backend("numba"):
        out = deformconv.deform_conv2d(x_cl, offset, w_cl, bias, **kwargs)
        grad = torch.randn(out.shape, generator=g).contiguous(memory_format=x_format)
        out.backward(grad)
    assert out.is_contiguous(memory_format=x_format)
    assert out.is_contiguous() == (input_layout == "contiguous")
    assert x_cl.grad is not None and x_cl.grad.is_contiguous(memory_format=x_format)
    assert w_cl.grad is not None and w_cl.grad.is_contiguous(memory_format=CL)

    ref = [t.detach().double().requires_grad_(True) for t in (base[0], offset, base[2], bias)]
    ref_kwargs = {**kwargs, "mask": None if base[4] is None else base[4].double()}
    with deformconv.use_backend("reference"):
        expected = deformconv.deform_conv2d(*ref, **ref_kwargs)
        expected.backward(grad.double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)
    for got, want in zip((x_cl, offset, w_cl, bias), ref, strict=True):
        assert got.grad is not None and want.grad is not None
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-4 * scale)
