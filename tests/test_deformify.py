"""deformify: selection, equivalence with the unconverted model, bookkeeping, errors."""

import copy

import pytest
import torch
from torch import nn

import deformconv
from deformconv import DeformConv2d, deformify
from deformconv.models import spatial_convs

torchvision = pytest.importorskip("torchvision")


def _assert_same_outputs(model, x, **kwargs):
    model.eval()
    with torch.no_grad():
        before = model(x)
    converted = deformify(copy.deepcopy(model), **kwargs)
    with torch.no_grad():
        after = converted(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    return converted


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_equivalence_and_selection(arch):
    model = getattr(torchvision.models, arch)()  # random weights, nothing downloaded
    converted = _assert_same_outputs(model, torch.randn(2, 3, 64, 64))
    if arch == "resnet50":
        expected = ["layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    else:
        expected = ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert converted.deformified == expected
    deformable = [n for n, m in converted.named_modules() if isinstance(m, DeformConv2d)]
    assert deformable == expected


def test_resnet50_last3_is_layer4_3x3_convs_by_tracing_too():
    model = torchvision.models.resnet50()
    names = spatial_convs(model, torch.randn(1, 3, 32, 32))
    assert names[-3:] == ["layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    convs = dict(model.named_modules())
    assert all(convs[n].kernel_size == (3, 3) for n in names[-3:])


class _Branchy(nn.Module):
    """Registration order differs from forward order; strided, dilated, grouped convs."""

    def __init__(self):
        super().__init__()
        # registered first, runs last
        self.late = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.early = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.point = nn.Conv2d(8, 8, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding="same", bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn(self.early(x)))
        x = self.mid(self.point(x))
        return self.late(x)


def test_custom_module_forward_order_by_tracing():
    model = _Branchy()
    x = torch.randn(2, 3, 12, 10)
    assert spatial_convs(model) == ["late", "early", "mid"]
    assert spatial_convs(model, x) == ["early", "mid", "late"]
    converted = _assert_same_outputs(model, x, last=2, example_input=x)
    assert converted.deformified == ["mid", "late"]
    assert isinstance(converted.early, nn.Conv2d) and isinstance(converted.late, DeformConv2d)


@pytest.mark.parametrize("modulated", [False, True])
def test_custom_module_all_kinds_convert(modulated):
    model = _Branchy()
    x = torch.randn(2, 3, 12, 10)
    converted = _assert_same_outputs(
        model, x, names=["early", "mid", "late"], modulated=modulated, offset_groups=1
    )
    assert converted.late.dilation == (2, 2) and converted.late.groups == 2
    assert converted.early.stride == (2, 1) and converted.early.kernel_size == (3, 5)
    assert converted.mid.bias is None and converted.mid.padding == (1, 1)
    assert converted.late.modulated is modulated


def test_tracing_pass_leaves_batchnorm_stats_and_modes_alone():
    model = _Branchy().train()
    stats = model.bn.running_mean.clone()
    deformify(model, last=1, example_input=torch.randn(2, 3, 12, 10))
    torch.testing.assert_close(model.bn.running_mean, stats)
    assert model.training and model.bn.training and model.late.training


def test_keeps_dtype_device_mode_and_weights():
    model = nn.Sequential(nn.Conv2d(2, 4, 3)).double().eval()
    weight = model[0].weight.detach().clone()
    out = deformify(model, last=1, offset_groups=2)
    layer = out[0]
    assert out is model and isinstance(layer, DeformConv2d)
    assert layer.weight.dtype == torch.float64 and not layer.training
    assert layer.offset_groups == 2 and layer.conv_offset.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight, weight)


def test_shared_conv_is_replaced_everywhere():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    deformify(model, last=1)
    assert isinstance(model[0], DeformConv2d) and model[0] is model[2]


def test_root_conv_is_returned_converted():
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(1, 3, 7, 7)
    layer = deformify(conv, last=1)
    assert isinstance(layer, DeformConv2d) and layer.deformified == [""]
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_existing_deformable_layers_are_not_candidates():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DeformConv2d(4, 4, 3))
    assert spatial_convs(model) == ["0"]
    with pytest.raises(TypeError, match="inside a DeformConv2d"):
        deformify(model, names=["1.conv_offset"])


def test_logs_what_it_converted(caplog):
    with caplog.at_level("INFO", logger="deformconv"):
        deformify(nn.Sequential(nn.Conv2d(3, 4, 3)), last=1)
    assert "converted 1 convolution(s): 0" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"last": 0}, ValueError, "last must be a positive int; got 0"),
        ({"last": 4}, ValueError, "last=4 but model has only 2 spatial convolutions"),
        ({"names": ["nope"]}, ValueError, "'nope', which is not a module"),
        ({"names": ["1"]}, TypeError, "names must name nn.Conv2d modules.*'1' is a ReLU"),
        ({"names": "0"}, TypeError, "names must be a sequence"),
        ({"names": ["0"], "offset_groups": 2}, ValueError, "cannot convert '0'.*offset_groups=2"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(error, match=match):
        deformify(model, **kwargs)
    assert not any(isinstance(m, DeformConv2d) for m in model.modules())


def test_circular_padding_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match="cannot convert '0'.*padding_mode"):
        deformify(model, last=1)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module; got int"):
        deformconv.deformify(3)


class _Conv2dSame(nn.Conv2d):
    """Like timm's Conv2dSame: pads by the input's size in forward (TF 'SAME')."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(ih // -self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(iw // -self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation)


def test_predicate_selects_by_name_and_module():
    model = torchvision.models.resnet18()
    converted = _assert_same_outputs(
        model, torch.randn(1, 3, 64, 64),
        predicate=lambda name, conv: name.startswith("layer3") and conv.stride == (1, 1),
    )  # fmt: skip
    assert converted.deformified == ["layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]


def test_predicate_sees_only_spatial_plain_convs():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Conv2dSame(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3))
    seen = []
    deformify(model, predicate=lambda name, conv: seen.append(name) or True)
    assert seen == ["2"] and model.deformified == ["2"]


def test_predicate_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="predicate selected no spatial nn.Conv2d"):
        deformify(model, predicate=lambda name, conv: False)
    with pytest.raises(ValueError, match="give names or predicate, not both"):
        deformify(model, names=["0"], predicate=lambda name, conv: True)


@pytest.mark.parametrize("kwargs", [{"last": 1}, {"names": ["1"]}])
def test_conv_subclass_with_own_forward_is_refused(kwargs):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Conv2dSame(4, 4, 3, stride=2))
    with pytest.raises(
        TypeError, match="cannot convert '1'.*_Conv2dSame overrides nn.Conv2d's forward"
    ):
        deformify(model, **kwargs)
    assert isinstance(model[1], _Conv2dSame)


def test_conv_subclass_without_own_forward_is_converted():
    class Tagged(nn.Conv2d):
        pass

    model = nn.Sequential(Tagged(3, 4, 3, padding=1))
    _assert_same_outputs(model, torch.randn(1, 3, 8, 8), last=1)


def test_mask_activation_and_record_reach_the_new_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    deformify(model, last=2, modulated=True, mask_activation="sigmoid", record=True)
    assert [(m.mask_activation, m.record) for m in model] == [("sigmoid", True)] * 2
