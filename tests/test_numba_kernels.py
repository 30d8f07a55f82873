"""The Numba CPU backend against the pure-PyTorch reference (an independent oracle).

Every comparison runs the public op twice, once per backend: forward and all five
gradients (input, offset, mask, weight, bias) must agree to 1e-5 (float32) or 1e-10
(float64) relative to the largest reference value. The reference itself is checked
against naive loops and torchvision in the core tests.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

import deformconv
from _cases import CONFIGS, Config, call_kwargs, make_problem

pytest.importorskip("numba")
_numba = pytest.importorskip("deformconv.kernels._numba")
_direct = pytest.importorskip("deformconv.kernels._numba_direct")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _run(backend, x, offset, weight, bias, mask, kwargs, grad_output=None):
    """Output and gradients (None where an argument is None) on ``backend``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, offset, mask, weight, bias)]  # fmt: skip
    xi, oi, mi, wi, bi = leaves
    with deformconv.use_backend(backend):
        out = deformconv.deform_conv2d(xi, oi, wi, bi, mask=mi, **kwargs)
    if grad_output is None:
        grad_output = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))  # fmt: skip
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, used, grad_output))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


def _assert_rel_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g}, scale {scale:.3g}"


def _compare(x, offset, weight, bias, mask, kwargs, dtype):
    out, grads = _run("numba", x, offset, weight, bias, mask, kwargs)
    ref_out, ref_grads = _run("reference", x, offset, weight, bias, mask, kwargs)
    _assert_rel_close(out, ref_out, TOL[dtype], "output")
    names = ("input", "offset", "mask", "weight", "bias")
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert (g is None) == (rg is None), name
        if g is not None:
            _assert_rel_close(g, rg, TOL[dtype], f"grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, dtype):
    cfg = CONFIGS[name]
    x, offset, weight, bias, mask = make_problem(cfg, dtype=dtype)
    _compare(x, offset, weight, bias, mask, call_kwargs(cfg), dtype)


EXTRA = {
    "batch_0": Config(batch=0),
    "batch_5_modulated": Config(batch=5, mask=True, size=(6, 9)),
    "wide_channels": Config(in_channels=80, out_channels=3, offset_groups=1, size=(5, 4)),
    "many_channels_groups": Config(
        in_channels=96, out_channels=8, groups=4, offset_groups=3, mask=True
    ),  # fmt: skip
    "kernel_3x1_stride_3": Config(kernel=(3, 1), stride=(3, 2), padding=(1, 0), size=(10, 7)),
    # Batch 1, four times more output channels than pixels per weight group: the forward's
    # GEMM takes the weight in its own layout and reorders the columns instead.
    "deep_batch_1": Config(batch=1, in_channels=5, out_channels=40, size=(3, 3)),
    # (72 channels per group: wider than the direct kernels take)
    "deep_batch_1_groups": Config(
        batch=1, in_channels=144, out_channels=96, groups=2, size=(3, 3), mask=True
    ),  # fmt: skip
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(EXTRA))
def test_matches_reference_extra_shapes(name, dtype):
    # Channel counts above CHANNEL_BLOCK (several col2im blocks), an odd batch of 5, batch 0.
    cfg = EXTRA[name]
    x, offset, weight, bias, mask = make_problem(cfg, dtype=dtype)
    _compare(x, offset, weight, bias, mask, call_kwargs(cfg), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["integer", "half_integer", "borders", "off_map"])
def test_special_positions(kind, dtype):
    # Positions exactly on integers, on the -1 / H borders and beyond them, where the
    # boundary rule and the floor-based one-sided derivative decide the result.
    cfg = Config(batch=2, in_channels=4, out_channels=3, size=(5, 6), mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    if kind == "integer":
        offset = torch.randint(-4, 5, offset.shape, generator=g).to(dtype)
    elif kind == "half_integer":
        offset = torch.randint(-9, 10, offset.shape, generator=g).to(dtype) / 2
    elif kind == "borders":
        # Offsets that land kernel point (0, 0) of every output pixel on -1, H, W or H-1.
        h_out, w_out = cfg.out_size
        ho = torch.arange(h_out, dtype=dtype)[:, None]
        wo = torch.arange(w_out, dtype=dtype)[None, :]
        base_y, base_x = ho - 1, wo - 1  # padding 1, kernel point (0, 0)
        targets_y = torch.tensor([-1.0, 5.0, 4.0, -1.0], dtype=dtype)
        targets_x = torch.tensor([-1.0, 6.0, 5.0, 2.5], dtype=dtype)
        pick = torch.randint(0, 4, (cfg.batch, h_out, w_out), generator=g)
        offset[:, 0] = targets_y[pick] - base_y
        offset[:, 1] = targets_x[pick] - base_x
    else:
        offset = offset * 10 + torch.sign(offset) * 6
    _compare(x, offset, weight, bias, mask, call_kwargs(cfg), dtype)


def test_non_contiguous_arguments_direct_kernel():
    # The kernel is also correct when called directly on strided views.
    cfg = Config(batch=2, in_channels=6, out_channels=4, groups=2, offset_groups=3, mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    off_nc = torch.cat([offset, offset], 1)[:, ::2]
    off_nc.copy_(offset)
    mask_nc = mask.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    w_nc = weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not any(t.is_contiguous() for t in (x_nc, off_nc, mask_nc, w_nc))
    geo = (cfg.stride, cfg.padding, cfg.dilation)
    out = _numba.forward(x_nc, off_nc, mask_nc, w_nc, bias, *geo)
    expected = _numba.forward(x, offset, mask, weight, bias, *geo)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    go = torch.randn_like(out).transpose(2, 3).contiguous().transpose(2, 3)
    grads = _numba.backward(go, x_nc, off_nc, mask_nc, w_nc, bias, *geo)
    expected_grads = _numba.backward(go.contiguous(), x, offset, mask, weight, bias, *geo)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("workspace_rows", [1, 7, 40, 90])
def test_chunked_workspace_gives_the_same_result(monkeypatch, workspace_rows):
    # A workspace cap of a few rows forces many chunks, including slices of one image
    # (L = 42 rows per image here) and chunks of several whole images. 65 channels per
    # group: the column path (narrower groups run on the direct kernels, unchunked).
    cfg = Config(batch=3, in_channels=130, out_channels=6, size=(7, 6), groups=2, offset_groups=2, mask=True)  # fmt: skip
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64)
    kwargs = call_kwargs(cfg)
    row_bytes = cfg.in_channels * 9 * 8
    assert not _direct.prefers_direct(cfg.in_channels, cfg.out_channels, cfg.groups)
    full_out, full_grads = _run("numba", x, offset, weight, bias, mask, kwargs)
    monkeypatch.setattr(_numba, "WORKSPACE_BYTES", workspace_rows * 2 * row_bytes)
    assert len(_numba._chunks(cfg.batch, 42, 2 * row_bytes)) > 1
    out, grads = _run("numba", x, offset, weight, bias, mask, kwargs)
    _assert_rel_close(out, full_out, 1e-12, "output")
    for g, e in zip(grads, full_grads, strict=True):
        _assert_rel_close(g, e, 1e-12, "gradient")
    _compare(x, offset, weight, bias, mask, kwargs, torch.float64)


@pytest.mark.parametrize("min_tasks", [1, 3, 8])
@pytest.mark.parametrize("workspace_rows", [10, 1000])
def test_col2im_row_parts_match_reference(monkeypatch, min_tasks, workspace_rows):
    # A backward chunk with fewer col2im tasks than MIN_COL2IM_TASKS splits each task's
    # rows into parts, each scattering into its own grad_input copy: parts of whole
    # images (1000 rows) and of slices of one image (10 rows, L = 42), uneven parts,
    # and more parts than a chunk has rows.
    cfg = Config(batch=2, in_channels=5, out_channels=4, size=(7, 6), mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64)
    kwargs = call_kwargs(cfg)
    row_bytes = cfg.in_channels * 9 * 8
    monkeypatch.setattr(_numba, "MIN_COL2IM_TASKS", min_tasks)
    monkeypatch.setattr(_numba, "WORKSPACE_BYTES", workspace_rows * 2 * row_bytes)
    _compare(x, offset, weight, bias, mask, kwargs, torch.float64)


def test_chunks_cover_every_row_once():
    for n, length, row_bytes, cap in [(3, 42, 100, 350), (3, 42, 100, 10**6), (5, 7, 8, 200)]:
        old, _numba.WORKSPACE_BYTES = _numba.WORKSPACE_BYTES, cap
        try:
            chunks = _numba._chunks(n, length, row_bytes)
        finally:
            _numba.WORKSPACE_BYTES = old
        rows = [r for r0, r1 in chunks for r in range(r0, r1)]
        assert rows == list(range(n * length))
        for r0, r1 in chunks:
            assert (r1 - r0) * row_bytes <= max(cap, row_bytes)
            # never a partial image joined to another image
            assert r0 // length == (r1 - 1) // length or (r0 % length == 0 and r1 % length == 0)
    assert _numba._chunks(0, 42, 100) == []


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_non_finite_and_huge_offsets(seed):
    # NaN, ±inf and ±1e30 offsets read 0 and get zero gradient, exactly like the reference;
    # nothing is read or written out of bounds (a stray read would show as garbage or a
    # crash, a stray write as a difference from the reference).
    g = torch.Generator().manual_seed(seed)
    cfg = Config(batch=2, in_channels=6, out_channels=4, size=(6, 5), offset_groups=3, mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32, generator=g)
    offset = offset * 5
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -3e9])
    pick = torch.randint(0, len(specials), offset.shape, generator=g)
    replace = torch.rand(offset.shape, generator=g) < 0.3
    offset = torch.where(replace, specials[pick], offset)
    out, grads = _run("numba", x, offset, weight, bias, mask, call_kwargs(cfg))
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t).all() for t in grads if t is not None)
    _compare(x, offset, weight, bias, mask, call_kwargs(cfg), torch.float32)


def test_bitwise_deterministic():
    cfg = Config(batch=3, in_channels=96, out_channels=8, size=(9, 7), offset_groups=2, mask=True)  # fmt: skip
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32)
    go = torch.randn(3, 8, *cfg.out_size)
    first = _run("numba", x, offset, weight, bias, mask, call_kwargs(cfg), go)
    second = _run("numba", x, offset, weight, bias, mask, call_kwargs(cfg), go)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accepted(dtype):
    cfg = Config(mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=dtype, offset_scale=1.0)
    out, grads = _run("numba", x, offset, weight, bias, mask, call_kwargs(cfg))
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in grads if g is not None)
    # Computed in float32 inside: equals the float32 computation rounded to ``dtype``.
    as32 = [None if t is None else t.float() for t in (x, offset, weight, bias, mask)]
    out32, _ = _run("numba", *as32, call_kwargs(cfg))
    torch.testing.assert_close(out, out32.to(dtype), rtol=0, atol=0)


def test_direct_kernel_dtypes_and_shapes():
    cfg = Config(mask=True, groups=2, offset_groups=2)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64)
    geo = (cfg.stride, cfg.padding, cfg.dilation)
    out = _numba.forward(x, offset, mask, weight, bias, *geo)
    assert out.dtype == torch.float64 and out.is_contiguous()
    grads = _numba.backward(torch.ones_like(out), x, offset, mask, weight, bias, *geo)
    for g, t in zip(grads, (x, offset, mask, weight, bias), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
    grads = _numba.backward(torch.ones_like(out), x, offset, None, weight, None, *geo)
    assert grads[2] is None and grads[4] is None


def test_auto_picks_numba_on_cpu():
    assert deformconv.available_backends("cpu")[0] == "numba"


def test_opcheck_numba():
    from deformconv.ops._library import deform_conv2d_op

    cfg = CONFIGS["everything"]
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32, offset_scale=1.0)
    args = [t.requires_grad_() for t in (x, offset, mask, weight, bias)]
    geo = [list(cfg.stride), list(cfg.padding), list(cfg.dilation)]
    torch.library.opcheck(deform_conv2d_op.default, (*args, *geo, "numba"))


