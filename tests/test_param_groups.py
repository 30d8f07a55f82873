"""param_groups: a partition of the parameters, with the offset predictors' rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deformconv import DeformConv2d, DeformRoIPool2d, param_groups
from deformconv.compat import detectron2, mmcv


class _Block(nn.Module):
    # A detectron2-style block: the offset conv is a sibling of the deformable conv.
    def __init__(self) -> None:
        super().__init__()
        self.conv2_offset = nn.Conv2d(4, 18, 3, padding=1)
        self.conv2 = detectron2.DeformConv(4, 4, 3, padding=1, norm=nn.BatchNorm2d(4))


def _model() -> nn.Module:
    shared = nn.Conv2d(4, 4, 1)
    return nn.ModuleDict({
        "stem": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
        "dcn": DeformConv2d(4, 4, 3, modulated=True),
        "pack": mmcv.ModulatedDeformConv2dPack(4, 4, 3),
        "block": _Block(),
        "roi": DeformRoIPool2d(2, 1.0, in_channels=4, hidden_features=8, modulated=True),
        "mmcv_roi": mmcv.ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8),
        "a": shared, "b": shared,
    })  # fmt: skip


def _ids(params):
    return {id(p) for p in params}


def test_groups_partition_the_parameters():
    model = _model()
    groups = param_groups(model, lr=1.0)
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every))  # no parameter twice (the shared conv included)
    assert set(every) == _ids(model.parameters())


def test_which_parameters_go_where():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, lr=1.0)}
    offset = [model["dcn"].conv_offset, model["pack"].conv_offset, model["block"].conv2_offset]
    roi = [model["roi"].offset_fc, model["roi"].mask_fc, model["mmcv_roi"].offset_fc,
           model["mmcv_roi"].mask_fc]  # fmt: skip
    assert _ids(groups["offset"]["params"]) == _ids(p for m in offset for p in m.parameters())
    assert _ids(groups["roi_offset"]["params"]) == _ids(p for m in roi for p in m.parameters())
    assert id(model["dcn"].weight) in _ids(groups["decay"]["params"])
    assert id(model["block"].conv2.norm.weight) in _ids(groups["no_decay"]["params"])
    assert all(p.dim() > 1 for p in groups["decay"]["params"])
    assert all(p.dim() <= 1 for p in groups["no_decay"]["params"])


def test_rates_and_decay():
    groups = param_groups(
        _model(), lr=0.5, offset_lr_mult=0.1, roi_offset_lr_mult=0.01, weight_decay=1e-4
    )
    got = {g["name"]: (g["lr"], g["lr_mult"], g["weight_decay"]) for g in groups}
    assert got == {
        "decay": (0.5, 1.0, 1e-4),
        "no_decay": (0.5, 1.0, 0.0),
        "offset": (pytest.approx(0.05), 0.1, 0.0),
        "roi_offset": (pytest.approx(0.005), 0.01, 0.0),
    }
    # roi_offset_lr_mult defaults to offset_lr_mult
    groups = {g["name"]: g for g in param_groups(_model(), lr=1.0, offset_lr_mult=0.2)}
    assert groups["roi_offset"]["lr"] == pytest.approx(0.2)


def test_optimizer_steps_offsets_at_their_rate():
    layer = DeformConv2d(2, 2, 3, padding=1)
    opt = torch.optim.SGD(param_groups(layer, lr=1.0, offset_lr_mult=0.1))
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    before = layer.conv_offset.bias.clone(), layer.weight.clone()
    opt.step()
    torch.testing.assert_close(layer.conv_offset.bias, before[0] - 0.1)
    torch.testing.assert_close(layer.weight, before[1] - 1.0)


def test_empty_groups_are_left_out():
    names = [g["name"] for g in param_groups(nn.Conv2d(2, 2, 3), lr=1.0)]
    assert names == ["decay", "no_decay"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": -1.0}, "lr must be a non-negative number; got -1.0"),
     ({"lr": 1.0, "offset_lr_mult": True}, "offset_lr_mult must be a non-negative number")],
)  # fmt: skip
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        param_groups(nn.Conv2d(2, 2, 3), **kwargs)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        param_groups([], lr=1.0)
