"""Draw docs/images/sampling.png: a regular 3x3 sampling grid vs a deformed one.

Run: python docs/sampling_figure.py   (needs matplotlib)
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

rng = np.random.default_rng(3)
yy, xx = np.mgrid[0:24, 0:24]
image = np.exp(-(((yy - 12) / 7.0) ** 2 + ((xx - 12) / 5.0) ** 2))  # a large blob
grid = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=float)
center = np.array([12.0, 12.0])
offsets = grid * 3.0 + rng.normal(0, 0.6, grid.shape)  # spread out to the object's extent

fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
for ax, pts, title in (
    (axes[0], center + grid, "regular conv: p0 + p_n"),
    (axes[1], center + grid + offsets, "deformable: p0 + p_n + Δp_n"),
):
    ax.imshow(image, cmap="gray_r", alpha=0.6)
    ax.scatter(pts[:, 1], pts[:, 0], c="tab:red", s=40, zorder=3)
    if title.startswith("deformable"):
        for (gy, gx), (py, px) in zip(center + grid, pts, strict=True):
            ax.annotate(
                "", (px, py), (gx, gy), arrowprops={"arrowstyle": "->", "color": "tab:blue"}
            )
        ax.scatter((center + grid)[:, 1], (center + grid)[:, 0], c="tab:blue", s=12, zorder=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(
    "Each of the 9 taps is shifted by a learned (Δy, Δx) and read by bilinear interpolation"
)
fig.tight_layout()
out = Path(__file__).parent / "images" / "sampling.png"
fig.savefig(out, dpi=90)
print(f"wrote {out}")
