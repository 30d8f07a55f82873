"""DeformMultiScaleRoIAlign: torchvision's MultiScaleRoIAlign when fresh, torchvision's
pooling of shifted boxes for a constant offset, gradcheck through the offset head, and
torchvision's Faster R-CNN / Mask R-CNN with it as box and mask pooler."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

tv = pytest.importorskip("torchvision")
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from deformconv.nn import DeformMultiScaleRoIAlign  # noqa: E402

F64 = torch.float64
TOL = {torch.float64: {"atol": 1e-12, "rtol": 1e-12}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}


def _features(levels: int, image: tuple[int, int], n: int, c: int, dtype) -> OrderedDict:
    """FPN-like maps at strides 4, 8, 16, ... (plus a map that is not pooled)."""
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict()
    for i in range(levels):
        stride = 4 * 2**i
        h, w = -(-image[0] // stride), -(-image[1] // stride)
        feats[f"p{i + 2}"] = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    feats["pool"] = torch.randn(n, c, 1, 1, generator=g, dtype=dtype)
    return feats


def _boxes(n: int, image: tuple[int, int], sizes: tuple[float, float], dtype) -> list[torch.Tensor]:
    """Per image, 16 boxes with sides log-uniform in ``sizes`` (pixels), some crossing the
    border."""
    g = torch.Generator().manual_seed(2)
    out = []
    log_lo, log_hi = torch.tensor(sizes, dtype=F64).log()
    for _ in range(n):
        wh = (log_lo + torch.rand(16, 2, generator=g, dtype=F64) * (log_hi - log_lo)).exp()
        xy = (
            torch.rand(16, 2, generator=g, dtype=F64) * torch.tensor([image[1], image[0]])
            - 0.2 * wh
        )
        out.append(torch.cat([xy, xy + wh], 1).to(dtype))
    return out


CASES = [  # (levels, image (H, W), box sides); the last one maps every box to the top level
    (1, (64, 64), (4.0, 60.0)),
    (2, (96, 128), (8.0, 90.0)),
    (4, (160, 224), (6.0, 220.0)),
    (4, (256, 200), (120.0, 250.0)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize(("levels", "image", "sizes"), CASES)
def test_fresh_equals_multiscale_roi_align(levels, image, sizes, sampling_ratio, dtype):
    names = [f"p{i + 2}" for i in range(levels)]
    feats = _features(levels, image, 2, 3, dtype)
    boxes = _boxes(2, image, sizes, dtype)
    shapes = [image, (image[0] - 8, image[1] - 4)]
    canonical = {"canonical_scale": 56, "canonical_level": 4}  # boxes of 28-112 px reach p3
    expected = MultiScaleRoIAlign(names, (5, 4), sampling_ratio, **canonical)(feats, boxes, shapes)
    for modulated in (False, True):
        pool = DeformMultiScaleRoIAlign(
            names, (5, 4), sampling_ratio, in_channels=3, hidden_features=8,
            modulated=modulated, dtype=dtype, **canonical,
        )  # fmt: skip
        out = pool(feats, boxes, shapes)
        torch.testing.assert_close(out, expected, **TOL[dtype])
    reached = set(pool.map_levels(boxes).tolist())
    assert reached == ({levels - 1} if sizes[0] >= 112 else set(range(levels)))


@pytest.mark.parametrize(("levels", "image", "sizes"), CASES[1:3])
def test_constant_offset_pools_shifted_boxes(levels, image, sizes):
    # Bias b = (dx, dy) on every bin moves each bin by gamma * (dx * w, dy * h): the
    # whole RoI moves, which MultiScaleRoIAlign pools from the shifted boxes.
    names = [f"p{i + 2}" for i in range(levels)]
    feats = _features(levels, image, 2, 3, F64)
    boxes = _boxes(2, image, sizes, F64)
    shapes = [image, image]
    canonical = {"canonical_scale": 56}
    pool = DeformMultiScaleRoIAlign(
        names, 3, 2, in_channels=3, hidden_features=8, dtype=F64, record=True, **canonical
    )
    dx, dy, gamma = 0.7, -0.4, pool.gamma
    with torch.no_grad():
        pool.offset_fc[-1].bias.view(2, 9)[0] = dx
        pool.offset_fc[-1].bias.view(2, 9)[1] = dy
    mapper = MultiScaleRoIAlign(names, 3, 2, **canonical)
    mapper(feats, boxes, shapes)  # infers the scales and builds the level mapper
    levels = mapper.map_levels(boxes)
    assert len(set(levels.tolist())) > 1
    scale = torch.tensor(mapper.scales, dtype=F64)[levels].split([len(b) for b in boxes])
    shifted = []
    for b, s in zip(boxes, scale, strict=True):
        # RoIAlign (aligned=False) clamps the RoI to at least 1 feature pixel per side
        w = torch.clamp((b[:, 2] - b[:, 0]) * s, min=1) / s
        h = torch.clamp((b[:, 3] - b[:, 1]) * s, min=1) / s
        move = torch.stack([gamma * dx * w, gamma * dy * h] * 2, 1)
        shifted.append(b + move)
    torch.testing.assert_close(mapper.map_levels(shifted), levels)
    expected = mapper(feats, shifted, shapes)
    torch.testing.assert_close(pool(feats, boxes, shapes), expected, atol=1e-10, rtol=1e-10)
    offset = pool.last_offset
    assert offset is not None and offset.shape == (32, 2, 3, 3)
    torch.testing.assert_close(offset[:, 0], torch.full((32, 3, 3), dx, dtype=F64))


@pytest.mark.parametrize("modulated", [False, True])
def test_gradients_reach_the_heads(modulated):
    feats = _features(2, (64, 64), 1, 2, F64)
    boxes = _boxes(1, (64, 64), (10.0, 50.0), F64)[:1]
    boxes = [boxes[0][:4]]
    pool = DeformMultiScaleRoIAlign(
        ["p2", "p3"], 2, 2, in_channels=2, hidden_features=4, modulated=modulated, dtype=F64
    )
    with torch.no_grad():  # move away from the exact init so every parameter matters
        for p in pool.parameters():
            p.add_(0.05 * torch.randn_like(p))
    names = [n for n, _ in pool.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in pool.parameters())

    def f(*ps):
        state = dict(zip(names, ps, strict=True))
        return torch.func.functional_call(pool, state, (feats, boxes, [(64, 64)]))

    assert torch.autograd.gradcheck(f, params, atol=1e-6, fast_mode=True)
    out = pool(feats, boxes, [(64, 64)])
    (out * torch.randn_like(out)).sum().backward()
    heads = [pool.offset_fc] + ([pool.mask_fc] if modulated else [])
    for head in heads:
        for p in head.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_fresh_module_gets_offset_gradients():
    pool = DeformMultiScaleRoIAlign(["p2"], 7, 2, in_channels=3, hidden_features=16)
    feats = _features(1, (64, 64), 2, 3, torch.float32)
    out = pool(feats, _boxes(2, (64, 64), (8.0, 40.0), torch.float32), [(64, 64)] * 2)
    (out * torch.randn_like(out)).sum().backward()
    assert pool.offset_fc[-1].weight.grad.abs().sum() > 0
    assert pool.offset_fc[-1].bias.grad.abs().sum() > 0


def test_autocast_bfloat16_matches_float32():
    names = ["p2", "p3"]
    feats = _features(2, (96, 96), 2, 4, torch.float32)
    boxes = _boxes(2, (96, 96), (8.0, 90.0), torch.float32)
    pool = DeformMultiScaleRoIAlign(names, 7, 2, in_channels=4, hidden_features=16)
    with torch.no_grad():
        pool.offset_fc[-1].bias.normal_(0, 1)
    expected = pool(feats, boxes, [(96, 96)] * 2)
    half = OrderedDict((k, v.bfloat16()) for k, v in feats.items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(half, boxes, [(96, 96)] * 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


class _Backbone(nn.Module):
    """Two stride-2 convs: one 16-channel map at stride 4 (``out_channels`` for torchvision)."""

    out_channels = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU()
        )

    def forward(self, x):
        return self.body(x)


def _targets(n: int, masks: bool = False) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        t = {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]) + i,
            "labels": torch.tensor([1, 3]),
        }
        if masks:
            m = torch.zeros(2, 64, 64, dtype=torch.uint8)
            m[0, 6:40, 4:30] = 1
            m[1, 10:50, 20:60] = 1
            t["masks"] = m
        out.append(t)
    return out


SMALL = {
    "min_size": 64,
    "max_size": 64,
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 20,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 16,
    "box_score_thresh": 0.0,
}


def test_faster_rcnn_train_step_and_eval():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    pool = DeformMultiScaleRoIAlign(["0"], 7, 2, in_channels=16, hidden_features=32)
    model = FasterRCNN(
        _Backbone(),
        num_classes=5,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=pool,
        **SMALL,
    )
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    model.train()
    losses = model(images, _targets(2))
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert pool.offset_fc[-1].weight.grad is not None
    assert pool.offset_fc[-1].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    assert detections[0]["boxes"].shape[1] == 4 and len(detections[0]["boxes"]) > 0
    assert detections[0]["labels"].shape == detections[0]["scores"].shape


def test_mask_rcnn_with_fpn_uses_both_poolers():
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FeaturePyramidNetwork

    class FPNBackbone(nn.Module):
        out_channels = 8

        def __init__(self) -> None:
            super().__init__()
            self.c2 = nn.Conv2d(3, 8, 3, 4, 1)
            self.c3 = nn.Conv2d(8, 8, 3, 2, 1)
            self.fpn = FeaturePyramidNetwork([8, 8], 8)

        def forward(self, x):
            c2 = self.c2(x).relu()
            return self.fpn(OrderedDict([("0", c2), ("1", self.c3(c2).relu())]))

    box_pool = DeformMultiScaleRoIAlign(["0", "1"], 7, 2, in_channels=8, hidden_features=16)
    mask_pool = DeformMultiScaleRoIAlign(
        ["0", "1"], 14, 2, in_channels=8, hidden_features=16, modulated=True, record=True
    )
    model = MaskRCNN(
        FPNBackbone(),
        rpn_anchor_generator=AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2),
        box_roi_pool=box_pool,
        mask_roi_pool=mask_pool,
        box_head=TwoMLPHead(8 * 49, 32),
        box_predictor=FastRCNNPredictor(32, 5),
        mask_head=MaskRCNNHeads(8, [8, 8], 1),
        mask_predictor=MaskRCNNPredictor(8, 8, 5),
        **SMALL,
    )
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    losses = model(images, _targets(2, masks=True))
    assert torch.isfinite(sum(losses.values()))
    assert "loss_mask" in losses
    assert mask_pool.last_mask is not None and mask_pool.last_mask.shape[1:] == (1, 14, 14)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[0]["masks"].shape[1:] == (1, 64, 64)


def test_empty_boxes():
    pool = DeformMultiScaleRoIAlign(["p2", "p3"], 7, 2, in_channels=3, hidden_features=8)
    feats = _features(2, (64, 64), 1, 3, torch.float32)
    out = pool(feats, [torch.zeros(0, 4)], [(64, 64)])
    assert out.shape == (0, 3, 7, 7)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_channels": 0}, ValueError, "in_channels must be a positive int"),
        ({"output_size": 0}, ValueError, "output_size must be positive"),
        ({"output_size": (7, 7, 7)}, TypeError, "output_size must be an int or a tuple"),
        ({"featmap_names": []}, ValueError, "featmap_names must be a non-empty list"),
        ({"sampling_ratio": 1.5}, TypeError, "sampling_ratio must be an int"),
        ({"gamma": float("nan")}, ValueError, "gamma must be a finite number"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"featmap_names": ["p2"], "output_size": 7, "sampling_ratio": 2, "in_channels": 3}
    with pytest.raises(error, match=f"DeformMultiScaleRoIAlign: {match}"):
        DeformMultiScaleRoIAlign(**{**args, **kwargs})


def test_bad_inputs():
    pool = DeformMultiScaleRoIAlign(["p2"], 7, 2, in_channels=3, hidden_features=8)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    with pytest.raises(ValueError, match=r"x must contain the feature maps \['p2'\]; got keys"):
        pool({"p3": torch.zeros(1, 3, 8, 8)}, boxes, [(32, 32)])
    with pytest.raises(ValueError, match=r"\(N, in_channels=3, H, W\); got \(1, 4, 8, 8\)"):
        pool({"p2": torch.zeros(1, 4, 8, 8)}, boxes, [(32, 32)])
    with pytest.raises(ValueError, match="image_shapes must not be empty"):
        pool({"p2": torch.zeros(1, 3, 8, 8)}, boxes, [])


def test_repr_shows_heads():
    pool = DeformMultiScaleRoIAlign(["0"], 7, 2, in_channels=3, hidden_features=8)
    text = repr(pool)
    assert text.startswith("DeformMultiScaleRoIAlign(\n  featmap_names=['0'], output_size=(7, 7)")
    assert "hidden_features=8" in text and "(offset_fc): Sequential(" in text


def test_torchvision_is_imported_lazily():
    code = (
        "import sys, deformconv, deformconv.nn; "
        "assert 'torchvision' not in sys.modules; "
        "deformconv.nn.DeformMultiScaleRoIAlign; "
        "assert 'torchvision' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_records_offsets_only_when_asked():
    from deformconv import recording

    pool = DeformMultiScaleRoIAlign(["p2"], 7, 2, in_channels=3, hidden_features=8)
    feats = {"p2": torch.randn(1, 3, 16, 16)}
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0]])]
    pool(feats, boxes, [(64, 64)])
    assert pool.last_offset is None and pool.last_mask is None
    with recording(pool):
        pool(feats, boxes, [(64, 64)])
    assert pool.last_offset is not None and pool.last_offset.shape == (1, 2, 7, 7)
    assert pool.record is False
