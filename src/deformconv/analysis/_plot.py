"""Figure-7-style plots of sampling locations and offset fields (needs matplotlib)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from deformconv.analysis._dilation import effective_dilation

__all__ = ["plot_offset_field", "plot_sampling_locations"]


def _image(image: Tensor | np.ndarray) -> np.ndarray:
    img = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    return img


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4, 4))
    return ax


def plot_sampling_locations(
    image: Tensor | np.ndarray,
    points: Tensor,
    weights: Tensor | None = None,
    unit: tuple[float, float] | None = None,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw traced sampling locations over an image (the paper's Figure 7).

    Points are mapped to pixels as ``pixel = point·scale + shift`` (e.g. ``scale=4`` for
    a map at stride 4 whose unit i is centred on pixel 4i). Point opacity is the
    weight (product of masks) divided by the largest weight.

    Args:
        image: (H, W), (1, H, W) or (3, H, W).
        points: (P, 2) as (y, x), e.g. from :func:`trace_sampling_locations`.
        weights: (P,) or None (all opaque).
        unit: (y, x) of the output unit in pixels, drawn as a green star, or None.
        scale: pixels per unit of the points' map.
        shift: pixel of the map's unit 0.
        ax: matplotlib Axes to draw on, or None for a new figure.
        title: Axes title.

    Returns:
        The matplotlib Axes.

    Example:
        >>> import torch
        >>> ax = plot_sampling_locations(torch.rand(32, 32), torch.rand(729, 2) * 8, scale=4)
        >>> len(ax.collections)
        1
    """
    ax = _axes(ax)
    pts = points.detach().double().cpu().numpy() * scale + shift
    colors = np.zeros((len(pts), 4))
    colors[:, 0] = 1.0
    if weights is None:
        colors[:, 3] = 0.8
    else:
        w = weights.detach().double().cpu().numpy()
        colors[:, 3] = np.clip(w / max(float(w.max()), 1e-12), 0.05, 1.0)
    img = _image(image)
    ax.imshow(img, cmap="gray", interpolation="nearest")
    ax.scatter(pts[:, 1], pts[:, 0], s=6, c=colors, linewidths=0)
    if unit is not None:
        ax.plot([unit[1]], [unit[0]], marker="*", color="lime", markersize=12, mec="black")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)  # points off the image are clipped, not drawn
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_offset_field(
    image: Tensor | np.ndarray,
    offset: Tensor,
    kernel_size: tuple[int, int] = (3, 3),
    dilation: tuple[int, int] = (1, 1),
    *,
    scale: float = 1.0,
    shift: float = 0.0,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw one layer's offset field over an image.

    At every output location an arrow shows the mean offset over the kernel points
    (in pixels), coloured by the location's effective dilation.

    Args:
        image: (H, W), (1, H, W) or (3, H, W).
        offset: (2·G·K_h·K_w, H_out, W_out) for one sample (G = 1 is drawn; groups are
            averaged otherwise).
        kernel_size: (K_h, K_w).
        dilation: (d_h, d_w).
        scale: pixels per unit of the layer's output/input map (input and output maps
            are assumed aligned, i.e. stride 1).
        shift: pixel of the map's unit 0.
        ax: matplotlib Axes, or None for a new figure.
        title: Axes title.

    Returns:
        The matplotlib Axes.

    Example:
        >>> import torch
        >>> ax = plot_offset_field(torch.rand(32, 32), torch.randn(18, 8, 8), scale=4)
        >>> len(ax.collections)
        1
    """
    ax = _axes(ax)
    off = offset.detach().double().cpu()
    k = kernel_size[0] * kernel_size[1]
    _, h, w = off.shape
    dil = effective_dilation(off[None], kernel_size, dilation)[0].mean(0).numpy()
    mean = off.reshape(-1, k, 2, h, w).mean(dim=(0, 1)).numpy() * scale  # (2, H, W) pixels
    yy, xx = np.meshgrid(np.arange(h) * scale + shift, np.arange(w) * scale + shift, indexing="ij")
    ax.imshow(_image(image), cmap="gray", interpolation="nearest")
    quiver = ax.quiver(
        xx, yy, mean[1], mean[0], dil, cmap="viridis", angles="xy", scale_units="xy", scale=1
    )
    import matplotlib.pyplot as plt

    plt.colorbar(quiver, ax=ax, fraction=0.046, pad=0.04, label="effective dilation")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax
