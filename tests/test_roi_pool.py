"""Deformable RoI pooling: torchvision's RoIAlign/PSRoIAlign at zero offsets, naive loops
from the paper's equation with random offsets and masks, gradcheck, the module, and errors.

Tests taking ``backend`` run once per CPU backend: ``reference`` pools with the pure
index_select + bmm reduction, any other name with the embedding_bag fast path.
"""

from __future__ import annotations

import math

import pytest
import torch

import deformconv
from _references import naive_deform_roi_pool
from deformconv import DeformRoIPool2d, deform_ps_roi_pool, deform_roi_pool
from deformconv.ops._errors import ArgumentError

F64 = torch.float64


def _rois(k: int, n: int, extent: tuple[float, float], dtype=F64, seed: int = 0) -> torch.Tensor:
    """Random boxes in image coordinates, plus a zero-size, an out-of-image, a partly
    outside, an inverted and a tiny box (appended when k >= 5)."""
    g = torch.Generator().manual_seed(seed)
    w, h = extent
    xy = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([w, h], dtype=dtype) - 4
    wh = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([w, h], dtype=dtype) * 0.6
    boxes = torch.cat([xy, xy + wh], 1)
    special = torch.tensor(
        [
            [5.0, 6.0, 5.0, 6.0],  # zero size
            [w + 20, h + 30, w + 60, h + 50],  # entirely outside
            [-30.0, -20.0, 10.0, 8.0],  # partly outside
            [12.0, 14.0, 4.0, 3.0],  # inverted (x2 < x1)
            [3.2, 4.1, 3.4, 4.15],  # tiny
        ],
        dtype=dtype,
    )
    if k >= 5:
        boxes = torch.cat([boxes[: k - 5], special])
    batch = torch.randint(0, n, (k, 1), generator=g).to(dtype)
    return torch.cat([batch, boxes], 1)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_zero_offsets_equal_roi_align(backend, aligned, sampling_ratio, spatial_scale):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 5, 11, 13, dtype=F64)
    rois = _rois(16, 2, (13 / spatial_scale, 11 / spatial_scale))
    expected = tv.ops.roi_align(x, rois, (4, 3), spatial_scale, sampling_ratio, aligned)
    zeros = torch.zeros(16, 2, 4, 3, dtype=F64)
    with deformconv.use_backend(backend):
        for offset in (None, zeros):
            out = deform_roi_pool(
                x, rois, offset, (4, 3), spatial_scale, sampling_ratio, aligned=aligned
            )
            torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_zero_offsets_equal_ps_roi_align(backend, sampling_ratio, spatial_scale):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3 * 3 * 2, 9, 10, dtype=F64)
    rois = _rois(12, 2, (10 / spatial_scale, 9 / spatial_scale))
    # torchvision divides 0/0 (NaN) for a RoI with an empty sampling grid; we return 0.
    expected = tv.ops.ps_roi_align(x, rois, (3, 2), spatial_scale, sampling_ratio).nan_to_num()
    with deformconv.use_backend(backend):
        out = deform_ps_roi_pool(x, rois, None, (3, 2), spatial_scale, sampling_ratio)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("position_sensitive", [False, True])
@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(True, 0), (False, 0), (True, 2)])
def test_matches_naive_loops(backend, aligned, sampling_ratio, position_sensitive, modulated):
    out_size = (3, 2)
    c = 3 * 6 if position_sensitive else 4
    x = torch.randn(2, c, 9, 11, dtype=F64)
    rois = _rois(10, 2, (44.0, 36.0))
    offset = torch.randn(10, 2, *out_size, dtype=F64)  # large: many bins leave the map
    mask = torch.rand(10, 1, *out_size, dtype=F64) if modulated else None
    args = (out_size, 0.25, sampling_ratio, 0.3, aligned)
    fn = deform_ps_roi_pool if position_sensitive else deform_roi_pool
    with deformconv.use_backend(backend):
        out = fn(x, rois, offset, *args, mask=mask)
    expected = naive_deform_roi_pool(
        x, rois, offset, *args, mask=mask, position_sensitive=position_sensitive
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_offset_channel_0_is_x_and_scales_with_roi_width():
    # A ramp in x: pooled value = sampled x. Shift x by gamma·offset·roi_w.
    xs = torch.arange(20.0, dtype=F64).expand(1, 1, 10, 20)
    rois = torch.tensor([[0.0, 2.0, 1.0, 12.0, 6.0]], dtype=F64)  # w = 10, h = 5
    offset = torch.zeros(1, 2, 1, 1, dtype=F64)
    base = deform_roi_pool(xs, rois, offset, 1, sampling_ratio=1)
    offset[0, 0] = 0.5
    moved = deform_roi_pool(xs, rois, offset, 1, sampling_ratio=1, gamma=0.2)
    torch.testing.assert_close(moved - base, torch.full_like(base, 0.2 * 0.5 * 10))
    offset[0, 0], offset[0, 1] = 0.0, 0.5  # y offsets leave an x ramp unchanged
    torch.testing.assert_close(deform_roi_pool(xs, rois, offset, 1, sampling_ratio=1), base)


@pytest.mark.parametrize("position_sensitive", [False, True])
def test_gradcheck(backend, position_sensitive):
    out_size = (2, 2)
    c = 1 * 4 if position_sensitive else 2
    x = torch.randn(2, c, 5, 6, dtype=F64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.3, 2.2, 20.1, 17.7], [1, -3.1, 4.3, 12.9, 30.2], [1, 8.7, 0.6, 9.9, 2.3]],
        dtype=F64,
    )
    offset = (0.4 * torch.randn(3, 2, *out_size, dtype=F64)).requires_grad_()
    mask = torch.rand(3, 1, *out_size, dtype=F64, requires_grad=True)
    fn = deform_ps_roi_pool if position_sensitive else deform_roi_pool

    def f(x, offset, mask):
        return fn(x, rois, offset, out_size, 0.25, 0, 0.5, True, mask)

    with deformconv.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, offset, mask))


@pytest.mark.parametrize("position_sensitive", [False, True])
def test_gradgradcheck(backend, position_sensitive):
    # The hand-written backward is itself differentiable: eagerly on the reference, and
    # through the backward op's autograd formula on the other backends.
    x = torch.randn(1, 4 if position_sensitive else 2, 5, 6, dtype=F64, requires_grad=True)
    rois = torch.tensor([[0, 1.3, 2.2, 18.1, 15.7], [0, 3.1, 0.3, 12.9, 9.2]], dtype=F64)
    offset = (0.3 * torch.randn(2, 2, 2, 2, dtype=F64)).requires_grad_()
    mask = torch.rand(2, 1, 2, 2, dtype=F64, requires_grad=True)
    fn = deform_ps_roi_pool if position_sensitive else deform_roi_pool

    def f(x, offset, mask):
        return fn(x, rois, offset, 2, 0.25, 2, 0.5, mask=mask)

    with deformconv.use_backend(backend):
        assert torch.autograd.gradgradcheck(f, (x, offset, mask))


@pytest.mark.parametrize("position_sensitive", [False, True])
def test_fast_path_equals_reference_float32(position_sensitive):
    c = 8 * 9 if position_sensitive else 16
    x = torch.randn(2, c, 20, 24, requires_grad=True)
    rois = _rois(40, 2, (96.0, 80.0), dtype=torch.float32)
    offset = (0.2 * torch.randn(40, 2, 3, 3)).requires_grad_()
    mask = torch.rand(40, 1, 3, 3, requires_grad=True)
    fn = deform_ps_roi_pool if position_sensitive else deform_roi_pool
    results = []
    for name in ("reference", "auto"):
        with deformconv.use_backend(name):
            out = fn(x, rois, offset, 3, 0.25, mask=mask)
        grads = torch.autograd.grad(out, (x, offset, mask), torch.ones_like(out))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_empty_rois(backend):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    rois = torch.zeros(0, 5)
    with deformconv.use_backend(backend):
        out = deform_roi_pool(x, rois, torch.zeros(0, 2, 7, 7), mask=torch.zeros(0, 1, 7, 7))
        ps = deform_ps_roi_pool(torch.randn(2, 2 * 49, 5, 6), rois)
    assert out.shape == (0, 3, 7, 7) and ps.shape == (0, 2, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30])
def test_non_finite_offsets_read_zero_and_stay_in_bounds(backend, bad):
    x = torch.randn(1, 3, 6, 7, dtype=F64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 18.0]], dtype=F64)
    offset = torch.zeros(1, 2, 2, 2, dtype=F64)
    offset[0, 0, 0, 0] = bad
    offset[0, 1, 1, 1] = bad
    offset.requires_grad_()
    with deformconv.use_backend(backend):
        out = deform_roi_pool(x, rois, offset, 2, 0.25)
        torch.autograd.grad(out.sum(), (x, offset))  # must not read out of bounds either
    assert torch.equal(out[0, :, 0, 0], torch.zeros(3, dtype=F64))
    assert torch.equal(out[0, :, 1, 1], torch.zeros(3, dtype=F64))
    expected = naive_deform_roi_pool(x, rois, torch.zeros_like(offset), (2, 2), 0.25)
    torch.testing.assert_close(out[0, :, 0, 1], expected[0, :, 0, 1])