def test_gradcheck_through_custom_op():
    cfg = Config(batch=1, in_channels=4, out_channels=2, size=(4, 5), groups=2, offset_groups=2, mask=True)  # fmt: skip
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64, offset_scale=0.7)
    # Keep sampling positions away from integers, where bilinear interpolation has kinks.
    offset = offset + 0.123
    tensors = [t.requires_grad_() for t in (x, offset, mask, weight, bias)]
    geo = (list(cfg.stride), list(cfg.padding), list(cfg.dilation))

    def op(x, offset, mask, weight, bias):
        return torch.ops.deformconv.deform_conv2d(x, offset, mask, weight, bias, *geo, "numba")

    assert torch.autograd.gradcheck(op, tensors, eps=1e-6, atol=1e-7)


def test_bench_runs_and_writes_markdown():
    from deformconv.bench import cpu as bench

    tiny = bench.Case("tiny modulated", 1, 4, 4, (6, 5), stride=2, offset_groups=2, modulated=True)  # fmt: skip
    result = bench.run([tiny], threads=1, repeat=1, warmup=0, memory=False, first_call=False)
    table = bench.to_markdown(result)
    assert "| tiny modulated (1, 4→4, 6×5) |" in table
    assert result["backend"] == "numba"
    assert set(result["geomean"]) >= {"deformconv/conv2d fwd", "deformconv/conv2d fwd+bwd"}


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512bw

processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: another CPU
flags\t\t: fpu avx2
"""


def test_bench_names_the_cpu_generation_from_cpuinfo():
    from deformconv.bench.cpu import cpu_description

    # The first processor's block only; its family and model tell Zen 4 from Zen 5.
    assert cpu_description(_CPUINFO) == "AMD EPYC (family 25, model 17, AVX-512)"
    avx2 = _CPUINFO.replace(" avx512f avx512bw", "")
    assert cpu_description(avx2) == "AMD EPYC (family 25, model 17, AVX2)"
    assert cpu_description("model name : Some CPU\n") == "Some CPU"
    assert cpu_description("Processor : AArch64\nBogoMIPS : 50.00\n") == ""


def test_bench_channels_last_gives_every_implementation_channels_last():
    from deformconv.bench import cpu as bench

    tiny = bench.Case("tiny", 2, 8, 8, (6, 5))
    t = bench._inputs(tiny, requires_grad=True, channels_last=True)
    for name in ("x", "w", "grad"):
        assert t[name].is_contiguous(memory_format=torch.channels_last), name
        assert not t[name].is_contiguous(), name
    plain = bench._inputs(tiny, requires_grad=True)
    for name in ("x", "w", "b", "off", "grad"):  # the same values, only the layout differs
        assert torch.equal(t[name], plain[name]), name
    for impl in ("conv2d", "deformconv"):
        assert bench._call(impl, tiny, t).is_contiguous(memory_format=torch.channels_last)
    result = bench.run(
        [tiny], threads=1, repeat=1, warmup=0, memory=False, first_call=False,
        torchvision=False, channels_last=True,
    )  # fmt: skip
    assert "channels_last" in bench.to_markdown(result)


def test_bench_rounds_rotate_the_order():
    # every implementation runs right after each other one, and as often as the others
    from deformconv.bench import cpu as bench

    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = bench._interleaved_ms(steps, repeat=3, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(runs) for name, runs in times.items()} == {"a": 3, "b": 3, "c": 3}


_SETTLE_SCRIPT = """
import ctypes, torch
from deformconv.bench import cpu

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):  # glibc before 2.33
    print("None None")
    raise SystemExit
libc.mallinfo2.restype = Mallinfo2

def mapped_afresh(mib):  # whether glibc maps a block of this size afresh
    before = libc.mallinfo2().hblks
    block = torch.empty(int(mib * 2**20), dtype=torch.uint8)
    mapped = libc.mallinfo2().hblks > before
    del block  # freeing a mapped block raises the threshold to its size
    return mapped

print(mapped_afresh(30), end=" ")
cpu.settle_allocator()
print(mapped_afresh(30.5))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_bench_settles_the_allocator():
    # A block of 30 MiB is mapped afresh (page faults on every use) until a mapped block
    # that large has been freed; after settle_allocator, blocks of up to 31 MiB come from
    # memory the allocator keeps (30.5 MiB: above the 30 MiB block freed before).
    run = subprocess.run(
        [sys.executable, "-c", _SETTLE_SCRIPT], capture_output=True, text=True, check=True
    )
    cold, settled = run.stdout.split()
    if cold != "True":
        pytest.skip("no mallinfo2, or a fresh process keeps 30 MiB blocks already")
    assert settled == "False"


