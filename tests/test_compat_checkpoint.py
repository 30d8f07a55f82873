"""mmdetection / detectron2 DCN ResNet checkpoints into a deformified torchvision ResNet.

The checkpoints are built here in each library's key layout (no downloads), and the
expected block outputs are computed by each library's Bottleneck forward written out
with ``F.conv2d``, ``F.batch_norm`` and ``torchvision.ops.deform_conv2d``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deformconv import DeformConv2d, deformify
from deformconv.compat import convert_resnet_state_dict, load_dcn_resnet

tv = pytest.importorskip("torchvision")
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402

DEFORMABLE = ("layer2", "layer3", "layer4")  # mmdetection's "c3-c5" (stage_with_dcn)


def _small_resnet() -> ResNet:
    return ResNet(Bottleneck, [2, 1, 1, 1], width_per_group=16).double().eval()


def _random_torchvision_state(modulated: bool) -> dict[str, torch.Tensor]:
    """A torchvision-named backbone state with DCN offsets on every conv2 of DEFORMABLE."""
    torch.manual_seed(1)
    state = {}
    for k, v in _small_resnet().state_dict().items():
        if k.startswith("fc."):
            continue
        if k.endswith("num_batches_tracked"):
            state[k] = v
        elif k.endswith("running_var"):
            state[k] = torch.rand_like(v) + 0.5
        else:
            state[k] = torch.randn_like(v) * 0.1
    for k in list(state):
        if k.startswith(DEFORMABLE) and k.endswith(".conv2.weight"):
            c_in = state[k].shape[1]
            c = (27 if modulated else 18) * 1
            state[k.replace(".weight", ".conv_offset.weight")] = (
                torch.randn(c, c_in, 3, 3, dtype=torch.float64) * 0.05
            )
            state[k.replace(".weight", ".conv_offset.bias")] = (
                torch.randn(c, dtype=torch.float64) * 0.3
            )
    return state


def _to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision names -> detectron2's (written from detectron2's ResNet module names)."""
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue  # FrozenBatchNorm2d has none
        parts = k.split(".")
        if parts[0] == "conv1":
            new = "stem.conv1.weight"
        elif parts[0] == "bn1":
            new = f"stem.conv1.norm.{parts[1]}"
        else:
            stage = f"res{int(parts[0][5:]) + 1}.{parts[1]}"
            rest = parts[2:]
            if rest[0] == "downsample":
                new = (
                    f"{stage}.shortcut.weight"
                    if rest[1] == "0"
                    else f"{stage}.shortcut.norm.{rest[2]}"
                )
            elif rest[0].startswith("bn"):
                new = f"{stage}.conv{rest[0][2:]}.norm.{rest[1]}"
            elif rest[1] == "conv_offset":
                new = f"{stage}.{rest[0]}_offset.{rest[2]}"
            else:
                new = f"{stage}.{rest[0]}.{rest[1]}"
        out[f"backbone.bottom_up.{new}"] = v
    out["backbone.fpn_lateral2.weight"] = torch.zeros(8, 64, 1, 1)
    out["roi_heads.box_head.fc1.weight"] = torch.zeros(8, 8)
    return out


def _bn(x, s, p):
    return F.batch_norm(
        x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"]
    )


