"""DeformConv2d: equals the conv it replaces when fresh, trains, and reports its offsets."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deformconv
from deformconv import DeformConv2d

LAYERS = {
    "plain": {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
    "strided_rect": {"in_channels": 4, "out_channels": 4, "kernel_size": (3, 2), "stride": (2, 1)},
    "dilated_grouped": {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 2,
                        "dilation": 2, "groups": 2},
    "no_bias": {"in_channels": 2, "out_channels": 5, "kernel_size": 3, "bias": False},
}  # fmt: skip


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("offset_groups", [1, 2])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fresh_layer_equals_conv2d(backend, name, offset_groups, modulated):
    args = LAYERS[name]
    if args["in_channels"] % offset_groups:
        pytest.skip("offset_groups must divide in_channels")
    layer = DeformConv2d(**args, offset_groups=offset_groups, modulated=modulated).double()
    x = torch.randn(2, args["in_channels"], 9, 8, dtype=torch.float64)
    with deformconv.use_backend(backend):
        out = layer(x)
    expected = F.conv2d(
        x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 4, (1, 3), stride=(2, 1), padding=(0, 1), bias=False),
        nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3),
        nn.Conv2d(4, 2, 2, padding="valid"),
    ],
    ids=["plain", "strided_nobias", "same_dilated_grouped", "valid"],
)
@pytest.mark.parametrize("modulated", [False, True])
def test_from_conv_equals_conv(backend, conv, modulated):
    conv = conv.double().eval()
    layer = DeformConv2d.from_conv(conv, modulated=modulated, offset_groups=2)
    assert not layer.training
    assert layer.weight.dtype == torch.float64
    x = torch.randn(3, conv.in_channels, 10, 7, dtype=torch.float64)
    with deformconv.use_backend(backend):
        out = layer(x)
    torch.testing.assert_close(out, conv(x), atol=1e-12, rtol=1e-12)
    # The copy is independent: changing the layer does not touch the conv.
    with torch.no_grad():
        layer.weight.add_(1)
    assert not torch.equal(layer.weight, conv.weight)


def test_from_conv_rejects_unsupported():
    with pytest.raises(
        ValueError, match=re.escape("conv.padding_mode must be 'zeros'; got 'reflect'")
    ):
        DeformConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding='same' needs an even dilation"):
        DeformConv2d.from_conv(nn.Conv2d(2, 2, 2, padding="same"))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d; got Linear"):
        DeformConv2d.from_conv(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": 3}, "groups=3 must divide in_channels=4 and out_channels=6"),
        ({"offset_groups": 3}, "offset_groups=3 must divide in_channels=4"),
        ({"stride": 0}, "stride must be >= 1; got (0, 0)"),
        ({"padding": (1, -1)}, "padding must be >= 0; got (1, -1)"),
        ({"kernel_size": 0}, "kernel_size must be >= 1; got (0, 0)"),
        ({"in_channels": 0}, "in_channels must be a positive int; got 0"),
    ],
)
def test_layer_rejects_bad_hyperparameters(kwargs, message):
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match="^DeformConv2d: " + re.escape(message)):
        DeformConv2d(**args)


def test_layer_rejects_bad_input():
    layer = DeformConv2d(4, 6, 3)
    with pytest.raises(
        ValueError, match=re.escape("input must have in_channels=4 channels; got 3")
    ):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="input must be 4-D; got 3-D"):
        layer(torch.randn(4, 8, 8))


def test_repr_shows_non_default_arguments():
    text = repr(DeformConv2d(16, 32, 3, padding=1, offset_groups=2, modulated=True, bias=False))
    assert (
        "DeformConv2d(\n  16, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False, "
        in text
    )
    assert "offset_groups=2, modulated=True" in text
    assert "(conv_offset): Conv2d(16, 54, kernel_size=(3, 3)" in text


def test_last_offset_and_mask_are_what_was_used(backend):
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=True, offset_groups=2, record=True).double()
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with deformconv.use_backend(backend):
        out = layer(x)
    assert layer.last_offset.shape == (2, 36, 7, 7) and layer.last_mask.shape == (2, 18, 7, 7)
    assert not layer.last_offset.requires_grad
    assert ((layer.last_mask > 0) & (layer.last_mask < 2)).all()
    # Recomputing the op with the recorded tensors gives the layer's output.
    with deformconv.use_backend("reference"):
        again = deformconv.deform_conv2d(
            x, layer.last_offset, layer.weight, layer.bias, padding=1, mask=layer.last_mask
        )
    torch.testing.assert_close(out, again)


def test_module_and_parameters_follow_device_and_dtype():
    layer = DeformConv2d(2, 2, 3, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}


def test_tiny_model_trains(backend):
    # Two deformable layers learn to tell a centred blob from a corner blob; the loss must fall
    # and the offset predictors must move away from zero.
    torch.manual_seed(0)
    n = 64
    images = torch.zeros(n, 1, 12, 12)
    labels = torch.randint(0, 2, (n,))
    for i in range(n):
        r, c = (5, 5) if labels[i] else (1 + int(torch.randint(0, 2, ())), 8)
        images[i, 0, r : r + 3, c : c + 3] = 1.0
    model = nn.Sequential(
        DeformConv2d(1, 8, 3, padding=1, modulated=True), nn.ReLU(),
        DeformConv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with deformconv.use_backend(backend):
        for _ in range(40):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model[0].conv_offset.weight.abs().sum() > 0


def test_nothing_is_recorded_by_default():
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=True)
    layer(torch.randn(2, 4, 7, 7))
    assert layer.last_offset is None and layer.last_mask is None


def test_recording_context_switches_every_layer_and_restores():
    net = nn.Sequential(DeformConv2d(2, 2, 3, padding=1), DeformConv2d(2, 2, 3, padding=1))
    net[1].record = True
    with deformconv.recording(net):
        assert [m.record for m in net] == [True, True]
        net(torch.randn(1, 2, 5, 5))
    assert [m.record for m in net] == [False, True]
    assert net[0].last_offset.shape == (1, 18, 5, 5)
    with deformconv.recording(net, enabled=False):
        net(torch.randn(3, 2, 5, 5))
    assert net[1].last_offset.shape[0] == 1  # not overwritten while disabled


@pytest.mark.parametrize(("activation", "scale"), [("2sigmoid", 2.0), ("sigmoid", 1.0)])
def test_mask_activation(activation, scale):
    # The mask is scale * sigmoid(logits) of conv_offset's last G*K_h*K_w channels, written out.
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=True, mask_activation=activation).double()
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    raw = F.conv2d(x, layer.conv_offset.weight, layer.conv_offset.bias, padding=1)
    offset, mask = raw[:, :18], scale * torch.sigmoid(raw[:, 18:])
    tv = pytest.importorskip("torchvision")
    expected = tv.ops.deform_conv2d(x, offset, layer.weight, layer.bias, padding=1, mask=mask)
    torch.testing.assert_close(layer(x), expected)


def test_fresh_layer_with_sigmoid_mask_computes_half_the_conv():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, modulated=True, mask_activation="sigmoid")
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(layer(x), 0.5 * conv(x), rtol=1e-5, atol=1e-5)
    assert "mask_activation='sigmoid'" in repr(layer)


def test_unknown_mask_activation_raises():
    with pytest.raises(
        ValueError, match=r"mask_activation must be one of \('2sigmoid', 'sigmoid'\)"
    ):
        DeformConv2d(2, 2, 3, modulated=True, mask_activation="relu")


def test_input_channel_mismatch_is_also_a_runtime_error():
    with pytest.raises(RuntimeError, match="input must have in_channels=2 channels; got 3"):
        DeformConv2d(2, 2, 3)(torch.randn(1, 3, 5, 5))