@pytest.mark.parametrize(
    ("channels", "kernel", "size"),
    [(1, 3, (5, 4)), (6, 1, (5, 4)), (6, 3, (1, 1)), (64, 3, (40, 40))],
    ids=["one_channel", "kernel_1x1", "one_pixel", "large"],
)
def test_results_never_alias_the_kept_scratch(channels, kernel, size):
    # The input, grad_output, grad_input and weight matrices live in scratch that the next
    # call reuses: results (even where a permute is a view) must be fresh memory.
    torch.manual_seed(0)
    geo = ((1, 1), (kernel // 2, kernel // 2), (1, 1))
    x = torch.randn(2, channels, *size)
    offset = torch.randn(2, 2 * kernel * kernel, *size)
    weight = torch.randn(5, channels, kernel, kernel)
    bias = torch.randn(5)
    grad_out = torch.randn(2, 5, *size)
    with torch.inference_mode():
        out = _numba.forward(x, offset, None, weight, bias, *geo)
    grads = _numba.backward(grad_out, x, offset, None, weight, bias, *geo)
    kept = [out.clone()] + [None if g is None else g.clone() for g in grads]
    _numba.forward(-x, 2 * offset, None, 3 * weight, bias, *geo)
    _numba.backward(-grad_out, 2 * x, offset, None, -weight, bias, *geo)
    for got, want in zip([out, *grads], kept, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


_onednn = pytest.importorskip("deformconv.kernels._onednn")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("route", ["onednn", "mm", "mixed"])
@pytest.mark.parametrize(
    "cfg",
    [
        Config(batch=3, in_channels=8, out_channels=12, size=(7, 6), mask=True),
        Config(batch=2, in_channels=144, out_channels=96, groups=2, offset_groups=2, size=(5, 4)),
        # few pixels, many outputs: the columns go into the weight's own order
        Config(batch=1, in_channels=8, out_channels=40, size=(3, 3), mask=True),
        Config(batch=1, in_channels=144, out_channels=96, groups=2, size=(3, 3)),
    ],
    ids=["dense", "wide_groups", "few_pixels", "few_pixels_groups"],
)
def test_gemm_routes_match_the_reference(monkeypatch, route, cfg):
    # Each of the three GEMMs runs in oneDNN (a matrix product for one weight group, a
    # 1x1 convolution for several) or torch.mm by its size; force each route (mixed:
    # oneDNN for the output and the weight, mm for the grad columns, in chunks of one
    # image), check that it was taken, and compare with the reference.
    calls = {"forward_rows": 0, "backward_rows": 0, "weight_rows_into": 0}
    for name in calls:
        real = getattr(_onednn, name)

        def counted(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(_onednn, name, counted)
    if route != "mm" and cfg.groups == 1 and not _onednn.matmul_works():
        pytest.skip("this PyTorch has no oneDNN matrix product")
    on = route != "mm"
    monkeypatch.setattr(_onednn, "MIN_MULTIPLY_ADDS", 1 if on else 10**18)
    monkeypatch.setattr(_onednn, "MIN_ROWS", 1 if on else 10**9)
    monkeypatch.setattr(_onednn, "MIN_ROWS_WIDE", 1 if on else 10**9)
    monkeypatch.setattr(_onednn, "MIN_WEIGHT_ROWS", 1 if on else 10**9)
    monkeypatch.setattr(_onednn, "MAX_FRESH_BYTES", 0 if route == "mixed" else 2**40)
    if route == "mixed":
        row_bytes = 2 * cfg.in_channels * 9 * 4
        monkeypatch.setattr(_numba, "WORKSPACE_BYTES", cfg.size[0] * cfg.size[1] * row_bytes)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32)
    _compare(x, offset, weight, bias, mask, call_kwargs(cfg), torch.float32)
    expected = {"forward_rows": on, "backward_rows": route == "onednn", "weight_rows_into": on}
    assert {name: n > 0 for name, n in calls.items()} == expected, calls


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_a_failing_onednn_matrix_product_falls_back_to_mm(monkeypatch):
    # oneDNN's matrix product is a private PyTorch op: where it raises (or is missing),
    # the one-time check turns it off and the products run in torch.mm, same results.
    def broken(*args):
        raise RuntimeError("unsupported here")

    monkeypatch.setattr(_onednn, "_linear_op", lambda: broken)
    monkeypatch.setattr(_onednn, "MIN_MULTIPLY_ADDS", 1)
    _onednn.matmul_works.cache_clear()
    try:
        assert not _onednn.matmul_works()
        cfg = Config(batch=2, in_channels=8, out_channels=12, size=(7, 6), mask=True)
        x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32)
        _compare(x, offset, weight, bias, mask, call_kwargs(cfg), torch.float32)
        monkeypatch.setattr(_onednn, "_linear_op", lambda: None)
        _onednn.matmul_works.cache_clear()
        assert not _onednn.matmul_works()
    finally:
        _onednn.matmul_works.cache_clear()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_gradients_without_the_weight_s_never_read_unfilled_columns(monkeypatch):
    # Without a weight gradient the backward skips im2col, and oneDNN's input gradient
    # gets the (unfilled) column workspace only for its shape: poisoned with NaN here,
    # the input and offset gradients must still equal the reference's.
    monkeypatch.setattr(_onednn, "MIN_MULTIPLY_ADDS", 1)
    cfg = Config(batch=2, in_channels=8, out_channels=12, size=(9, 9))
    x, offset, weight, bias, _ = make_problem(cfg, dtype=torch.float32)
    geo = ((1, 1), (1, 1), (1, 1))
    for block in _numba._workspace(2 * 81, 8 * 9, 2, torch.float32):
        block.fill_(float("nan"))
    go = torch.randn(2, 12, 9, 9)
    gx, goff, _, gw, gb = _numba.backward(
        go, x, offset, None, weight, bias, *geo, needs_grad=(True, True, False, False, False)
    )
    assert gw is None and gb is None
    _, ref = _run("reference", x, offset, weight, bias, None, call_kwargs(cfg), go)
    _assert_rel_close(gx, ref[0], TOL[torch.float32], "grad_input")
    _assert_rel_close(goff, ref[1], TOL[torch.float32], "grad_offset")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("accumulate", [False, True])
def test_onednn_products_match_float64_products(groups, accumulate):
    if groups == 1 and not _onednn.matmul_works():
        pytest.skip("this PyTorch has no oneDNN matrix product")
    # The three products, with one weight group (oneDNN's matrix product) and three (its
    # 1x1 convolution with groups), against float64 products written group by group.
    g = torch.Generator().manual_seed(0)
    rows, width, cog = 50, 24, 5
    cols = torch.randn(rows, groups * width, generator=g)
    weight = torch.randn(groups * cog, width, generator=g)
    bias = torch.randn(groups * cog, generator=g)
    grad_rows = torch.randn(rows, groups * cog, generator=g)
    out = torch.randn(groups * cog, width, generator=g)
    c64, w64, g64 = cols.double(), weight.double(), grad_rows.double()
    parts = [(slice(i * width, (i + 1) * width), slice(i * cog, (i + 1) * cog)) for i in range(groups)]  # fmt: skip
    want_y = torch.cat([c64[:, c] @ w64[o].t() for c, o in parts], dim=1) + bias.double()
    want_gc = torch.cat([g64[:, o] @ w64[o] for _, o in parts], dim=1)
    want_gw = torch.cat([g64[:, o].t() @ c64[:, c] for c, o in parts], dim=0)
    want_gw = want_gw + (out.double() if accumulate else 0)
    y = _onednn.forward_rows(cols, weight, bias, groups)
    gc = _onednn.backward_rows(grad_rows, cols, weight, groups)
    _onednn.weight_rows_into(out, grad_rows, cols, groups, accumulate)
    for got, want in ((y, want_y), (gc, want_gc), (out, want_gw)):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def _problem_with_special_offsets(in_channels, dtype, modulated, seed):
    """A ``_Problem`` of 2 images of 7×9 (2 offset groups) with special offsets, and its generator.

    A fifth of the offsets are NaN, ±inf, huge, on the -1 border, half-integers or beyond
    the map.
    """
    cfg = Config(batch=2, in_channels=in_channels, out_channels=4, size=(7, 9), offset_groups=2, mask=True)  # fmt: skip
    x, offset, weight, _, mask = make_problem(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    offset = offset * 4
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1.0, 0.5, 7.0])
    replace = torch.rand(offset.shape, generator=g) < 0.2
    pick = torch.randint(0, len(specials), offset.shape, generator=g)
    offset = torch.where(replace, specials[pick].to(dtype), offset)
    geo = ((1, 1), (1, 1), (1, 1))
    return _numba._Problem(x, offset, mask if modulated else None, weight, *geo), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("in_channels", [10, 42])
def test_im2col_eight_pixel_taps_equal_one_pixel_taps(dtype, modulated, in_channels):
    # Large calls' im2col finds eight pixels' taps in vectors where eight pixels of one
    # image follow each other in the rows it fills, and blends their channels in wide
    # vectors, else (and in small calls) one pixel and one channel at a time: both must
    # give the same columns, bit for bit, on positions inside, on the border of and
    # outside the map (NaN, ±inf, huge), with and without a mask. 63 pixels per image:
    # each image ends inside a group of eight. 42 channels: runs of 21 per offset group,
    # one wide vector (16 lanes with AVX-512, else 8) and the rest one at a time.
    p, _ = _problem_with_special_offsets(in_channels, dtype, modulated, seed=5)
    rows = p.n * p.length
    common = p._common()
    runs = _numba._runs_table(p.c_in, p.n_off, p.c_pg, p.k, p.c_in // p.n_off, 1)
    vectors = torch.full((rows, p.row_width), float("nan"), dtype=dtype)
    _numba._im2col_rows8(*common, vectors.numpy(), 0, p.c_pg, *runs, 0, rows)
    singles = torch.full((rows, p.row_width), float("nan"), dtype=dtype)
    _numba._im2col_rows(*common, singles.numpy(), 0, p.c_pg, *runs, 0, rows)
    assert not torch.isnan(singles).all(dim=1).any()  # every row was filled
    torch.testing.assert_close(vectors, singles, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("modulated", [False, True])
def test_col2im_eight_row_taps_equal_one_row_taps(dtype, modulated):
    # Large calls' col2im takes a task's rows eight at a time (taps found in vectors)
    # where it can and one at a time elsewhere, in the same (row, kernel point) order as
    # small calls' one-row kernel: both must give the same input, offset and mask
    # gradients, bit for bit, on positions inside, on the border of and outside the map.
    # 70 channels: two channel blocks, the second with a scalar tail; 63 rows per image.
    p, g = _problem_with_special_offsets(140, dtype, modulated, seed=6)
    rows = p.n * p.length
    gcols = torch.randn(rows, p.row_width, generator=g).to(dtype)
    block, n_blocks = 64, 2  # of the 70 channels per offset group

    def scatter(kernel):
        gx = torch.zeros(1, *p.x2.shape, dtype=dtype)
        g_off = torch.full((n_blocks, *p.off.shape), float("nan"), dtype=dtype)
        g_mask = torch.full((n_blocks, p.n, p.n_off, p.k, p.length), float("nan"), dtype=dtype)
        n_tasks = p.n * p.n_off * n_blocks
        runs = _numba._runs_table(p.c_in, p.n_off, p.c_pg, p.k, block, n_blocks)
        kernel(
            *p._common(), gcols.numpy(), 0, p.c_pg, gx.numpy(), g_off.numpy(),
            g_mask.numpy(), block, n_blocks, 1, *runs, True, True, 0, n_tasks,
        )  # fmt: skip
        return gx, g_off, g_mask

    at_once = scatter(_numba._col2im_tasks8)
    one_by_one = scatter(_numba._col2im_tasks)
    assert not torch.isnan(one_by_one[1]).any()  # every sample was written
    for a, b in zip(at_once, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
