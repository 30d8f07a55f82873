"""Tracing through stacked layers vs a brute-force loop; effective dilation on known cases."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from deformconv import DeformConv2d
from deformconv.analysis import (
    REGIONS,
    area_terciles,
    assign_units,
    effective_dilation,
    layer_effective_dilation,
    plot_offset_field,
    plot_sampling_locations,
    region_statistics,
    sampling_field,
    size_buckets,
    trace_sampling_locations,
)


def _randomise_offsets(layer, scale=1.5):
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, scale)
        layer.conv_offset.bias.normal_(0, scale)


def _field_value(field, c, y, x):
    """Scalar bilinear interpolation with border clamping, written out by hand."""
    h, w = field.shape[1:]
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    f = field[c].double().numpy()
    return (
        f[y0, x0] * (1 - ly) * (1 - lx)
        + f[y0, x1] * (1 - ly) * lx
        + f[y1, x0] * ly * (1 - lx)
        + f[y1, x1] * ly * lx
    )


def _brute_force(layers, unit, sample=0):
    """Recursive loops over every kernel point of every layer, last layer first."""
    out = []

    def visit(depth, y, x, weight):
        if depth < 0:
            out.append((y, x, weight))
            return
        layer = layers[depth]
        k_h, k_w = layer.kernel_size
        offset = layer.last_offset[sample]
        mask = None if layer.last_mask is None else layer.last_mask[sample]
        for i in range(k_h):
            for j in range(k_w):
                k = i * k_w + j
                dy = _field_value(offset, 2 * k, y, x)
                dx = _field_value(offset, 2 * k + 1, y, x)
                m = 1.0 if mask is None else _field_value(mask, k, y, x)
                ny = y * layer.stride[0] - layer.padding[0] + i * layer.dilation[0] + dy
                nx = x * layer.stride[1] - layer.padding[1] + j * layer.dilation[1] + dx
                visit(depth - 1, ny, nx, weight * m)

    visit(len(layers) - 1, float(unit[0]), float(unit[1]), 1.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("modulated", [False, True])
def test_tracing_matches_brute_force(modulated):
    layers = nn.Sequential(
        DeformConv2d(2, 3, 3, padding=1, modulated=modulated),
        DeformConv2d(3, 3, 3, stride=2, padding=2, dilation=2, modulated=modulated),
        DeformConv2d(3, 2, (2, 3), padding=(0, 1), modulated=modulated),
    )
    for layer in layers:
        _randomise_offsets(layer)
    layers(torch.randn(2, 2, 9, 8))
    points, weights = trace_sampling_locations(list(layers), unit=(2, 3), sample=1)
    expected = _brute_force(list(layers), (2, 3), sample=1)
    assert points.shape == (6 * 9 * 9, 2)
    torch.testing.assert_close(points, expected[:, :2])
    torch.testing.assert_close(weights, expected[:, 2])
    assert modulated or bool((weights == 1).all())


def test_tracing_729_points_and_plain_convs_count_as_zero_offsets():
    convs = [nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)]
    deform = [DeformConv2d.from_conv(c) for c in convs]
    nn.Sequential(*deform)(torch.randn(1, 1, 10, 10))
    p_deform, _ = trace_sampling_locations(deform, unit=(5, 5))
    p_mixed, _ = trace_sampling_locations([convs[0], convs[1], deform[2]], unit=(5, 5))
    assert p_deform.shape == (729, 2)
    torch.testing.assert_close(p_deform, p_mixed)
    # zero offsets: the 7x7 window around the unit, centre sampled 3*3*3... times
    assert set(map(tuple, p_deform.long().tolist())) == {
        (y, x) for y in range(2, 9) for x in range(2, 9)
    }


def test_tracing_errors():
    layer = DeformConv2d(1, 1, 3, padding=1)
    with pytest.raises(ValueError, match="run a forward pass first"):
        trace_sampling_locations([layer], unit=(0, 0))
    layer(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="unit must lie in the 4x4 output; got \\(4, 0\\)"):
        trace_sampling_locations([layer], unit=(4, 0))
    with pytest.raises(ValueError, match="sample must be in \\[0, 1\\); got 1"):
        sampling_field(layer, sample=1)
    with pytest.raises(ValueError, match="layers must not be empty"):
        trace_sampling_locations([], unit=(0, 0))
    with pytest.raises(TypeError, match="got ReLU"):
        sampling_field(nn.ReLU())


def _brute_force_dilation(offset, k_h, k_w, d_h, d_w):
    n, c, h, w = offset.shape
    out = np.zeros((n, c // (2 * k_h * k_w), h, w))
    for b in range(n):
        for g in range(out.shape[1]):
            for yy in range(h):
                for xx in range(w):

                    def pos(i, j, b=b, g=g, yy=yy, xx=xx):
                        ch = 2 * (g * k_h * k_w + i * k_w + j)
                        return (
                            i * d_h + offset[b, ch, yy, xx].item(),
                            j * d_w + offset[b, ch + 1, yy, xx].item(),
                        )

                    dists = []
                    for i in range(k_h):
                        for j in range(k_w):
                            if j + 1 < k_w:
                                dists.append(math.dist(pos(i, j), pos(i, j + 1)))
                            if i + 1 < k_h:
                                dists.append(math.dist(pos(i, j), pos(i + 1, j)))
                    out[b, g, yy, xx] = sum(dists) / len(dists)
    return torch.from_numpy(out)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_zero_offsets_give_the_dilation(d):
    out = effective_dilation(torch.zeros(2, 36, 3, 4), 3, dilation=d)
    assert out.shape == (2, 2, 3, 4)
    torch.testing.assert_close(out, torch.full_like(out, float(d)))


def test_known_configurations():
    # non-square dilation: 6 horizontal pairs at 3, 6 vertical pairs at 2
    assert effective_dilation(torch.zeros(1, 18, 1, 1), 3, (2, 3)).item() == pytest.approx(2.5)
    # a common shift of every kernel point changes nothing
    shift = torch.tensor([0.7, -1.3]).repeat(9).reshape(1, 18, 1, 1)
    assert effective_dilation(shift, 3, 2).item() == pytest.approx(2.0)
    # offsets p_k * s stretch the grid: dilation 1 becomes 1 + s
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1)
    stretch = (grid.reshape(1, 18, 1, 1)) * 1.5
    assert effective_dilation(stretch, 3, 1).item() == pytest.approx(2.5)
    # a 1x3 kernel has only horizontal pairs
    assert effective_dilation(torch.zeros(1, 6, 1, 1), (1, 3), (5, 2)).item() == 2.0


def test_random_offsets_match_brute_force():
    offset = torch.randn(2, 2 * 2 * 6, 3, 2, dtype=torch.float64) * 2
    out = effective_dilation(offset, (2, 3), (1, 2))
    torch.testing.assert_close(out, _brute_force_dilation(offset, 2, 3, 1, 2))


def test_layer_effective_dilation_and_errors():
    layer = DeformConv2d(2, 2, 3, padding=2, dilation=2)
    _randomise_offsets(layer)
    layer(torch.randn(1, 2, 5, 5))
    torch.testing.assert_close(
        layer_effective_dilation(layer),
        _brute_force_dilation(layer.last_offset, 3, 3, 2, 2).float(),
    )
    with pytest.raises(ValueError, match="more than one point"):
        effective_dilation(torch.zeros(1, 2, 1, 1), 1)
    with pytest.raises(ValueError, match="K_h\\*K_w=9; got shape \\(1, 17, 1, 1\\)"):
        effective_dilation(torch.zeros(1, 17, 1, 1), 3)
    with pytest.raises(TypeError, match="must be a DeformConv2d; got Conv2d"):
        layer_effective_dilation(nn.Conv2d(1, 1, 3))


def test_plots_draw_something(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, axes = plt.subplots(1, 2)
    points = torch.rand(729, 2) * 8
    plot_sampling_locations(
        torch.rand(32, 32), points, torch.rand(729), (16, 16), scale=4, ax=axes[0]
    )
    plot_offset_field(torch.rand(32, 32), torch.randn(18, 8, 8), scale=4, ax=axes[1], title="t")
    fig.savefig(tmp_path / "a.png")
    plt.close(fig)
    image = plt.imread(tmp_path / "a.png")
    assert image[..., :3].std() > 0.05


# --- the paper's protocol: size buckets, unit-to-box assignment, statistics per region ---


def test_rotated_grid_keeps_its_dilation():
    """Offsets that rotate a dilation-2 grid by 30 degrees about its centre: still 2.0."""
    a = math.radians(30)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1)
    p = (grid.reshape(9, 2) - 1) * 2  # dilation-2 positions relative to the centre
    offset = (p @ rot.T - p).reshape(1, 18, 1, 1)
    assert effective_dilation(offset, 3, 2).item() == pytest.approx(2.0)


def test_offsets_emulating_dilation_4_on_a_dilation_2_layer():
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1)
    offset = ((grid - 1) * 2).reshape(1, 18, 1, 1).expand(2, 18, 5, 5)  # 2 -> 4
    torch.testing.assert_close(effective_dilation(offset, 3, 2), torch.full((2, 1, 5, 5), 4.0))


def test_area_terciles_match_numpy_quantiles():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 50
    wh = torch.rand(40, 2, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    b = boxes.double().numpy()
    expected = np.quantile((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), [1 / 3, 2 / 3])
    torch.testing.assert_close(area_terciles(boxes), torch.from_numpy(expected).float())


def test_size_buckets_split_at_the_terciles():
    sides = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # areas 1, 4, 9, 16, 25, 36
    boxes = torch.tensor([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in sides])
    buckets = size_buckets(boxes, area_terciles(boxes))  # terciles 7.33 and 19
    assert buckets.tolist() == [0, 0, 1, 1, 2, 2]
    assert size_buckets(boxes, torch.tensor([4.0, 25.0])).tolist() == [0, 1, 1, 1, 2, 2]


def _assign_by_hand(boxes, buckets, h, w, stride):
    out = []
    for i in range(h):
        row = []
        for j in range(w):
            y, x = i * stride, j * stride
            holding = [
                ((b[2] - b[0]) * (b[3] - b[1]), k)
                for k, b in enumerate(boxes.tolist())
                if b[0] <= x < b[2] and b[1] <= y < b[3]
            ]
            row.append(int(buckets[min(holding)[1]]) if holding else 3)
        out.append(row)
    return out


def test_units_go_to_the_smallest_box_holding_their_centre():
    # a hand-built 64x64 scene at stride 8: a large box, a small box inside it, a medium
    # box overlapping the large one, and a box whose edges fall exactly on unit centres
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 40.0],  # large
            [15.0, 15.0, 26.0, 26.0],  # small, inside the large one: holds (16,16), (24,24)
            [32.0, 32.0, 56.0, 48.0],  # medium, overlaps the large one at (32, 32)
            [56.0, 0.0, 57.0, 9.0],  # small: x1 = 56 holds column 7; y2 = 9 > 8 holds row 1
        ]
    )
    buckets = torch.tensor([2, 0, 1, 0])
    regions = assign_units(boxes, buckets, (8, 8), stride=8)
    expected = [
        [2, 2, 2, 2, 2, 3, 3, 0],
        [2, 2, 2, 2, 2, 3, 3, 0],
        [2, 2, 0, 0, 2, 3, 3, 3],
        [2, 2, 0, 0, 2, 3, 3, 3],
        [2, 2, 2, 2, 1, 1, 1, 3],
        [3, 3, 3, 3, 1, 1, 1, 3],
        [3, 3, 3, 3, 3, 3, 3, 3],
        [3, 3, 3, 3, 3, 3, 3, 3],
    ]
    assert regions.tolist() == expected
    assert _assign_by_hand(boxes, buckets, 8, 8, 8) == expected


def test_assignment_matches_a_loop_on_random_boxes():
    g = torch.Generator().manual_seed(1)
    xy = torch.randint(0, 60, (12, 2), generator=g).float()
    wh = torch.randint(1, 40, (12, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], dim=1)
    buckets = torch.randint(0, 3, (12,), generator=g)
    regions = assign_units(boxes, buckets, (10, 9), stride=7, origin=3)
    shifted = boxes - 3  # origin 3: unit centres at 3 + 7i
    assert regions.tolist() == _assign_by_hand(shifted, buckets, 10, 9, 7)
    assert (assign_units(boxes[:0], buckets[:0], (2, 3), stride=8) == 3).all()


def test_region_statistics_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 10.0, 6.0]])
    regions = torch.tensor([[0, 0, 2], [2, 3, 2]])
    stats = {s["bucket"]: s for s in region_statistics(values, regions)}
    assert stats["small"]["mean"] == 1.5 and stats["small"]["count"] == 2
    assert stats["small"]["std"] == pytest.approx(math.sqrt(0.5))
    assert stats["large"]["mean"] == pytest.approx(13 / 3)
    assert stats["medium"]["count"] == 0 and math.isnan(stats["medium"]["mean"])
    assert stats["background"]["mean"] == 10.0 and math.isnan(stats["background"]["std"])
    assert [s["bucket"] for s in region_statistics(values, regions)] == list(REGIONS)


def test_protocol_errors():
    with pytest.raises(ValueError, match=r"boxes must be \(M, 4\)"):
        area_terciles(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least one box"):
        area_terciles(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="buckets must have shape"):
        assign_units(torch.zeros(2, 4), torch.zeros(3), (2, 2), stride=8)
    with pytest.raises(ValueError, match="same shape"):
        region_statistics(torch.zeros(3), torch.zeros(4, dtype=torch.long))