def test_non_finite_rois_read_zero(backend):
    x = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, math.nan, 1, 3, 3], [0, 1, 1, math.inf, 3], [0, 0, 0, 4, 4.0]])
    with deformconv.use_backend(backend):
        out = deform_roi_pool(x, rois, output_size=2)
    assert torch.equal(out[:2], torch.zeros(2, 2, 2, 2))
    assert out[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtype(dtype):
    x = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0]])
    offset = 0.1 * torch.randn(1, 2, 3, 3)
    out = deform_roi_pool(x.to(dtype), rois.to(dtype), offset.to(dtype), 3)
    expected = deform_roi_pool(
        x.to(dtype).float(), rois.to(dtype).float(), offset.to(dtype).float(), 3
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


# --- module -----------------------------------------------------------------------------


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_fresh_module_equals_roi_align(backend, modulated, aligned):
    tv = pytest.importorskip("torchvision")
    pool = DeformRoIPool2d(
        (3, 4), 0.25, aligned=aligned, in_channels=5, hidden_features=16, modulated=modulated
    ).double()
    x = torch.randn(2, 5, 10, 12, dtype=F64)
    rois = _rois(8, 2, (48.0, 40.0))
    pool.record = True
    with deformconv.use_backend(backend):
        out = pool(x, rois)
    expected = tv.ops.roi_align(x, rois, (3, 4), 0.25, 0, aligned)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(pool.last_offset, torch.zeros(8, 2, 3, 4, dtype=F64))
    if modulated:
        assert torch.equal(pool.last_mask, torch.ones(8, 1, 3, 4, dtype=F64))


def test_module_records_nothing_by_default():
    pool = DeformRoIPool2d(2, 0.5, in_channels=3, hidden_features=8, modulated=True)
    pool(torch.randn(1, 3, 6, 6), torch.tensor([[0, 1.0, 1, 9, 9]]))
    assert pool.last_offset is None and pool.last_mask is None


@pytest.mark.parametrize("modulated", [False, True])
def test_sigmoid_mask_activation_is_mmcvs_modulation(backend, modulated):
    # mmcv's ModulatedDeformRoIPoolPack, written out: RoIAlign -> offset_fc -> offsets;
    # mask_fc -> sigmoid -> mask; deform_roi_pool(..., offset) * mask. A fresh module halves
    # RoIAlign.
    tv = pytest.importorskip("torchvision")
    pool = DeformRoIPool2d(
        2, 0.5, in_channels=3, hidden_features=8, modulated=modulated, mask_activation="sigmoid"
    ).double()
    x = torch.randn(2, 3, 8, 9, dtype=F64)
    rois = _rois(6, 2, (18.0, 16.0))
    expected = tv.ops.roi_align(x, rois, 2, 0.5, 0, True) * (0.5 if modulated else 1.0)
    with deformconv.use_backend(backend):
        torch.testing.assert_close(pool(x, rois), expected, atol=1e-12, rtol=1e-12)
        with torch.no_grad():
            for p in pool.parameters():
                p.normal_(0, 0.1)
            out = pool(x, rois)
        features = tv.ops.roi_align(x, rois, 2, 0.5, 0, True).reshape(6, -1)
        offset = pool.offset_fc(features).reshape(6, 2, 2, 2)
        mask = torch.sigmoid(pool.mask_fc(features)).reshape(6, 1, 2, 2) if modulated else None
    reference = naive_deform_roi_pool(x, rois, offset, (2, 2), 0.5, 0, 0.1, True, mask)
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=1e-12)


def test_mask_activation_is_validated():
    with pytest.raises(
        ValueError, match=r"mask_activation must be one of \('2sigmoid', 'sigmoid'\)"
    ):
        DeformRoIPool2d(2, 1.0, in_channels=2, modulated=True, mask_activation="relu")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
@pytest.mark.parametrize("modulated", [False, True])
def test_module_scripts_and_equals_eager(backend, modulated):
    pool = DeformRoIPool2d(
        (2, 3), 0.5, in_channels=3, hidden_features=8, modulated=modulated,
        mask_activation="sigmoid" if modulated else "2sigmoid",
    )  # fmt: skip
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0, 0.1)
    scripted = torch.jit.script(pool)
    x = torch.randn(2, 3, 8, 9)
    rois = _rois(6, 2, (18.0, 16.0), dtype=torch.float32)
    with deformconv.use_backend(backend):
        torch.testing.assert_close(scripted(x, rois), pool(x, rois), atol=0, rtol=0)
        with pytest.raises(RuntimeError, match=r"rois\[:, 0\] \(batch index\) must be integers"):
            scripted(x, rois + torch.tensor([5.0, 0, 0, 0, 0]))


