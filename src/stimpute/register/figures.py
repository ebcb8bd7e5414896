"""QC figures of a registration: adjacent sections overlaid before/after, and the 3D spot cloud.

The overlay paints the fixed section's stain density in magenta and the moving one's in
green: aligned tissue turns grey-white, misalignment shows as coloured fringes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stimpute.data import Stack
from stimpute.files import atomic_write
from stimpute.register.masks import View
from stimpute.register.refine import warp_to_fixed
from stimpute.register.rigid import view_matrix


def colour_overlay(fixed: View, moving: View, matrix: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) float image: fixed density in magenta, warped moving density in green."""
    f = _unit(fixed.density)
    m = _unit(warp_to_fixed(fixed, moving.density, view_matrix(fixed, moving, matrix)))
    return 1.0 - np.stack([m, f, m], axis=2)  # white glass; stain absorbs its colour's complement


def save_pair_overlay(fixed: View, moving: View, before: np.ndarray, after: np.ndarray, title: str, path: Path) -> Path:
    """Side-by-side before/after colour overlays of one adjacent pair as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, matrix, label in zip(axes, (before, after), ("before (slides as placed)", "after registration")):
        ax.imshow(colour_overlay(fixed, moving, matrix))
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{title}  (magenta: fixed, green: moving)", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def save_spot_cloud(stack: Stack, coords_ref: list[np.ndarray], path: Path) -> Path:
    """3D scatter of every spot at its registered (x, y) and depth z, all in µm, one colour
    per section, as a PNG (`coords_ref`: reference-section pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d")
    for section, xy in zip(stack, coords_ref):
        xy_um = np.asarray(xy, np.float64) * stack[0].um_per_px
        ax.scatter(xy_um[:, 0], xy_um[:, 1], np.full(len(xy), section.z_um or 0.0), s=6, label=section.name, depthshade=False)
    ax.invert_yaxis()
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_zlabel("z (µm)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("registered spots")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _unit(image: np.ndarray) -> np.ndarray:
    top = np.percentile(image, 99.5)
    return np.clip(image / top, 0.0, 1.0) if top > 0 else np.zeros_like(image)
