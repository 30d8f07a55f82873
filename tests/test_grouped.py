"""Grouped and depthwise deformable convolution: the direct CPU kernels and their dispatch.

Oracles: the pure-PyTorch reference backend, the naive float64 loops of
``tests/_references.py``, torchvision's op (where installed) and ``gradcheck``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import deformconv
from _cases import CONFIGS, Config, call_kwargs, make_problem
from _references import naive_deform_conv2d

pytest.importorskip("numba")
_numba = pytest.importorskip("deformconv.kernels._numba")
_direct = pytest.importorskip("deformconv.kernels._numba_direct")

# Per-element tolerances by dtype (about one rounding of a K·C_in/groups-term sum).
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}
NAMES = ("input", "offset", "mask", "weight", "bias")


def _leaves(x, offset, mask, weight, bias):
    return [None if t is None else t.detach().clone().requires_grad_() for t in (x, offset, mask, weight, bias)]  # fmt: skip


def _op_run(backend, problem, kwargs, grad_output):
    """Output and the five gradients (None where absent) of the public op on ``backend``."""
    x, offset, weight, bias, mask = problem
    leaves = _leaves(x, offset, mask, weight, bias)
    xi, oi, mi, wi, bi = leaves
    with deformconv.use_backend(backend):
        out = deformconv.deform_conv2d(xi, oi, wi, bi, mask=mi, **kwargs)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, used, grad_output))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


def _reference_run(problem, kwargs, grad_output):
    return _op_run("reference", problem, kwargs, grad_output)


def _direct_run(problem, kwargs, grad_output, needs_grad=(True,) * 5):
    """The direct kernels called as a backend's forward/backward (whatever the dispatch)."""
    x, offset, weight, bias, mask = problem
    geo = (kwargs["stride"], kwargs["padding"], kwargs["dilation"])
    out = _direct.forward(x, offset, mask, weight, bias, *geo)
    grads = _direct.backward(
        grad_output, x, offset, mask, weight, bias, *geo, needs_grad=needs_grad
    )
    return out, list(grads)


def _assert_all_close(actual, expected, dtype):
    out, grads = actual
    ref_out, ref_grads = expected
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name, g, rg in zip(NAMES, grads, ref_grads, strict=True):
        assert (g is None) == (rg is None), name
        if g is not None:
            torch.testing.assert_close(g, rg, **TOL[dtype], msg=lambda m, n=name: f"grad_{n}: {m}")


def _grad_output(cfg, dtype, seed=1):
    shape = (cfg.batch, cfg.out_channels, *cfg.out_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


C = 64  # channels of the groups battery: groups 1, 2, 4, 32 and C (depthwise)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("offset_groups", [1, 2])
@pytest.mark.parametrize("groups", [1, 2, 4, 32, C])
def test_groups_battery_numba_matches_reference(groups, offset_groups, modulated):
    # The public op on the numba backend (direct or column + GEMM, as dispatched) against
    # the reference backend: forward and all five gradients.
    cfg = Config(batch=2, in_channels=C, out_channels=C, size=(5, 6), groups=groups,
                 offset_groups=offset_groups, mask=modulated)  # fmt: skip
    dtype = torch.float64
    problem = make_problem(cfg, dtype=dtype)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, dtype)
    _assert_all_close(
        _op_run("numba", problem, kwargs, go), _reference_run(problem, kwargs, go), dtype
    )


def _torchvision_run(problem, kwargs, grad_output):
    tv_ops = pytest.importorskip("torchvision.ops")
    x, offset, weight, bias, mask = problem
    leaves = _leaves(x, offset, mask, weight, bias)
    xi, oi, mi, wi, bi = leaves
    out = tv_ops.deform_conv2d(xi, oi, wi, bi, mask=mi, **kwargs)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, used, grad_output))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("offset_groups", [1, 2])
@pytest.mark.parametrize("groups", [1, 2, 4, 32, C])
def test_groups_battery_numba_matches_torchvision(groups, offset_groups, modulated):
    cfg = Config(batch=2, in_channels=C, out_channels=C, size=(5, 6), groups=groups,
                 offset_groups=offset_groups, mask=modulated)  # fmt: skip
    dtype = torch.float64
    problem = make_problem(cfg, dtype=dtype)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, dtype)
    _assert_all_close(
        _op_run("numba", problem, kwargs, go), _torchvision_run(problem, kwargs, go), dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_direct_kernels_match_reference_on_every_config(name, dtype):
    # Called directly, the direct kernels are correct for any grouping, including the
    # dense and straddling configurations the dispatch sends elsewhere.
    cfg = CONFIGS[name]
    problem = make_problem(cfg, dtype=dtype)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, dtype)
    _assert_all_close(_direct_run(problem, kwargs, go), _reference_run(problem, kwargs, go), dtype)