def test_module_trains_its_offset_predictor_and_equals_function(backend):
    pool = DeformRoIPool2d(2, 0.5, in_channels=3, hidden_features=8, modulated=True, record=True)
    x = torch.randn(2, 3, 8, 9)
    rois = _rois(6, 2, (18.0, 16.0), dtype=torch.float32)
    with deformconv.use_backend(backend):
        pool(x, rois).square().sum().backward()
        assert pool.offset_fc[4].weight.grad.abs().sum() > 0
        assert pool.mask_fc[2].weight.grad.abs().sum() > 0
        with torch.no_grad():
            pool.offset_fc[4].bias.normal_()
            pool.mask_fc[2].bias.normal_()
            out = pool(x, rois)
            offset, mask = pool.offset_and_mask(x, rois)
            expected = deform_roi_pool(x, rois, offset, 2, 0.5, mask=mask)
    torch.testing.assert_close(out, expected)
    assert mask.min() > 0 and mask.max() < 2


def test_module_repr_and_state_dict_names():
    pool = DeformRoIPool2d(7, 1 / 16, 2, gamma=0.2, in_channels=4, hidden_features=8)
    assert repr(pool).startswith(
        "DeformRoIPool2d(\n  output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=2, "
        "gamma=0.2, in_channels=4, hidden_features=8\n"
    )
    # mmcv DeformRoIPoolPack's parameter names, so its weights load.
    assert sorted(pool.state_dict()) == [
        f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_size": 0}, ValueError, "output_size must be positive"),
        ({"output_size": (7, 7, 7)}, TypeError, "output_size must be an int or a tuple"),
        ({"spatial_scale": 0.0}, ValueError, "spatial_scale must be a positive finite"),
        ({"in_channels": 0}, ValueError, "in_channels must be a positive int"),
        ({"hidden_features": -1}, ValueError, "hidden_features must be a positive int"),
    ],
)
def test_module_bad_hyper_parameters(kwargs, error, match):
    args = {"output_size": 7, "spatial_scale": 0.25, "in_channels": 4} | kwargs
    with pytest.raises(error, match=match):
        DeformRoIPool2d(args.pop("output_size"), args.pop("spatial_scale"), **args)


def test_module_wrong_channels():
    pool = DeformRoIPool2d(2, 1.0, in_channels=4, hidden_features=8)
    with pytest.raises(
        ArgumentError, match=r"in_channels=4, H_in, W_in\); got shape \(1, 3, 5, 5\)"
    ):
        pool(torch.randn(1, 3, 5, 5), torch.tensor([[0, 0, 0, 3, 3.0]]))


# --- errors -----------------------------------------------------------------------------


def _call(fn=deform_roi_pool, **changes):
    args = {
        "input": torch.randn(2, 8, 6, 7),
        "rois": torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 0.0, 3.0, 4.0]]),
        "offset": torch.zeros(2, 2, 2, 2),
        "output_size": 2,
        "spatial_scale": 1.0,
        "sampling_ratio": 0,
        "gamma": 0.1,
        "aligned": True,
        "mask": None,
    } | changes
    return fn(**args)