def _bottleneck(s, p, x, stride, stride_in_1x1, modulated):
    """mmdetection's / detectron2's Bottleneck with a DCN conv2, in eval mode."""
    s1, s2 = (stride, 1) if stride_in_1x1 else (1, stride)
    out = F.relu(_bn(F.conv2d(x, s[f"{p}.conv1.weight"], stride=s1), s, f"{p}.bn1"))
    raw = F.conv2d(out, s[f"{p}.conv2.conv_offset.weight"], s[f"{p}.conv2.conv_offset.bias"],
                   stride=s2, padding=1)  # fmt: skip
    if modulated:
        o1, o2, m = torch.chunk(raw, 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(m)
    else:
        offset, mask = raw, None
    out = tv.ops.deform_conv2d(out, offset, s[f"{p}.conv2.weight"], stride=s2, padding=1, mask=mask)
    out = F.relu(_bn(out, s, f"{p}.bn2"))
    out = _bn(F.conv2d(out, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in s:
        x = _bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
    return F.relu(out + x)


def _check_model(model, state, *, stride_in_1x1, modulated):
    names = [n for n, m in model.named_modules() if isinstance(m, DeformConv2d)]
    assert sorted(names) == sorted(
        k[: -len(".conv_offset.weight")] for k in state if "conv_offset.weight" in k
    )
    assert all(model.get_submodule(n).mask_activation == "sigmoid" for n in names)
    # Round trip: every tensor of the checkpoint is in the model under its torchvision name.
    got = model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    # And it computes what the source computed, block by block.
    model.eval()
    x = torch.randn(2, 64, 12, 12, dtype=torch.float64) * 0.5
    with torch.no_grad():
        x = model.layer1(x)
        for layer in DEFORMABLE:
            for i, block in enumerate(model.get_submodule(layer)):
                stride = 2 if i == 0 else 1
                expected = _bottleneck(state, f"{layer}.{i}", x, stride, stride_in_1x1, modulated)
                x = block(x)
                torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("modulated", [True, False])
def test_mmdetection_checkpoint(modulated):
    state = _random_torchvision_state(modulated)
    checkpoint = {
        "meta": {"epoch": 12},
        "state_dict": {f"backbone.{k}": v for k, v in state.items()},
    }
    checkpoint["state_dict"]["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 8, 1, 1)
    model = load_dcn_resnet(_small_resnet(), checkpoint)
    _check_model(model, state, stride_in_1x1=False, modulated=modulated)


@pytest.mark.parametrize("modulated", [True, False])
def test_detectron2_checkpoint(modulated):
    state = _random_torchvision_state(modulated)
    checkpoint = {"model": {k: v.numpy() for k, v in _to_detectron2(state).items()}}  # as a .pkl
    model = load_dcn_resnet(_small_resnet(), checkpoint)  # stride in 1x1: detectron2's default
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    _check_model(model, state, stride_in_1x1=True, modulated=modulated)


def test_detectron2_torchvision_style_strides():
    state = _random_torchvision_state(True)
    model = load_dcn_resnet(
        _small_resnet(), _to_detectron2(state), "detectron2", stride_in_1x1=False
    )
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    _check_model(model, state, stride_in_1x1=False, modulated=True)


def test_convert_keys_detectron2():
    state = _random_torchvision_state(True)
    converted = convert_resnet_state_dict(_to_detectron2(state))
    assert set(converted) == {k for k in state if not k.endswith("num_batches_tracked")}


def test_already_deformified_model_loads_and_gets_the_sigmoid_mask():
    state = _random_torchvision_state(True)
    names = sorted(k[: -len(".conv_offset.weight")] for k in state if "conv_offset.weight" in k)
    model = deformify(_small_resnet(), names=names, modulated=True)
    load_dcn_resnet(model, {f"backbone.{k}": v for k, v in state.items()}, "mmdet")
    assert model.get_submodule(names[0]).mask_activation == "sigmoid"
    wrong = deformify(_small_resnet(), names=names[:1], modulated=False)
    with pytest.raises(
        ValueError, match="modulated=False; the checkpoint has offset_groups=1, modulated=True"
    ):
        load_dcn_resnet(wrong, state, "mmdet")


def test_checkpoint_that_does_not_fit_raises():
    state = _random_torchvision_state(False)
    state["layer4.0.conv9.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['layer4.0.conv9.weight'\]"):
        load_dcn_resnet(_small_resnet(), state, "mmdet")
    del state["layer4.0.conv9.weight"], state["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"missing \['layer1.0.conv1.weight'\]"):
        load_dcn_resnet(_small_resnet(), state, "mmdet")
    with pytest.raises(ValueError, match="cannot tell the layout"):
        load_dcn_resnet(_small_resnet(), {"head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        convert_resnet_state_dict(state, "timm")


def test_offset_channels_that_fit_nothing_raise():
    state = _random_torchvision_state(False)
    state["layer4.0.conv2.conv_offset.weight"] = torch.zeros(20, 64, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'layer4.0.conv2' has 20 offset channels"):
        load_dcn_resnet(_small_resnet(), state, "mmdet")


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module; got dict"):
        load_dcn_resnet({}, {})