EXTRA = {
    "batch_0": Config(batch=0, in_channels=8, out_channels=8, groups=8, mask=True),
    "depthwise_multiplier_2": Config(in_channels=6, out_channels=12, groups=6, mask=True),
    "groups_32_odd_batch": Config(
        batch=3, in_channels=64, out_channels=32, groups=32, offset_groups=4, mask=True, size=(6, 5)
    ),
    "depthwise_many_blocks": Config(
        batch=1, in_channels=150, out_channels=150, groups=150, size=(4, 5), offset_groups=3
    ),
    "grouped_stride_dilation": Config(
        in_channels=16,
        out_channels=8,
        groups=4,
        stride=(2, 1),
        dilation=(2, 2),
        padding=(2, 1),
        kernel=(3, 2),
        mask=True,
        size=(9, 7),
    ),  # fmt: skip
    "slots_wrap": Config(batch=11, in_channels=4, out_channels=4, groups=4, size=(3, 4)),
    # The widest groups the dispatch sends to the direct kernels (MAX_GROUP_CHANNELS)
    "groups_of_64_channels": Config(
        in_channels=128, out_channels=96, groups=2, offset_groups=2, mask=True, size=(5, 4)
    ),  # fmt: skip
    # The backward's weight panels (16 input channels each): a last panel only partly
    # filled (136 and 150 channels), panels of 8-channel and 16-channel groups, and 3-channel
    # groups whose panels straddle groups; 42 rows per image, batch 8 (one image per slot)
    "panels_of_8_channel_groups": Config(
        batch=8, in_channels=136, out_channels=68, groups=17, size=(7, 6), mask=True
    ),
    "panels_of_16_channel_groups": Config(
        batch=8, in_channels=160, out_channels=160, groups=10, size=(7, 6)
    ),
    "panels_straddling_3_channel_groups": Config(
        batch=8, in_channels=150, out_channels=100, groups=50, size=(7, 6), mask=True
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(EXTRA))
def test_direct_kernels_extra_shapes(name, dtype):
    # Batch 0, a channel multiplier, more images than slots, more channel blocks than one.
    cfg = EXTRA[name]
    problem = make_problem(cfg, dtype=dtype)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, dtype)
    _assert_all_close(_direct_run(problem, kwargs, go), _reference_run(problem, kwargs, go), dtype)


@pytest.mark.parametrize("groups", [4, 8])
def test_forward_matches_naive_loops(groups):
    cfg = Config(batch=2, in_channels=8, out_channels=8, groups=groups, offset_groups=2, mask=True, size=(5, 4))  # fmt: skip
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64)
    kwargs = call_kwargs(cfg)
    with deformconv.use_backend("numba"):
        out = deformconv.deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    expected = naive_deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


def test_gradcheck_depthwise():
    cfg = Config(batch=2, in_channels=3, out_channels=3, groups=3, size=(4, 5), mask=True)
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64, offset_scale=0.7)
    offset = offset + 0.123  # away from integer positions, where bilinear has kinks
    tensors = [t.requires_grad_() for t in (x, offset, mask, weight, bias)]
    geo = (list(cfg.stride), list(cfg.padding), list(cfg.dilation))

    def op(x, offset, mask, weight, bias):
        return torch.ops.deformconv.deform_conv2d(x, offset, mask, weight, bias, *geo, "numba")

    assert _direct.prefers_direct(3, 3, 3)
    assert torch.autograd.gradcheck(op, tensors, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "needs_grad",
    [
        (True, False, False, False, False),
        (False, True, False, False, False),
        (False, False, True, False, False),
        (False, False, False, True, True),
        (False, False, False, False, False),
    ],
)
def test_needs_grad_skips_only_what_is_not_needed(needs_grad):
    cfg = Config(in_channels=8, out_channels=8, groups=4, offset_groups=2, mask=True)
    problem = make_problem(cfg, dtype=torch.float64)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, torch.float64)
    _, grads = _direct_run(problem, kwargs, go, needs_grad)
    _, expected = _reference_run(problem, kwargs, go)
    for name, need, g, e in zip(NAMES, needs_grad, grads, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        if need:
            torch.testing.assert_close(g, e, **TOL[torch.float64])
        else:
            assert not g.any(), f"grad_{name} was computed although not needed"


@pytest.mark.parametrize("groups", [4, 16])
def test_non_finite_and_huge_offsets(groups):
    # NaN, ±inf and huge offsets read 0 and get zero gradient, as in the reference.
    g = torch.Generator().manual_seed(5)
    cfg = Config(batch=2, in_channels=16, out_channels=16, groups=groups, offset_groups=2, mask=True, size=(6, 5))  # fmt: skip
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float32, generator=g)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9])
    pick = torch.randint(0, len(specials), offset.shape, generator=g)
    offset = torch.where(torch.rand(offset.shape, generator=g) < 0.3, specials[pick], offset * 4)
    problem = (x, offset, weight, bias, mask)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, torch.float32)
    actual = _op_run("numba", problem, kwargs, go)
    assert torch.isfinite(actual[0]).all()
    assert all(torch.isfinite(t).all() for t in actual[1])
    _assert_all_close(actual, _reference_run(problem, kwargs, go), torch.float32)


