"""deformconv.nn.DCNv3 / DCNv4: OpenGVLab's state-dict keys and shapes, and a forward
composed by hand (torch.nn.functional + the naive loop oracle) from a loaded state dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import deformconv
from _dcnv_oracle import naive_dcnv3, naive_dcnv4


def _dcnv3_keys(c, g, p, dw, norm, cfs):
    keys = {"dw_conv.0.weight": (c, 1, dw, dw), "dw_conv.0.bias": (c,)}
    if norm == "LN":
        keys |= {"dw_conv.1.1.weight": (c,), "dw_conv.1.1.bias": (c,)}
    else:
        keys |= {
            f"dw_conv.1.0.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")
        }
        keys["dw_conv.1.0.num_batches_tracked"] = ()
    keys |= {
        "offset.weight": (g * p * 2, c), "offset.bias": (g * p * 2,),
        "mask.weight": (g * p, c), "mask.bias": (g * p,),
        "input_proj.weight": (c, c), "input_proj.bias": (c,),
        "output_proj.weight": (c, c), "output_proj.bias": (c,),
    }  # fmt: skip
    if cfs:
        keys |= {"center_feature_scale_proj_weight": (g, c), "center_feature_scale_proj_bias": (g,)}
    return keys


DCNV3_CONFIGS = {
    "default": {},
    "bn_relu_dw5": {"norm_layer": "BN", "act_layer": "ReLU", "dw_kernel_size": 5},
    "cfs_remove_center": {"center_feature_scale": True, "remove_center": True, "act_layer": "SiLU"},
    "offset_scale_kernel_5": {"kernel_size": 5, "pad": 2, "offset_scale": 0.5, "dilation": 1},
}


@pytest.mark.parametrize("name", list(DCNV3_CONFIGS))
def test_dcnv3_state_dict_keys_and_shapes(name):
    cfg = DCNV3_CONFIGS[name]
    layer = deformconv.nn.DCNv3(channels=16, group=4, **cfg)
    k = cfg.get("kernel_size", 3)
    p = k * k - int(cfg.get("remove_center", False))
    expected = _dcnv3_keys(16, 4, p, cfg.get("dw_kernel_size", k), cfg.get("norm_layer", "LN"),
                           cfg.get("center_feature_scale", False))  # fmt: skip
    got = {key: tuple(v.shape) for key, v in layer.state_dict().items()}
    assert got == expected


def _random_state_dict(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, v in layer.state_dict().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = v
        elif key.endswith("running_var"):
            sd[key] = torch.rand(v.shape, generator=g, dtype=torch.float64) + 0.5
        else:
            sd[key] = 0.5 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    return sd


@pytest.mark.parametrize("name", list(DCNV3_CONFIGS))
def test_dcnv3_forward_composed_by_hand(backend, name):
    cfg = DCNV3_CONFIGS[name]
    layer = deformconv.nn.DCNv3(channels=8, group=2, dtype=torch.float64, **cfg).eval()
    sd = _random_state_dict(layer)
    layer.load_state_dict(sd)
    x = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    with deformconv.use_backend(backend):
        out = layer(x)

    k, dw = layer.kernel_size, layer.dw_kernel_size
    xp = F.linear(x, sd["input_proj.weight"], sd["input_proj.bias"])
    x1 = F.conv2d(x.permute(0, 3, 1, 2), sd["dw_conv.0.weight"], sd["dw_conv.0.bias"],
                  padding=(dw - 1) // 2, groups=8)  # fmt: skip
    if cfg.get("norm_layer", "LN") == "LN":
        x1 = F.layer_norm(x1.permute(0, 2, 3, 1), (8,), sd["dw_conv.1.1.weight"],
                          sd["dw_conv.1.1.bias"], eps=1e-6)  # fmt: skip
    else:
        x1 = F.batch_norm(x1, sd["dw_conv.1.0.running_mean"], sd["dw_conv.1.0.running_var"],
                          sd["dw_conv.1.0.weight"], sd["dw_conv.1.0.bias"]).permute(0, 2, 3, 1)  # fmt: skip
    x1 = {"GELU": F.gelu, "ReLU": F.relu, "SiLU": F.silu}[cfg.get("act_layer", "GELU")](x1)
    offset = F.linear(x1, sd["offset.weight"], sd["offset.bias"])
    logits = F.linear(x1, sd["mask.weight"], sd["mask.bias"])
    mask = logits.reshape(2, 6, 5, 2, -1).softmax(-1).reshape(2, 6, 5, -1)
    core = naive_dcnv3(xp, offset, mask, (k, k), (1, 1), (layer.pad,) * 2, (layer.dilation,) * 2,
                       2, layer.offset_scale, bool(layer.remove_center))  # fmt: skip
    if layer.center_feature_scale:
        s = torch.sigmoid(F.linear(x1, sd["center_feature_scale_proj_weight"],
                                   sd["center_feature_scale_proj_bias"]))  # fmt: skip
        s = s[..., :, None].expand(-1, -1, -1, -1, 4).reshape(2, 6, 5, 8)
        core = core * (1 - s) + xp * s
    expected = F.linear(core, sd["output_proj.weight"], sd["output_proj.bias"])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


DCNV4_CONFIGS = {
    "default": {},
    "dw_no_output_bias": {"dw_kernel_size": 3, "output_bias": False},
    "without_pointwise_remove_center": {"without_pointwise": True, "remove_center": True},
    "cfs_offset_scale": {"center_feature_scale": True, "offset_scale": 0.5},
}


@pytest.mark.parametrize("name", list(DCNV4_CONFIGS))
def test_dcnv4_state_dict_keys_and_shapes(name):
    cfg = DCNV4_CONFIGS[name]
    layer = deformconv.nn.DCNv4(channels=32, group=2, **cfg)
    p = 9 - int(cfg.get("remove_center", False))
    d = math.ceil(2 * p * 3 / 8) * 8
    expected = {"offset_mask.weight": (d, 32), "offset_mask.bias": (d,)}
    if cfg.get("dw_kernel_size"):
        expected |= {"offset_mask_dw.weight": (32, 1, 3, 3), "offset_mask_dw.bias": (32,)}
    if not cfg.get("without_pointwise"):
        expected |= {"value_proj.weight": (32, 32), "value_proj.bias": (32,),
                     "output_proj.weight": (32, 32)}  # fmt: skip
        if cfg.get("output_bias", True):
            expected["output_proj.bias"] = (32,)
    if cfg.get("center_feature_scale"):
        expected |= {"center_feature_scale_proj_weight": (2, 32),
                     "center_feature_scale_proj_bias": (2,)}  # fmt: skip
    got = {key: tuple(v.shape) for key, v in layer.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("name", list(DCNV4_CONFIGS))
def test_dcnv4_forward_composed_by_hand(backend, name):
    cfg = DCNV4_CONFIGS[name]
    layer = deformconv.nn.DCNv4(channels=8, group=2, dtype=torch.float64, **cfg)
    sd = _random_state_dict(layer, seed=1)
    layer.load_state_dict(sd)
    x = torch.randn(2, 6 * 5, 8, dtype=torch.float64)
    with deformconv.use_backend(backend):
        out = layer(x, shape=(6, 5))
        out_4d = layer(x.reshape(2, 6, 5, 8))

    wp = cfg.get("without_pointwise", False)
    v = x if wp else F.linear(x, sd["value_proj.weight"], sd["value_proj.bias"])
    v = v.reshape(2, 6, 5, 8)
    om_in = x
    if cfg.get("dw_kernel_size"):
        om_in = F.conv2d(x.reshape(2, 6, 5, 8).permute(0, 3, 1, 2), sd["offset_mask_dw.weight"],
                         sd["offset_mask_dw.bias"], padding=1, groups=8)  # fmt: skip
        om_in = om_in.permute(0, 2, 3, 1).reshape(2, 30, 8)
    om = F.linear(om_in, sd["offset_mask.weight"], sd["offset_mask.bias"]).reshape(2, 6, 5, -1)
    core = naive_dcnv4(v, om, (3, 3), (1, 1), (1, 1), (1, 1), 2, layer.offset_scale,
                       bool(layer.remove_center))  # fmt: skip
    if layer.center_feature_scale:
        s = torch.sigmoid(F.linear(core, sd["center_feature_scale_proj_weight"],
                                   sd["center_feature_scale_proj_bias"]))  # fmt: skip
        s = s[..., :, None].expand(-1, -1, -1, -1, 4).reshape(2, 6, 5, 8)
        core = core * (1 - s) + v * s
    expected = core.reshape(2, 30, 8)
    if not wp:
        expected = F.linear(expected, sd["output_proj.weight"], sd.get("output_proj.bias"))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_4d, expected.reshape(2, 6, 5, 8), rtol=1e-10, atol=1e-10)


def test_fresh_dcnv3_samples_the_regular_grid():
    """Zero offsets and uniform mask (InternImage's init): the core is a 3x3 box mean."""
    layer = deformconv.nn.DCNv3(channels=4, group=1, dtype=torch.float64)
    torch.nn.init.eye_(layer.input_proj.weight)
    torch.nn.init.eye_(layer.output_proj.weight)
    x = torch.randn(1, 5, 6, 4, dtype=torch.float64)
    box = F.avg_pool2d(x.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(layer(x), box.permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        ("DCNv3", {"channels": 10, "group": 4}, ValueError, "multiple of group=4; got 10"),
        ("DCNv3", {"kernel_size": 4, "remove_center": True}, ValueError, "odd kernel_size"),
        ("DCNv3", {"norm_layer": "GN"}, ValueError, "norm_layer must be 'LN' or 'BN'"),
        ("DCNv3", {"act_layer": "Tanh"}, ValueError, "act_layer must be one of"),
        ("DCNv4", {"channels": 12, "group": 8}, ValueError, "multiple of group=8"),
        ("DCNv4", {"typo_arg": 1}, TypeError, "unexpected keyword arguments"),
    ],
)
def test_modules_reject_bad_hyper_parameters(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(deformconv.nn, cls)(**kwargs)


def test_dcnv4_rejects_length_that_is_not_h_times_w():
    layer = deformconv.nn.DCNv4(channels=16, group=1)
    with pytest.raises(ValueError, match=r"L=30 must equal H\*W"):
        layer(torch.randn(1, 30, 16))


def test_modules_under_cpu_autocast(backend):
    layer = deformconv.nn.DCNv3(channels=8, group=2)
    torch.nn.init.normal_(layer.offset.weight, std=0.3)
    x = torch.randn(2, 5, 5, 8)
    with deformconv.use_backend(backend):
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
