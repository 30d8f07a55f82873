"""torch.compile(fullgraph=True) of models with DeformConv2d layers equals eager, fwd and bwd.

Every CPU path: the reference backend (dynamo traces plain torch ops), each fast
backend and ``reference-op`` (dynamo sees the ``deformconv::deform_conv2d`` custom
op). ``aot_eager`` runs dynamo and AOTAutograd (graph capture, fake kernels, the
registered autograd formula) without Inductor's C++ build; one test runs Inductor.
"""

from __future__ import annotations

import pytest
import torch

from _ecosystem import OP_PATH, PATHS, SpyKernels, TinyNet, grads, on_path

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _eager_and_compiled(modulated: bool, path: str, backend: str):
    torch._dynamo.reset()
    model = TinyNet(modulated)
    x = torch.randn(2, 3, 9, 7)
    with on_path(path):
        x_e = x.clone().requires_grad_()
        y_e = model(x_e)
        y_e.square().sum().backward()
        eager = grads(model, x_e)
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True, backend=backend)  # a graph break raises
        x_c = x.clone().requires_grad_()
        y_c = compiled(x_c)
        y_c.square().sum().backward()
    return (y_e, eager), (y_c, grads(model, x_c))


@pytest.mark.parametrize("modulated", [False, True], ids=["v1", "modulated"])
@pytest.mark.parametrize("path", PATHS)
def test_compile_fullgraph_matches_eager(path, modulated):
    SpyKernels.calls.clear()
    (y_e, g_e), (y_c, g_c) = _eager_and_compiled(modulated, path, "aot_eager")
    torch.testing.assert_close(y_c, y_e, **TOL)
    assert g_c.keys() == g_e.keys() and "input" in g_c and "deform1.conv_offset.weight" in g_c
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], **TOL, msg=name)
    if path == OP_PATH:  # the compiled graph really called the custom op, fwd and bwd
        assert len(SpyKernels.calls) == 2 * 4


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    # The custom op as ``auto`` runs it (a fast backend, else the reference behind the op):
    # Inductor compiles the graph around it; the reference's decomposed graph takes 2x longer.
    path = PATHS[0] if PATHS[0] != "reference" else OP_PATH
    (y_e, g_e), (y_c, g_c) = _eager_and_compiled(True, path, "inductor")
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_recompiles_when_backend_changes():
    torch._dynamo.reset()
    model = TinyNet(False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 6, 6)
    SpyKernels.calls.clear()
    with on_path("reference"):
        compiled(x)
    assert SpyKernels.calls == []
    with on_path(OP_PATH):
        compiled(x)
    assert SpyKernels.calls == [True, True]


def test_backend_resolution_carries_dynamos_constant_mark():
    # deformconv marks its resolver without importing torch._dynamo; the mark must be
    # the one torch.compiler.assume_constant_result sets
    from deformconv.ops import _backend

    def probe() -> str:
        return "x"

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert getattr(_backend.resolve_traced, "_dynamo_marked_constant", False) is True


def test_import_does_not_load_dynamo():
    import subprocess
    import sys

    code = "import sys, deformconv; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


EAGER_CALLS = """
import sys, torch, deformconv
x = torch.randn(1, 4, 6, 6, requires_grad=True)
w = torch.randn(4, 4, 3, 3, requires_grad=True)
off = torch.randn(1, 18, 6, 6, requires_grad=True)
for backend in deformconv.available_backends("cpu"):
    with deformconv.use_backend(backend):
        deformconv.deform_conv2d(x, off, w, padding=1).sum().backward()
        deformconv.dcnv3(torch.randn(1, 5, 5, 8), torch.randn(1, 5, 5, 18),
                         torch.rand(1, 5, 5, 9)).sum()
        boxes = torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0]])
        deformconv.deform_roi_pool(x, boxes, None, output_size=2).sum().backward()
print('torch._dynamo' in sys.modules)
"""


def test_eager_calls_do_not_load_dynamo():
    """Eager use of every op (forward and backward) costs no Dynamo import (seconds)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", EAGER_CALLS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