def test_bitwise_deterministic():
    cfg = Config(batch=3, in_channels=96, out_channels=96, groups=32, offset_groups=2, mask=True, size=(7, 6))  # fmt: skip
    problem = make_problem(cfg, dtype=torch.float32)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, torch.float32)
    first = _op_run("numba", problem, kwargs, go)
    second = _op_run("numba", problem, kwargs, go)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "direct"),
    [
        (256, 256, 1, False),  # dense: one GEMM
        (256, 256, 2, False),  # 128 channels per group: GEMMs
        (256, 256, 4, True),  # 64 channels per group
        (256, 256, 8, True),  # 32 channels per group
        (256, 256, 32, True),  # ResNeXt 32x8d
        (512, 512, 32, True),  # 16 channels per group
        (128, 128, 128, True),  # depthwise
        (16, 32, 16, True),  # depthwise, multiplier 2
    ],
)
def test_dispatch_by_group_width(c_in, c_out, groups, direct):
    assert _direct.prefers_direct(c_in, c_out, groups) is direct


def test_bench_grouped_row_runs_against_grouped_conv2d():
    from deformconv.bench import cpu as bench
    from deformconv.bench.suite import GROUPED, SUITES

    assert {c.groups for c in GROUPED} >= {32, 64, 128} and SUITES["grouped"] == GROUPED
    tiny = bench.Case("tiny grouped", 2, 8, 8, (5, 4), offset_groups=2, modulated=True, groups=4)
    result = bench.run([tiny], threads=1, repeat=1, warmup=0, memory=False, first_call=False)
    assert "| tiny grouped (2, 8→8, 5×4, g=4) |" in bench.to_markdown(result)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bench_model_rows(channels_last):
    pytest.importorskip("torchvision")
    from deformconv.bench import cpu as bench

    result = bench.run_models(
        ["resnet18"], batch=2, size=64, threads=1, repeat=1, warmup=0,
        channels_last=channels_last,
    )  # fmt: skip
    assert set(result["rows"][0]["ms"]) == {
        f"{variant} {label}"
        for variant in ("plain", "deformable", "torchvision") for label in ("train", "infer")
    }  # fmt: skip
    table = bench.models_to_markdown(result)
    assert "| resnet18 |" in table
    assert ("channels_last" in table) == channels_last


def test_torchvision_variant_computes_what_deformconv_computes():
    """The model-level row's peer variant is the same model on torchvision's op."""
    pytest.importorskip("torchvision")
    from deformconv.bench import cpu as bench

    ours = bench._model("resnet18", True).eval()
    peer = bench._on_torchvision_op(bench._model("resnet18", True)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # offset heads start at zero: give them real offsets
        for (name, a), (_, b) in zip(ours.named_parameters(), peer.named_parameters(), strict=True):
            if "conv_offset" in name:
                a.copy_(torch.randn(a.shape, generator=gen) * 0.05)
                b.copy_(a)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), ours(x), rtol=1e-4, atol=1e-4)


_WITHOUT_AVX512 = """
import sys, torch
from deformconv.kernels import _numba_direct, _simd
assert _simd.WIDE == _simd.LANES, _simd.WIDE
x, offset, weight, bias, mask, go = torch.load(sys.argv[1])
geo = ((1, 1), (1, 1), (1, 1))
out = _numba_direct.forward(x, offset, mask, weight, bias, *geo)
grads = _numba_direct.backward(go, x, offset, mask, weight, bias, *geo)
torch.save((out, list(grads)), sys.argv[2])
"""


