"""Coarse rigid alignment: exhaustive rotation (and mirror) search on tissue masks.

For every rotation of the moving mask (the full circle, in `step_deg` steps, plain and
mirrored), the translation that maximises the overlap with the fixed mask comes from one
FFT cross-correlation; because rigid motions keep mask areas, maximal overlap is maximal
IoU. The best local optima over angle become candidates for the refinement stage, which
also looks at the stain texture (masks of near-symmetric tissue can fit several ways).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import fft

from stimpute.register.masks import View


@dataclass
class Candidate:
    """A rigid(+mirror) transform, full-resolution moving px -> fixed px, and its mask IoU."""

    matrix: np.ndarray
    iou: float
    angle_deg: float
    mirrored: bool


def view_matrix(fixed: View, moving: View, matrix: np.ndarray) -> np.ndarray:
    """Full-resolution transform expressed between the two views' pixel grids."""
    return fixed.to_view @ matrix @ np.linalg.inv(moving.to_view)


def full_matrix(fixed: View, moving: View, matrix_view: np.ndarray) -> np.ndarray:
    """View-grid transform expressed between full-resolution pixels (inverse of view_matrix)."""
    return np.linalg.inv(fixed.to_view) @ matrix_view @ moving.to_view


def flip_x(width: int) -> np.ndarray:
    """Mirror of a `width`-pixel-wide image about its vertical midline (an involution)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def rotation_search(fixed: View, moving: View, step_deg: float = 3.0, n_candidates: int = 4) -> list[Candidate]:
    """Best rigid placements of `moving` on `fixed` over all angles and the mirror, best first.

    Both masks are cut to their tissue's bounding box first: the glass around it adds
    nothing to any overlap, and the FFTs shrink about 3× on HER2-ST thumbnails. Whole
    pixels are cut, so every overlap is the uncut masks' own, shifted."""
    (fy, fx), fixed_mask = _tissue_box(fixed.mask)
    (my, mx), moving_mask = _tissue_box(moving.mask)
    side = int(np.ceil(np.hypot(*moving_mask.shape))) + 2  # the moving mask fits at any angle
    overlap = _Overlap(fixed_mask, side)
    uncut = np.array([[1.0, 0.0, fx], [0.0, 1.0, fy], [0.0, 0.0, 1.0]])  # cut fixed px -> fixed view px
    found = []
    for mirrored in (False, True):
        mask = np.fliplr(moving_mask) if mirrored else moving_mask
        # moving view px -> cut (and mirrored) moving px
        cut = np.array([[1.0, 0.0, -mx], [0.0, 1.0, -my], [0.0, 0.0, 1.0]])
        pre = flip_x(mask.shape[1]) @ cut if mirrored else cut
        ys, xs = np.nonzero(mask)
        centroid = (xs.mean(), ys.mean())
        scores = [_best_shift(overlap, mask, centroid, angle) for angle in np.arange(0.0, 360.0, step_deg)]
        ious = np.array([s[0] for s in scores])
        for i in _circular_peaks(ious):
            iou, matrix_view, angle = scores[i]
            found.append(Candidate(full_matrix(fixed, moving, uncut @ matrix_view @ pre), iou, angle, mirrored))
    found.sort(key=lambda c: -c.iou)
    return found[:n_candidates]


def _tissue_box(mask: np.ndarray) -> tuple[tuple[int, int], np.ndarray]:
    """The (row, column) of the top-left corner of `mask`'s foreground bounding box, and the
    mask cut to it (the whole mask where it is empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0), mask
    return (int(rows[0]), int(cols[0])), mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


class _Overlap:
    """Overlap of the fixed mask with a `side` × `side` moving mask at every shift, by FFT
    cross-correlation; the fixed mask's spectrum is computed once for all angles."""

    def __init__(self, fixed_mask: np.ndarray, side: int):
        self.side, self.area = side, fixed_mask.sum()
        self.shape = (fixed_mask.shape[0] + side - 1, fixed_mask.shape[1] + side - 1)
        self.fast = tuple(fft.next_fast_len(n, real=True) for n in self.shape)
        self.spectrum = fft.rfft2(fixed_mask.astype(np.float32), self.fast)

    def correlate(self, moving: np.ndarray) -> np.ndarray:
        """Σ fixed(p) · moving(p - t) for every shift t; index k means t = k - (moving.shape - 1)."""
        spectrum = self.spectrum * fft.rfft2(moving[::-1, ::-1], self.fast)
        return fft.irfft2(spectrum, self.fast)[: self.shape[0], : self.shape[1]]


def _best_shift(overlap: _Overlap, moving_mask: np.ndarray, centroid: tuple[float, float],
                angle_deg: float) -> tuple[float, np.ndarray, float]:
    """IoU and view transform of `moving_mask` rotated by `angle_deg` about its `centroid`
    and shifted to the overlap maximum with the fixed mask."""
    cx, cy = centroid
    side = overlap.side
    centre = (side - 1) / 2.0
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    rotate = np.array([[c, -s, centre - c * cx + s * cy], [s, c, centre - s * cx - c * cy], [0.0, 0.0, 1.0]])
    rotated = cv2.warpAffine(moving_mask.astype(np.float32), rotate[:2], (side, side), flags=cv2.INTER_LINEAR)
    corr = overlap.correlate(rotated)
    ky, kx = np.unravel_index(np.argmax(corr), corr.shape)
    inter = float(corr[ky, kx])
    union = float(overlap.area + rotated.sum()) - inter
    shift = np.array([[1.0, 0.0, kx - (side - 1)], [0.0, 1.0, ky - (side - 1)], [0.0, 0.0, 1.0]])
    return inter / max(union, 1e-9), shift @ rotate, angle_deg


def _circular_peaks(values: np.ndarray) -> np.ndarray:
    """Indices of local maxima of a circular sequence (ties count once)."""
    left, right = np.roll(values, 1), np.roll(values, -1)
    return np.flatnonzero((values > left) & (values >= right))
