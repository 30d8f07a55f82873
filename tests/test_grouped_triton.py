"""The direct Triton kernels (narrow groups) under Triton's interpreter, on CPU tensors.

The interpreter must be switched on before Triton is first imported, so the kernels run
in a fresh subprocess (``_triton_direct_interpret.py``) that saves inputs, outputs and
gradients; they are compared here with the reference kernel's output and autograd
gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _triton_direct_interpret import CASES, NEEDS_GRAD_CASE
from _triton_interpret import NEEDS_GRAD, needs_grad_key
from deformconv.kernels import reference

pytest.importorskip("triton")

HERE = Path(__file__).parent
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
NAMES = ("input", "offset", "mask", "weight", "bias")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_direct") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_triton_direct_interpret.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_direct_triton_matches_reference(interpreted, name):
    c = interpreted[name]
    dtype = c["input"].dtype
    leaves = [None if c[k] is None else c[k].detach().clone().requires_grad_() for k in NAMES]
    expected = reference.deform_conv2d(*leaves, c["stride"], c["padding"], c["dilation"])
    torch.testing.assert_close(c["out"], expected.detach(), **TOL[dtype])
    used = [t for t in leaves if t is not None]
    if expected.numel() == 0:
        assert all(g is None or not g.any() for g in c["grads"])
        return
    ref_grads = iter(torch.autograd.grad(expected, used, c["grad_output"]))
    for what, leaf, g in zip(NAMES, leaves, c["grads"], strict=True):
        assert (leaf is None) == (g is None), what
        if leaf is not None:
            torch.testing.assert_close(g, next(ref_grads), **TOL[dtype], msg=what)


@pytest.mark.parametrize("needs_grad", NEEDS_GRAD, ids=needs_grad_key)
def test_direct_triton_computes_only_the_gradients_asked_for(interpreted, needs_grad):
    c = interpreted[NEEDS_GRAD_CASE]
    leaves = [c[k].detach().clone().requires_grad_() for k in NAMES]
    expected = reference.deform_conv2d(*leaves, c["stride"], c["padding"], c["dilation"])
    wanted = torch.autograd.grad(expected, leaves, c["grad_output"])
    got = interpreted["needs_grad"][needs_grad_key(needs_grad)]
    for what, need, g, want in zip(NAMES, needs_grad, got, wanted, strict=True):
        if need:
            assert g is not None, what
            torch.testing.assert_close(g, want, **TOL[want.dtype], msg=what)
        else:
            assert g is None, f"grad_{what} was computed although not needed"