BAD = {
    "input_not_tensor": ({"input": [1.0]}, TypeError, "deform_roi_pool: input must be a torch.Tensor"),
    "input_int": ({"input": torch.ones(2, 8, 6, 7, dtype=torch.int64)}, TypeError, "input must be a floating-point"),
    "input_3d": ({"input": torch.randn(8, 6, 7)}, ArgumentError, "input must be 4-D; got 3-D"),
    "empty_map": ({"input": torch.randn(2, 8, 0, 7)}, ArgumentError, r"non-empty map \(H_in, W_in >= 1\); got \(0, 7\)"),
    "rois_1d": ({"rois": torch.zeros(5)}, ArgumentError, "rois must be 2-D; got 1-D"),
    "rois_k4": ({"rois": torch.zeros(2, 4)}, ArgumentError, r"rois must have shape \(K, 5\) as \[batch_index, x1, y1, x2, y2\]; got \(2, 4\)"),
    "rois_dtype": ({"rois": torch.zeros(2, 5, dtype=F64)}, ArgumentError, "rois must have the input's dtype torch.float32; got torch.float64"),
    "rois_device": ({"rois": torch.zeros(2, 5, device="meta")}, ArgumentError, "rois must be on the input's device cpu; got meta"),
    "batch_index_high": ({"rois": torch.tensor([[0, 1.0, 1, 5, 5], [2, 0, 0, 3, 4]])}, ArgumentError, r"rois\[:, 0\] \(batch index\) must be integers in \[0, N\) with N=2; got 2.0 at row 1"),
    "batch_index_negative": ({"rois": torch.tensor([[-1, 1.0, 1, 5, 5], [0, 0, 0, 3, 4]])}, ArgumentError, "got -1.0 at row 0"),
    "batch_index_fraction": ({"rois": torch.tensor([[0, 1.0, 1, 5, 5], [0.5, 0, 0, 3, 4]])}, ArgumentError, "got 0.5 at row 1"),
    "batch_index_nan": ({"rois": torch.tensor([[math.nan, 1.0, 1, 5, 5], [0, 0, 0, 3, 4]])}, ArgumentError, "got nan at row 0"),
    "offset_shape": ({"offset": torch.zeros(2, 2, 3, 3)}, ArgumentError, r"offset must have shape \(K, 2, out_h, out_w\)=\(2, 2, 2, 2\); got \(2, 2, 3, 3\)"),
    "offset_k": ({"offset": torch.zeros(3, 2, 2, 2)}, ArgumentError, r"offset must have shape .* got \(3, 2, 2, 2\)"),
    "offset_dtype": ({"offset": torch.zeros(2, 2, 2, 2, dtype=F64)}, ArgumentError, "offset must have the input's dtype"),
    "mask_shape": ({"mask": torch.ones(2, 2, 2, 2)}, ArgumentError, r"mask must have shape \(K, 1, out_h, out_w\)=\(2, 1, 2, 2\); got \(2, 2, 2, 2\)"),
    "mask_device": ({"mask": torch.ones(2, 1, 2, 2, device="meta")}, ArgumentError, "mask must be on the input's device"),
    "output_size_zero": ({"output_size": (2, 0)}, ArgumentError, r"output_size must be positive; got \(2, 0\)"),
    "output_size_float": ({"output_size": 2.5}, TypeError, "output_size must be an int or a tuple of two ints"),
    "scale_zero": ({"spatial_scale": 0.0}, ArgumentError, "spatial_scale must be positive; got 0.0"),
    "scale_negative": ({"spatial_scale": -0.5}, ArgumentError, "spatial_scale must be positive; got -0.5"),
    "scale_nan": ({"spatial_scale": math.nan}, ArgumentError, "spatial_scale must be finite"),
    "scale_str": ({"spatial_scale": "1"}, TypeError, "spatial_scale must be a real number"),
    "sampling_ratio_float": ({"sampling_ratio": 1.5}, TypeError, "sampling_ratio must be an int"),
    "gamma_inf": ({"gamma": math.inf}, ArgumentError, "gamma must be finite"),
    "sampling_ratio_huge": ({"sampling_ratio": 513}, ArgumentError, "sampling_ratio must be at most 512"),
    "offset_shape_before_dtype": ({"offset": torch.zeros(2, 2, 3, 3, dtype=F64)}, ArgumentError, r"offset must have shape .* got \(2, 2, 3, 3\)"),
    "aligned_int": ({"aligned": 1}, TypeError, "aligned must be a bool"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(case):
    changes, error, match = BAD[case]
    with pytest.raises(error, match=match):
        _call(**changes)


@pytest.mark.parametrize("case", [c for c, (_, error, _) in BAD.items() if error is ArgumentError])
@pytest.mark.parametrize("caught", [ValueError, RuntimeError])
def test_shape_errors_are_caught_as_value_and_runtime_error(case, caught):
    # torchvision's roi_align raises RuntimeError for these; we document ValueError.
    changes, _, match = BAD[case]
    with pytest.raises(caught, match=match):
        _call(**changes)


def test_ps_channels_must_be_a_multiple_of_bins():
    with pytest.raises(
        ValueError,
        match=r"deform_ps_roi_pool: input channels C must be a multiple of out_h\*out_w=4 .* got C=6",
    ):
        _call(deform_ps_roi_pool, input=torch.randn(2, 6, 6, 7))


def test_negative_sampling_ratio_is_adaptive_like_torchvision():
    x = torch.randn(1, 2, 9, 9)
    rois = torch.tensor([[0, 0.5, 1.0, 8.0, 7.5]])
    torch.testing.assert_close(
        deform_roi_pool(x, rois, None, 3, sampling_ratio=-1),
        deform_roi_pool(x, rois, None, 3, sampling_ratio=0),
    )