def test_direct_kernels_on_a_cpu_without_avx512(tmp_path):
    # Compiled for a generic x86-64 CPU (no AVX-512), the kernels take 8-lane steps where
    # they take 16 on AVX-512: the same results. 16 channels per group: every wide path.
    cfg = Config(batch=2, in_channels=32, out_channels=16, groups=2, size=(5, 4), mask=True)
    dtype = torch.float64
    problem = make_problem(cfg, dtype=dtype)
    kwargs = call_kwargs(cfg)
    go = _grad_output(cfg, dtype)
    torch.save((*problem, go), tmp_path / "in.pt")
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_AVX512, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out, grads = torch.load(tmp_path / "out.pt")
    _assert_all_close((out, grads), _reference_run(problem, kwargs, go), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("modulated", [False, True])
def test_depthwise_eight_pixel_path_equals_one_pixel_path(dtype, modulated):
    # The depthwise forward takes eight pixels of one image at a time (taps and channels
    # in vectors) and an image's last pixels one at a time: both must give the same
    # output, bit for bit, on positions inside, on the border of and outside the map (NaN,
    # ±inf, huge), with and without a mask. 2 offset groups of 27 channels (16 + 8 lanes
    # and a scalar tail), 63 pixels per image (each image ends inside a group of eight),
    # an input with an infinite pixel (an outside sample must not read it).
    cfg = Config(batch=2, in_channels=54, out_channels=54, size=(7, 9), groups=54, offset_groups=2, mask=True)  # fmt: skip
    x, offset, weight, bias, mask = make_problem(cfg, dtype=dtype)
    x[0, :, 0, 0] = float("inf")
    g = torch.Generator().manual_seed(7)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1.0, 0.5, 7.0])
    replace = torch.rand(offset.shape, generator=g) < 0.2
    pick = torch.randint(0, len(specials), offset.shape, generator=g)
    offset = torch.where(replace, specials[pick].to(dtype), offset * 4)
    p = _direct._Problem(x, offset, mask if modulated else None, weight, (1, 1), (1, 1), (1, 1))
    w_kc = p.weight.reshape(p.c_out, p.k).t().contiguous().numpy()
    b = bias.detach().to(p.dtype).numpy()
    rows = p.n * p.length

    def run(kernel, *extra):
        out = torch.full((rows, p.c_out), 12345.0, dtype=dtype)  # a value no output takes
        kernel(*p.common(), w_kc, b, out.numpy(), *extra)
        return out

    vectors = run(_direct._forward_depthwise)
    singles = run(_direct._depthwise_rows, 0, rows)
    assert not (singles == 12345.0).any()  # every output was written
    torch.testing.assert_close(vectors, singles, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("channels", "groups", "out_channels"),
    [(16, 16, 16), (16, 2, 16), (32, 4, 64), (6, 2, 4)],
    ids=["depthwise", "vectors", "outer", "grouped"],
)
def test_empty_input_map_reads_zeros(channels, groups, out_channels):
    # A 0×0 input whose padding alone gives the output: every sample lies in [-1, 0) (the
    # range check passes) yet has no pixel to read. The output is the bias, every gradient
    # but the bias's is zero, and no kernel reads before the input (the corner row and
    # column are -1 there).
    x = torch.randn(2, channels, 0, 0)
    weight = torch.randn(out_channels, channels // groups, 1, 1)
    bias = torch.randn(out_channels)
    h_out, w_out = 2, 8
    oy = torch.arange(h_out, dtype=torch.float32).view(h_out, 1).expand(h_out, w_out)
    ox = torch.arange(w_out, dtype=torch.float32).view(1, w_out).expand(h_out, w_out)
    offset = torch.stack([-0.5 - (oy - 1), -0.5 - (ox - 4)]).expand(2, 2, h_out, w_out)
    problem = (x, offset.contiguous(), weight, bias, None)
    grad_output = torch.randn(2, out_channels, h_out, w_out)
    kwargs = {"stride": (1, 1), "padding": (1, 4), "dilation": (1, 1)}
    out, (g_x, g_off, g_mask, g_w, g_b) = _direct_run(problem, kwargs, grad_output)
    # From the equation: no sample has a pixel, so out = bias and only the bias has a gradient.
    assert torch.equal(out, bias.view(1, -1, 1, 1).expand_as(out))
    assert g_x.shape == x.shape and g_mask is None
    assert torch.equal(g_off, torch.zeros_like(offset))
    assert torch.equal(g_w, torch.zeros_like(weight))
    torch.testing.assert_close(g_b, grad_output.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)
