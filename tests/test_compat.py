"""The peers' modules: names, arguments, state-dict keys, and what they compute.

Each expected value is written out with the peer's own convention (mmcv's ``chunk(3)`` +
``sigmoid`` modulation, detectron2's bare forward followed by norm and activation) on
top of ``torchvision.ops.deform_conv2d`` or the naive RoI-pooling loops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _references import naive_deform_roi_pool
from deformconv.compat import detectron2, mmcv
from deformconv.compat import torchvision as tv_compat

tv = pytest.importorskip("torchvision")
F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _randomise(module: nn.Module) -> nn.Module:
    # Non-zero offset predictors, so the offsets and mask matter; float64 throughout.
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


def _load_strict(module: nn.Module, keys_and_shapes: dict[str, tuple[int, ...]]) -> dict:
    state = {k: torch.randn(shape, dtype=F64) * 0.2 for k, shape in keys_and_shapes.items()}
    module.double().load_state_dict(state, strict=True)
    return state


def test_torchvision_deform_conv2d_matches_torchvision_module():
    theirs = tv.ops.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    ours = tv_compat.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.double()
    ours.double().load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 6, 9, 8, dtype=F64)
    offset = torch.randn(2, 2 * 3 * 3 * 2, 5, 8, dtype=F64)  # 3 offset groups
    mask = torch.rand(2, 3 * 3 * 2, 5, 8, dtype=F64)
    torch.testing.assert_close(ours(x, offset), theirs(x, offset), **TOL)
    torch.testing.assert_close(ours(x, offset, mask), theirs(x, offset, mask), **TOL)
    assert repr(ours).replace("DeformConv2d(", "") == repr(theirs).replace("DeformConv2d(", "")


@pytest.mark.parametrize("bias", [True, False])
def test_torchvision_initialisation_matches(bias):
    torch.manual_seed(3)
    theirs = tv.ops.DeformConv2d(4, 6, 3, bias=bias)
    torch.manual_seed(3)
    ours = tv_compat.DeformConv2d(4, 6, 3, bias=bias)
    for (k1, a), (k2, b) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert k1 == k2
        torch.testing.assert_close(a, b)


def test_mmcv_deform_conv2d():
    layer = mmcv.DeformConv2d(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    state = _load_strict(layer, {"weight": (6, 2, 3, 3)})
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    offset = torch.randn(2, 2 * 2 * 9, 5, 5, dtype=F64)
    expected = tv.ops.deform_conv2d(x, offset, state["weight"], stride=2, padding=1)
    torch.testing.assert_close(layer(x, offset), expected, **TOL)
    assert layer.transposed is False and layer.output_padding == (0,)
    assert "deform_groups=2" in repr(layer)


def test_mmcv_deform_conv2d_pack():
    layer = mmcv.DeformConv2dPack(4, 6, 3, padding=2, dilation=2, deform_groups=2)
    state = _load_strict(
        layer, {"weight": (6, 4, 3, 3), "conv_offset.weight": (36, 4, 3, 3), "conv_offset.bias": (36,)}
    )  # fmt: skip
    x = torch.randn(2, 4, 8, 7, dtype=F64)
    offset = F.conv2d(
        x, state["conv_offset.weight"], state["conv_offset.bias"], padding=2, dilation=2
    )
    expected = tv.ops.deform_conv2d(x, offset, state["weight"], padding=2, dilation=2)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_mmcv_modulated_deform_conv2d():
    layer = mmcv.ModulatedDeformConv2d(4, 6, (3, 2), padding=(1, 0))
    state = _load_strict(layer, {"weight": (6, 4, 3, 2), "bias": (6,)})
    x = torch.randn(2, 4, 6, 7, dtype=F64)
    offset, mask = torch.randn(2, 12, 6, 6, dtype=F64), torch.rand(2, 6, 6, 6, dtype=F64)
    expected = tv.ops.deform_conv2d(
        x, offset, state["weight"], state["bias"], padding=(1, 0), mask=mask
    )
    torch.testing.assert_close(layer(x, offset, mask), expected, **TOL)


@pytest.mark.parametrize("deform_groups", [1, 2])
def test_mmcv_modulated_deform_conv2d_pack(deform_groups):
    layer = mmcv.ModulatedDeformConv2dPack(4, 6, 3, stride=(2, 1), padding=1,
                                           deform_groups=deform_groups)  # fmt: skip
    c = 3 * deform_groups * 9
    state = _load_strict(
        layer,
        {"weight": (6, 4, 3, 3), "bias": (6,), "conv_offset.weight": (c, 4, 3, 3),
         "conv_offset.bias": (c,)},
    )  # fmt: skip
    x = torch.randn(2, 4, 8, 7, dtype=F64)
    # mmcv's forward, written out: chunk(3), cat the two offset thirds, sigmoid the last.
    out = F.conv2d(
        x, state["conv_offset.weight"], state["conv_offset.bias"], stride=(2, 1), padding=1
    )
    o1, o2, m = torch.chunk(out, 3, dim=1)
    expected = tv.ops.deform_conv2d(
        x, torch.cat((o1, o2), dim=1), state["weight"], state["bias"], stride=(2, 1), padding=1,
        mask=torch.sigmoid(m),
    )  # fmt: skip
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_fresh_mmcv_modulated_pack_computes_half_the_conv_as_mmcv():
    layer = mmcv.ModulatedDeformConv2dPack(3, 5, 3, padding=1).double()
    x = torch.randn(1, 3, 6, 6, dtype=F64)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_mmcv_deprecated_deformable_groups_and_bias_rule():
    with pytest.warns(FutureWarning, match="deformable_groups is deprecated"):
        layer = mmcv.ModulatedDeformConv2d(4, 4, 3, deformable_groups=2)
    assert layer.deform_groups == 2
    with pytest.raises(ValueError, match="bias=True is not supported"):
        mmcv.DeformConv2d(4, 4, 3, bias=True)


def test_mmcv_offset_groups_must_match_deform_groups():
    layer = mmcv.DeformConv2d(4, 4, 3, deform_groups=2)
    with pytest.raises(RuntimeError, match=r"offset must have 2\*deform_groups\*K_h\*K_w=36"):
        layer(torch.randn(1, 4, 5, 5), torch.randn(1, 18, 3, 3))


ROIS = torch.tensor([[0.0, 1.5, 2.0, 13.0, 11.0], [1.0, 4.0, 0.0, 9.5, 14.0]], dtype=F64)


def test_mmcv_deform_roi_pool_with_external_offsets():
    pool = mmcv.DeformRoIPool((3, 2), spatial_scale=0.5, sampling_ratio=2, gamma=0.2)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    offset = torch.randn(2, 2, 3, 2, dtype=F64)
    expected = naive_deform_roi_pool(x, ROIS, offset, (3, 2), 0.5, 2, 0.2, aligned=True)
    torch.testing.assert_close(pool(x, ROIS, offset), expected, **TOL)
    expected = tv.ops.roi_align(x, ROIS, (3, 2), 0.5, 2, aligned=True)
    torch.testing.assert_close(pool(x, ROIS), expected, **TOL)


@pytest.mark.parametrize("modulated", [False, True])
def test_mmcv_roi_pool_packs(modulated):
    cls = mmcv.ModulatedDeformRoIPoolPack if modulated else mmcv.DeformRoIPoolPack
    pool = _randomise(cls(2, 3, deform_fc_channels=8, spatial_scale=0.5))
    keys = {"offset_fc.0.weight", "offset_fc.0.bias", "offset_fc.2.weight", "offset_fc.2.bias",
            "offset_fc.4.weight", "offset_fc.4.bias"}  # fmt: skip
    if modulated:
        keys |= {"mask_fc.0.weight", "mask_fc.0.bias", "mask_fc.2.weight", "mask_fc.2.bias"}
    assert set(pool.state_dict()) == keys
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    # mmcv's forward, written out: pool without offsets, the fc heads, pool again, times mask.
    plain = tv.ops.roi_align(x, ROIS, 2, 0.5, 0, aligned=True).reshape(2, -1)
    offset = pool.offset_fc(plain).reshape(2, 2, 2, 2)
    expected = naive_deform_roi_pool(x, ROIS, offset, (2, 2), 0.5, 0, 0.1, aligned=True)
    if modulated:
        expected = expected * torch.sigmoid(
            pool.mask_fc[2](torch.relu(pool.mask_fc[0](plain)))
        ).reshape(2, 1, 2, 2)
    torch.testing.assert_close(pool(x, ROIS), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="input must have output_channels=3 channels; got 4"):
        pool(torch.randn(2, 4, 8, 8, dtype=F64), ROIS)


@pytest.mark.parametrize("with_norm", [False, True])
def test_detectron2_deform_conv(with_norm):
    norm = nn.BatchNorm2d(6).eval() if with_norm else None
    layer = detectron2.DeformConv(4, 6, 3, stride=2, padding=1, deformable_groups=2,
                                  norm=norm, activation=F.relu)  # fmt: skip
    keys = {"weight": (6, 4, 3, 3)}
    if with_norm:
        keys |= {"norm.weight": (6,), "norm.bias": (6,), "norm.running_mean": (6,)}
        keys |= {"norm.running_var": (6,), "norm.num_batches_tracked": ()}
    state = _load_strict(layer, keys)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    offset = torch.randn(2, 36, 5, 5, dtype=F64)
    expected = tv.ops.deform_conv2d(x, offset, state["weight"], stride=2, padding=1)
    if with_norm:
        expected = F.batch_norm(
            expected, state["norm.running_mean"], state["norm.running_var"].abs() + 0.5,
            state["norm.weight"], state["norm.bias"],
        )  # fmt: skip
        with torch.no_grad():
            layer.norm.running_var.copy_(state["norm.running_var"].abs() + 0.5)
    torch.testing.assert_close(layer(x, offset), F.relu(expected), **TOL)


def test_detectron2_modulated_block_convention():
    # detectron2's DeformBottleneckBlock: conv2_offset -> chunk(3) -> cat, sigmoid -> conv2.
    conv2_offset = nn.Conv2d(4, 27, 3, padding=1).double()
    conv2 = _randomise(detectron2.ModulatedDeformConv(4, 6, 3, padding=1, bias=True))
    assert set(conv2.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    ox, oy, m = torch.chunk(conv2_offset(x), 3, dim=1)
    got = conv2(x, torch.cat((ox, oy), dim=1), m.sigmoid())
    expected = tv.ops.deform_conv2d(
        x, torch.cat((ox, oy), dim=1), conv2.weight, conv2.bias, padding=1, mask=m.sigmoid()
    )
    torch.testing.assert_close(got, expected, **TOL)


def test_detectron2_rules_and_empty_batch():
    with pytest.raises(ValueError, match="bias is not supported"):
        detectron2.DeformConv(4, 4, 3, bias=True)
    layer = detectron2.DeformConv(4, 6, 3, padding=1)
    out = layer(torch.randn(0, 4, 5, 5), torch.randn(0, 18, 5, 5))
    assert out.shape == (0, 6, 5, 5)
    assert "deformable_groups=1, bias=False" in repr(layer)
