"""deform_conv2d against independent oracles: a naive loop, F.conv2d, torchvision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import deformconv
from _cases import CONFIGS, Config, call_kwargs, make_problem
from _references import naive_deform_conv2d
from deformconv import deform_conv2d

# Tolerances per dtype: relative to the output's scale (atol) and elementwise (rtol).
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-1, "rtol": 2e-2},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
}


def run(backend, *args, **kwargs):
    with deformconv.use_backend(backend):
        return deform_conv2d(*args, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_naive_loop(backend, name):
    cfg = CONFIGS[name]
    x, offset, weight, bias, mask = make_problem(cfg)
    out = run(backend, x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    expected = naive_deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_offsets_equal_conv2d(backend, dtype):
    cfg = CONFIGS["everything"]
    x, offset, weight, bias, mask = make_problem(cfg, dtype=dtype)
    out = run(
        backend, x, torch.zeros_like(offset), weight, bias, mask=torch.ones_like(mask),
        **call_kwargs(cfg),
    )  # fmt: skip
    expected = F.conv2d(x, weight, bias, groups=cfg.groups, **call_kwargs(cfg))
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("shift", [-3.0, -1.0, 1.0, 2.0])
def test_integer_offsets_equal_shifted_conv(backend, shift):
    # An integer offset moves every tap by whole pixels: the conv of a shifted, zero-filled input.
    cfg = Config(padding=(1, 1), size=(8, 7))
    x, offset, weight, bias, _ = make_problem(cfg)
    offset = torch.zeros_like(offset)
    offset[:, 0::2] = shift  # Δy of every tap
    out = run(backend, x, offset, weight, bias, **call_kwargs(cfg))
    # Zero-pad generously, then cut the padded window shifted by ``shift`` rows: taps that
    # start in the padding may land on real rows, and taps that leave the map read zeros.
    s, (ph, pw), margin = int(shift), cfg.padding, 8
    big = F.pad(x, (pw, pw, margin, margin))
    start = margin - ph + s
    window = big[:, :, start : start + x.shape[2] + 2 * ph]
    expected = F.conv2d(window, weight, bias, stride=cfg.stride, dilation=cfg.dilation)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


def test_positions_on_borders_and_edges(backend):
    # Sample positions exactly at -1, 0, H-1, H (and just inside/outside) on both axes.
    cfg = Config(batch=1, in_channels=2, out_channels=3, size=(5, 4), kernel=(1, 1), padding=(0, 0))
    x, _, weight, bias, _ = make_problem(cfg)
    h, w = cfg.size
    ys = torch.tensor([-1.0, -1.0 + 1e-9, -0.5, 0.0, h - 1.0, h - 0.5, h - 1e-9, float(h), h + 0.5])
    offset = torch.zeros(1, 2, h, w, dtype=torch.float64)
    base_y = torch.arange(h, dtype=torch.float64)[:, None]
    base_x = torch.arange(w, dtype=torch.float64)[None, :]
    for target in ys:
        offset[:, 0] = target - base_y  # every output pixel samples row ``target``
        offset[:, 1] = (ys[:w] if w <= len(ys) else ys[0]) - base_x
        out = run(backend, x, offset, weight, bias)
        expected = naive_deform_conv2d(x, offset, weight, bias)
        torch.testing.assert_close(out, expected, **TOL[torch.float64])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e10])
def test_non_finite_and_huge_offsets_read_zero(backend, bad):
    cfg = Config(mask=True)
    x, offset, weight, bias, mask = make_problem(cfg)
    hit = torch.rand(offset.shape) < 0.3
    offset = torch.where(hit, torch.full_like(offset, bad), offset)
    out = run(backend, x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    assert torch.isfinite(out).all()
    # Documented meaning: a tap whose Δy or Δx is NaN, infinite or far off the map reads 0,
    # which is what the same tap with a far-away finite offset reads in the naive loop.
    far = torch.where(hit, torch.full_like(offset, 1e6), offset)
    expected = naive_deform_conv2d(x, far, weight, bias, mask=mask, **call_kwargs(cfg))
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


def test_empty_batch(backend):
    cfg = Config(batch=0, mask=True)
    x, offset, weight, bias, mask = make_problem(cfg)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = run(backend, x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    assert out.shape == (0, cfg.out_channels, *cfg.out_size)
    out.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight))


def test_non_contiguous_inputs(backend):
    cfg = CONFIGS["modulated"]
    x, offset, weight, bias, mask = make_problem(cfg)
    expected = naive_deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    # Same values, strided storage: permuted copies and a slice of a stacked tensor.
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    offset_nc = torch.stack([offset, offset], dim=-1)[..., 0]
    weight_nc = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert (
        not x_nc.is_contiguous() and not offset_nc.is_contiguous() and not weight_nc.is_contiguous()
    )
    out = run(backend, x_nc, offset_nc, weight_nc, bias, mask=mask, **call_kwargs(cfg))
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(backend, dtype):
    cfg = CONFIGS["modulated"]
    x, offset, weight, bias, mask = make_problem(cfg, dtype=torch.float64, offset_scale=1.0)
    cast = [t.to(dtype) for t in (x, offset, weight, bias, mask)]
    out = run(backend, cast[0], cast[1], cast[2], cast[3], mask=cast[4], **call_kwargs(cfg))
    assert out.dtype == dtype
    # Compare against the float64 loop on the same (rounded) inputs.
    ref = naive_deform_conv2d(
        *[t.double() for t in cast[:4]], mask=cast[4].double(), **call_kwargs(cfg)
    )
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


def _random_config(rng: torch.Generator) -> Config:
    def pick(*values):
        return values[int(torch.randint(len(values), (1,), generator=rng))]

    groups = pick(1, 2)
    offset_groups = pick(1, 2, 4)
    in_channels = 4 * pick(1, 2)
    kernel = (pick(1, 2, 3), pick(1, 2, 3))
    dilation = (pick(1, 2), pick(1, 2))
    padding = (pick(0, 1, 2), pick(0, 1, 2))
    stride = (pick(1, 2), pick(1, 2))
    size = (pick(5, 7, 10), pick(4, 6, 9))
    cfg = Config(
        batch=pick(1, 2, 3), in_channels=in_channels, out_channels=2 * groups, size=size,
        kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        offset_groups=offset_groups, mask=bool(pick(0, 1)), bias=bool(pick(0, 1)),
    )  # fmt: skip
    return cfg if min(cfg.out_size) >= 1 else _random_config(rng)  # redraw empty outputs


@pytest.mark.parametrize("seed", range(40))
def test_matches_torchvision_random(backend, seed):
    tv_ops = pytest.importorskip("torchvision.ops")
    rng = torch.Generator().manual_seed(seed)
    cfg = _random_config(rng)
    # Scale 4 sends many samples off the map; integer offsets hit corners exactly.
    x, offset, weight, bias, mask = make_problem(
        cfg, dtype=torch.float64, offset_scale=4.0, generator=rng
    )
    if seed % 4 == 0:
        offset = offset.round()
    x.requires_grad_(True)
    offset.requires_grad_(True)
    weight.requires_grad_(True)
    inputs = [x, offset, weight] + [t.requires_grad_(True) for t in (bias, mask) if t is not None]
    out = run(backend, x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    expected = tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad_out)
    theirs = torch.autograd.grad(expected, inputs, grad_out)
    # Integer positions: torchvision's offset gradient is one-sided like ours (floor-based).
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 2),
    c_per_group=st.integers(1, 3),
    groups=st.integers(1, 2),
    offset_groups_div=st.sampled_from([1, 2]),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    size=st.tuples(st.integers(3, 7), st.integers(3, 7)),
    modulated=st.booleans(),
    scale=st.sampled_from([0.0, 0.5, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_naive_loop(
    batch, c_per_group, groups, offset_groups_div, kernel, stride, padding, dilation, size,
    modulated, scale, seed,
):  # fmt: skip
    in_channels = c_per_group * groups * offset_groups_div
    cfg = Config(
        batch=batch, in_channels=in_channels, out_channels=groups, size=size, kernel=kernel,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        offset_groups=in_channels // c_per_group if offset_groups_div == 2 else 1, mask=modulated,
    )  # fmt: skip
    if min(cfg.out_size) < 1:
        return  # the validator rejects empty outputs; tested in test_validation.py
    rng = torch.Generator().manual_seed(seed)
    x, offset, weight, bias, mask = make_problem(cfg, offset_scale=scale, generator=rng)
    for backend in deformconv.available_backends("cpu"):
        out = run(backend, x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
        expected = naive_deform_conv2d(x, offset, weight, bias, mask=mask, **call_kwargs(cfg))
        torch.testing.assert_close(
            out, expected, **TOL[torch.float64], msg=lambda m, b=backend: f"{b}: {m}"
        )


# The checks of torchvision's own deformable-convolution tests, on the compat module: the
# layer's forward with and without mask (batch 0 and an odd batch, non-contiguous weight),
# and wrongly sized offsets/masks in a call whose dtype is wrong too.
def _torchvision_style_problem(batch, dtype=torch.float64):
    # in 6, out 2, kernel (3, 2), groups 2, offset groups 3, stride (2, 1), padding (1, 0),
    # dilation (2, 1), input 10x12 -> output 4x11.
    x = torch.rand(batch, 6, 10, 12, dtype=dtype)
    offset = torch.randn(batch, 3 * 2 * 6, 4, 11, dtype=dtype)
    mask = torch.rand(batch, 3 * 6, 4, 11, dtype=dtype)
    return x, offset, mask


@pytest.mark.parametrize("batch", [0, 33])
@pytest.mark.parametrize("contiguous", [True, False])
def test_compat_layer_like_torchvision_tests(backend, batch, contiguous):
    tv_ops = pytest.importorskip("torchvision.ops")
    from deformconv.compat.torchvision import DeformConv2d as CompatDeformConv2d

    kwargs = {"stride": (2, 1), "padding": (1, 0), "dilation": (2, 1), "groups": 2}
    theirs = tv_ops.DeformConv2d(6, 2, (3, 2), **kwargs).double()
    ours = CompatDeformConv2d(6, 2, (3, 2), **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    if not contiguous:
        ours.weight.data = ours.weight.data.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    x, offset, mask = _torchvision_style_problem(batch)
    with deformconv.use_backend(backend):
        torch.testing.assert_close(
            ours(x, offset, mask), theirs(x, offset, mask), **TOL[torch.float64]
        )
        torch.testing.assert_close(ours(x, offset), theirs(x, offset), **TOL[torch.float64])


def test_wrong_sizes_like_torchvision_tests():
    from deformconv.compat.torchvision import DeformConv2d as CompatDeformConv2d

    layer = CompatDeformConv2d(
        6, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2
    )
    x, offset, mask = _torchvision_style_problem(10)  # float64 into a float32 layer
    with pytest.raises(RuntimeError, match="the shape of the offset"):
        layer(x, torch.rand_like(offset[:, :2]))
    with pytest.raises(RuntimeError, match=r"mask.shape\[1\] is not valid"):
        layer(x, offset, torch.rand_like(mask[:, :2]))
