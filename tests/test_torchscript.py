"""TorchScript (script and trace) of the op, the layers and the compat modules.

Mirrors what torchvision's deformable-convolution tests check of scripting: a scripted
function calling the op (with and without mask, stride etc. as Tuple[int, int]) equals
eager and is differentiable (gradcheck, batch 0 included), the module scripts, and bad
sizes raise RuntimeError.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deformconv
from deformconv import DeformConv2d, deform_conv2d
from deformconv.compat import detectron2, mmcv
from deformconv.compat import torchvision as tv_compat

EXACT = {"rtol": 0.0, "atol": 0.0}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _with_mask(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
) -> Tensor:  # fmt: skip
    return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding,
                         dilation=dilation, mask=mask)  # fmt: skip


def _without_mask(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return deform_conv2d(x, offset, weight, bias, 2, 1, (1, 2))


def _problem(batch: int = 2, dtype: torch.dtype = torch.float32):
    # C_in 6, groups 2, offset groups 3, kernel (3, 2), stride (2, 1), padding 1, dilation (1, 2)
    x = torch.randn(batch, 6, 7, 6, dtype=dtype)
    weight = torch.randn(4, 3, 3, 2, dtype=dtype)
    bias = torch.randn(4, dtype=dtype)
    offset = torch.randn(batch, 2 * 3 * 6, 4, 6, dtype=dtype)
    mask = torch.rand(batch, 3 * 6, 4, 6, dtype=dtype)
    return x, offset, mask, weight, bias


def test_scripted_function_equals_eager(backend):
    scripted = torch.jit.script(_with_mask)
    x, offset, mask, weight, bias = _problem()
    args = (x, offset, mask, weight, bias, (2, 1), (1, 1), (1, 2))
    with deformconv.use_backend(backend):
        torch.testing.assert_close(scripted(*args), _with_mask(*args), **EXACT)


def test_scripted_function_without_mask_and_int_arguments(backend):
    scripted = torch.jit.script(_without_mask)
    x = torch.randn(2, 4, 8, 7)
    weight = torch.randn(3, 4, 3, 3)
    offset = torch.randn(2, 18, 4, 3)
    with deformconv.use_backend(backend):
        for bias in (None, torch.randn(3)):
            expected = _without_mask(x, offset, weight, bias)
            torch.testing.assert_close(scripted(x, offset, weight, bias), expected, **EXACT)


@pytest.mark.parametrize("batch", [0, 3])
def test_scripted_function_gradcheck(backend, batch):
    scripted = torch.jit.script(_with_mask)
    x, offset, mask, weight, bias = (
        t.requires_grad_() for t in _problem(batch, torch.float64)
    )  # fmt: skip
    offset = (offset * 0.5).detach().requires_grad_()  # keep samples away from integer knots

    def fn(x, offset, mask, weight, bias):
        return scripted(x, offset, mask, weight, bias, (2, 1), (1, 1), (1, 2))

    with deformconv.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, offset, mask, weight, bias), fast_mode=True)


@pytest.mark.parametrize(
    ("offset_channels", "mask_channels", "message"),
    [(17, 9, "the shape of the offset tensor at dimension 1 is not valid"),
     (18, 4, r"mask.shape\[1\] is not valid")],
)  # fmt: skip
def test_scripted_bad_sizes_raise_runtime_error(offset_channels, mask_channels, message):
    scripted = torch.jit.script(_with_mask)
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), torch.zeros(2)
    offset = torch.randn(1, offset_channels, 3, 3)
    mask = torch.rand(1, mask_channels, 3, 3)
    with pytest.raises(RuntimeError, match=message):
        scripted(x, offset, mask, w, b, (1, 1), (0, 0), (1, 1))


def _live(layer: nn.Module) -> nn.Module:
    # Non-zero offset predictors, so that offsets and masks matter.
    for name, p in layer.named_parameters():
        if "offset" in name:
            nn.init.normal_(p, std=0.3)
    return layer.eval()


LAYERS = {
    "DeformConv2d": lambda: DeformConv2d(4, 6, 3, padding=1, offset_groups=2),
    "DeformConv2d modulated": lambda: DeformConv2d(4, 6, 3, stride=2, padding=1, modulated=True),
    "DeformConv2d sigmoid": lambda: DeformConv2d(
        4, 6, (3, 2), padding=(1, 0), modulated=True, mask_activation="sigmoid", record=True
    ),
    "mmcv.DeformConv2dPack": lambda: mmcv.DeformConv2dPack(4, 6, 3, padding=1, deform_groups=2),
    "mmcv.ModulatedDeformConv2dPack": lambda: mmcv.ModulatedDeformConv2dPack(4, 6, 3, padding=1),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_scripted_layer_equals_eager_and_survives_save(backend, name):
    layer = _live(LAYERS[name]())
    scripted = torch.jit.script(layer)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(2, 4, 9, 8)
    with deformconv.use_backend(backend):
        expected = layer(x)
        torch.testing.assert_close(scripted(x), expected, **EXACT)
        torch.testing.assert_close(loaded(x), expected, **EXACT)


BARE = {
    "torchvision.DeformConv2d": (lambda: tv_compat.DeformConv2d(4, 6, 3, padding=1), True),
    "mmcv.DeformConv2d": (lambda: mmcv.DeformConv2d(4, 6, 3, padding=1), False),
    "mmcv.ModulatedDeformConv2d": (lambda: mmcv.ModulatedDeformConv2d(4, 6, 3, padding=1), True),
    "detectron2.DeformConv": (
        lambda: detectron2.DeformConv(4, 6, 3, padding=1, norm=nn.BatchNorm2d(6).eval(),
                                      activation=nn.ReLU()), False),
    "detectron2.ModulatedDeformConv": (
        lambda: detectron2.ModulatedDeformConv(4, 6, 3, padding=1), True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BARE))
def test_scripted_bare_compat_layer_equals_eager(backend, name):
    build, takes_mask = BARE[name]
    layer = build().eval()
    scripted = torch.jit.script(layer)
    x, offset, mask = torch.randn(2, 4, 7, 7), torch.randn(2, 18, 7, 7), torch.rand(2, 9, 7, 7)
    args = (x, offset, mask) if takes_mask else (x, offset)
    with deformconv.use_backend(backend):
        torch.testing.assert_close(scripted(*args), layer(*args), **EXACT)


def test_script_a_model_with_a_function_activation_says_what_to_do():
    layer = detectron2.DeformConv(4, 4, 3, activation=F.relu)
    with pytest.raises(TypeError, match="pass an nn.Module.*or use torch.export or torch.compile"):
        torch.jit.script(layer)


def test_scripted_layer_respects_use_backend():
    # The scripted op resolves the backend when it runs: the same bits as eager on each.
    layer = _live(DeformConv2d(4, 6, 3, padding=1, modulated=True))
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 4, 9, 8)
    for backend in deformconv.available_backends("cpu"):
        with deformconv.use_backend(backend):
            torch.testing.assert_close(scripted(x), layer(x), **EXACT)


def test_trace_small_model(backend):
    model = _live(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        DeformConv2d(4, 4, 3, padding=1, modulated=True), nn.ReLU(),
        mmcv.ModulatedDeformConv2dPack(4, 2, 3, stride=2, padding=1),
    ))  # fmt: skip
    with deformconv.use_backend(backend):
        traced = torch.jit.trace(model, torch.randn(1, 3, 10, 10))
        x = torch.randn(2, 3, 12, 9)  # another shape: the trace is not specialised to it
        torch.testing.assert_close(traced(x), model(x), **EXACT)


def test_scripted_channels_last_output_keeps_the_format():
    scripted = torch.jit.script(_without_mask)
    x = torch.randn(2, 4, 8, 7).contiguous(memory_format=torch.channels_last)
    out = scripted(x, torch.randn(2, 18, 4, 3), torch.randn(3, 4, 3, 3), None)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_scripted_deformified_resnet_equals_eager():
    tv = pytest.importorskip("torchvision")
    model = deformconv.deformify(tv.models.resnet18(), last=2, modulated=True).eval()
    for name in model.deformified:
        _live(model.get_submodule(name))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), **EXACT)


def test_script_the_op_itself(backend):
    scripted = torch.jit.script(deform_conv2d)
    x, offset, mask, weight, bias = _problem()
    with deformconv.use_backend(backend):
        expected = deform_conv2d(x, offset, weight, bias, (2, 1), 1, (1, 2), mask)
        torch.testing.assert_close(
            scripted(x, offset, weight, bias, (2, 1), 1, (1, 2), mask), expected, **EXACT
        )


ROI_OP = hasattr(torch.ops.deformconv, "deform_roi_pool")


@pytest.mark.skipif(not ROI_OP, reason="needs the registered deformconv::deform_roi_pool op")
@pytest.mark.parametrize("cls", [mmcv.DeformRoIPoolPack, mmcv.ModulatedDeformRoIPoolPack])
def test_scripted_mmcv_roi_packs_equal_eager(backend, cls):
    pool = _live(cls(2, 3, deform_fc_channels=8, spatial_scale=0.5))
    for p in pool.parameters():
        nn.init.normal_(p, std=0.2)
    rois = torch.tensor([[0.0, 1.5, 2.0, 13.0, 11.0], [1.0, 4.0, 0.0, 9.5, 14.0]])
    x = torch.randn(2, 3, 8, 8)
    scripted = torch.jit.script(pool)
    with deformconv.use_backend(backend):
        torch.testing.assert_close(scripted(x, rois), pool(x, rois), **EXACT)
