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
