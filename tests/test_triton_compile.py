"""Every Triton kernel compiles to a CUDA binary, on a machine without a GPU.

Triton's interpreter (how CI checks the kernels' results) runs the kernel bodies as NumPy
code and never compiles them, so a kernel can pass every interpreter test and still fail
to compile for a GPU (an unsupported ``tl.dot`` shape, a type mismatch between branches).
Here the launches of each backend's ``forward`` and ``backward`` are recorded instead of
run, and every distinct (kernel, signature, constants) is compiled by ``triton.compile``
for NVIDIA targets down to ``cubin``, which needs ptxas (shipped with Triton) but no device.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from _cases import Config, call_kwargs, make_problem

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

AMPERE, HOPPER = GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)
_POINTER = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
}
# Offset groups straddle the weight groups: exercises the per-lane geometry paths.
_CONFIGS = (
    Config(mask=True),
    Config(in_channels=6, out_channels=4, groups=2, offset_groups=3, mask=True),
)

Launch = tuple[JITFunction, tuple[object, ...], dict[str, object]]


@pytest.fixture
def recorded(monkeypatch) -> list[Launch]:
    """Launches of Triton kernels, recorded instead of run (outputs stay unwritten)."""
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        launches.append((self, args, kwargs))

    monkeypatch.setattr(JITFunction, "run", record)
    return launches


def _source(fn: JITFunction, args: tuple[object, ...], kwargs: dict[str, object]) -> ASTSource:
    """The compile request of one launch: each argument's Triton type, or its constant."""
    values = dict(zip((p.name for p in fn.params), args, strict=False)) | kwargs
    signature: dict[str, str] = {}
    constants: dict[str, object] = {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name} is a {type(value).__name__}")
    return ASTSource(fn, signature, constants)


def _compile_all(launches: list[Launch], target: GPUTarget) -> dict[str, list[str]]:
    """PTX of every distinct launch, by kernel name."""
    ptx: dict[str, list[str]] = {}
    seen = set()
    for fn, args, kwargs in launches:
        src = _source(fn, args, kwargs)
        key = (fn, src.hash())
        if key not in seen:
            seen.add(key)
            compiled = triton.compile(src, target=target)
            assert compiled.asm["cubin"], fn.__name__
            ptx.setdefault(fn.__name__, []).append(compiled.asm["ptx"])
    return ptx


def _conv_launches(call: Callable[..., object], dtype: torch.dtype, backward: bool) -> None:
    for cfg in _CONFIGS:
        gen = torch.Generator().manual_seed(0)
        x, offset, weight, bias, mask = make_problem(cfg, dtype, generator=gen)
        kw = call_kwargs(cfg)
        args = (kw["stride"], kw["padding"], kw["dilation"])
        if backward:
            grad = torch.zeros(cfg.batch, cfg.out_channels, *cfg.out_size, dtype=dtype)
            call(grad, x, offset, mask, weight, bias, *args)
        else:
            call(x, offset, mask, weight, bias, *args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_implicit_gemm_forward_compiles(recorded, dtype):
    from deformconv.kernels import _triton_implicit

    _conv_launches(_triton_implicit.forward, dtype, backward=False)
    assert {fn.__name__ for fn, _, _ in recorded} == {"_forward_kernel"}
    # Tensor-core code differs between Ampere (mma) and Hopper (wgmma): both for float16.
    for target in (AMPERE, HOPPER) if dtype == torch.float16 else (AMPERE,):
        ptx = _compile_all(recorded, target)["_forward_kernel"]
        assert len(ptx) == 2  # shared and per-lane geometry
        if dtype == torch.float16:  # the reduction runs on the tensor cores
            assert all("mma" in code for code in ptx)


def test_column_and_direct_kernels_compile(recorded):
    from deformconv.kernels import _triton, _triton_direct

    for module in (_triton, _triton_direct):
        _conv_launches(module.forward, torch.float32, backward=False)
        _conv_launches(module.backward, torch.float32, backward=True)
    ptx = _compile_all(recorded, AMPERE)
    assert set(ptx) == {"_im2col_kernel", "_col2im_kernel", "_forward_kernel", "_backward_kernel"}


def test_dcnv_kernels_compile(recorded):
    from deformconv.kernels import _dcnv_triton

    gen = torch.Generator().manual_seed(0)
    n, h, w, group, c_g, points = 1, 5, 6, 2, 8, 9
    x = torch.randn(n, h, w, group * c_g, generator=gen)
    offset = torch.randn(n, h, w, group * points * 2, generator=gen)
    mask = torch.rand(n, h, w, group * points, generator=gen)
    geometry = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1)}
    geometry |= {"dilation": (1, 1), "group": group, "offset_scale": 1.0, "remove_center": False}
    _dcnv_triton.forward(x, offset, mask, **geometry)
    _dcnv_triton.backward(torch.zeros_like(x), x, offset, mask, **geometry)
    ptx = _compile_all(recorded, AMPERE)
    assert set(ptx) == {"_forward_kernel", "_backward_kernel"}
