"""Coarse rigid alignment: rotation (and mirror) search on tissue masks.

For every rotation of the moving mask (the full circle, in `step_deg` steps, plain and
mirrored), the translation that maximises the overlap with the fixed mask comes from one
FFT cross-correlation; because rigid motions keep mask areas, maximal overlap is maximal
IoU. The best local optima over angle become candidates for the refinement stage, which
also looks at the stain texture (masks of near-symmetric tissue can fit several ways).

Coarse to fine: every angle is first scored on the masks at half their side (a quarter of
the FFT work), and only the angles near the best of those peaks, or scoring as high, are
scored on the masks themselves; a candidate is an angle whose own score beats both its
neighbours' own. On HER2-ST and the synthetic stacks this finds the exhaustive search's
candidates exactly (`benchmarks/bench_register_search.py` checks it) at about half its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import fft

from stimpute.register.masks import View

COARSE_FACTOR = 2  # the coarse pass sees the masks at half their side
FINE_WINDOW = 3  # angle steps either side of a coarse peak scored on the masks themselves (2 sufficed on every test pair)
EXTRA_PEAKS = 2  # coarse peaks beyond the candidates' number whose neighbourhoods are scored
COARSE_MARGIN = 0.05  # how far a coarse peak's IoU may fall below its own at full size (up to 0.046 on the test pairs)


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


def rotation_search(fixed: View, moving: View, step_deg: float = 3.0, n_candidates: int = 4,
                    exhaustive: bool = False) -> list[Candidate]:
    """Best rigid placements of `moving` on `fixed` over all angles and the mirror, best first.

    Both masks are cut to their tissue's bounding box first: the glass around it adds
    nothing to any overlap, and the FFTs shrink about 3× on HER2-ST thumbnails. Whole
    pixels are cut, so every overlap is the uncut masks' own, shifted. `exhaustive` scores
    every angle on the masks themselves, skipping the coarse pass (the reference it matches)."""
    (fy, fx), fixed_mask = _tissue_box(fixed.mask)
    (my, mx), moving_mask = _tissue_box(moving.mask)
    angles = np.arange(0.0, 360.0, step_deg)
    overlap = _Overlap(fixed_mask, _side(moving_mask))
    profiles = [_Profile(overlap, np.fliplr(moving_mask) if mirrored else moving_mask, angles)
                for mirrored in (False, True)]
    if exhaustive:
        for profile in profiles:
            profile.score(range(len(angles)))
    else:
        _coarse_to_fine(fixed_mask, profiles, n_candidates)
    uncut = np.array([[1.0, 0.0, fx], [0.0, 1.0, fy], [0.0, 0.0, 1.0]])  # cut fixed px -> fixed view px
    found = []
    for mirrored, profile in zip((False, True), profiles):
        # moving view px -> cut (and mirrored) moving px
        cut = np.array([[1.0, 0.0, -mx], [0.0, 1.0, -my], [0.0, 0.0, 1.0]])
        pre = flip_x(moving_mask.shape[1]) @ cut if mirrored else cut
        for i in np.flatnonzero(profile.status() == 1):
            iou, matrix_view = profile.iou[i], profile.placements[i]
            found.append(Candidate(full_matrix(fixed, moving, uncut @ matrix_view @ pre), iou, angles[i], mirrored))
    found.sort(key=lambda c: -c.iou)
    return found[:n_candidates]


def _coarse_to_fine(fixed_mask: np.ndarray, profiles: list[_Profile], n_candidates: int) -> None:
    """Score, in `profiles`, the angles that can hold their `n_candidates` best peaks.

    Pass 1 scores every angle on the masks at 1/`COARSE_FACTOR` of their side. Pass 2 scores
    on the masks themselves the angles within `FINE_WINDOW` steps of the best
    `n_candidates + EXTRA_PEAKS` coarse peaks (a peak of the masks can sit on a shoulder of
    the coarser profile), and those whose coarse score reaches the `n_candidates`-th coarse
    peak's. Then, until none is left: the unscored neighbours of every scored angle that may
    still be a peak and scores at least the `n_candidates`-th confirmed peak (climbing to it),
    and the windows of the coarse peaks within `COARSE_MARGIN` below that score."""
    overlap = _Overlap(_shrink(fixed_mask), _side(_shrink(profiles[0].mask)))
    coarse = [profile.coarse(overlap) for profile in profiles]
    peaks = sorted(((c[i], k, i) for k, c in enumerate(coarse) for i in _circular_peaks(c)), key=lambda p: -p[0])
    level = peaks[min(n_candidates, len(peaks)) - 1][0] if peaks else -np.inf  # no coarse peak: score all
    todo = [set(np.flatnonzero(c >= level).tolist()) for c in coarse]
    windowed, floor = set(), None
    while True:
        near = peaks[:n_candidates + EXTRA_PEAKS] if floor is None else [p for p in peaks if p[0] >= floor - COARSE_MARGIN]
        for _, k, i in near:
            if (k, i) not in windowed:
                windowed.add((k, i))
                todo[k] |= {(i + d) % len(coarse[k]) for d in range(-FINE_WINDOW, FINE_WINDOW + 1)}
        todo = [{i for i in indices if np.isnan(profile.iou[i])} for profile, indices in zip(profiles, todo)]
        if not any(todo):
            return
        for profile, indices in zip(profiles, todo):
            profile.score(indices)
        statuses = [profile.status() for profile in profiles]
        confirmed = np.sort(np.concatenate([p.iou[s == 1] for p, s in zip(profiles, statuses)]))[::-1]
        floor = confirmed[n_candidates - 1] if len(confirmed) >= n_candidates else -np.inf
        todo = [set(profile.open_neighbours((status == 0) & (profile.iou >= floor)))
                for profile, status in zip(profiles, statuses)]


def _side(mask: np.ndarray) -> int:
    """Side of a square that holds `mask` at any angle."""
    return int(np.ceil(np.hypot(*mask.shape))) + 2


def _shrink(mask: np.ndarray) -> np.ndarray:
    """`mask` at 1/`COARSE_FACTOR` of its side, each pixel its block's tissue share."""
    h, w = mask.shape
    size = (max(1, round(w / COARSE_FACTOR)), max(1, round(h / COARSE_FACTOR)))
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)


class _Profile:
    """Mask IoU over the angles of one (plain or mirrored) moving mask, each angle at its best
    translation; scored on demand, so that the coarse-to-fine search scores only a few."""

    def __init__(self, overlap: _Overlap, moving_mask: np.ndarray, angles: np.ndarray):
        self.overlap, self.mask, self.angles = overlap, moving_mask, angles
        ys, xs = np.nonzero(moving_mask)
        self.centroid = (xs.mean(), ys.mean())
        self.iou = np.full(len(angles), np.nan)
        self.placements: dict[int, np.ndarray] = {}  # angle index -> view transform

    def score(self, indices) -> None:
        """IoU and placement at the angles `indices` (those scored before are kept)."""
        for i in indices:
            if i not in self.placements:
                self.iou[i], self.placements[i] = _best_shift(self.overlap, self.mask, self.centroid, self.angles[i])

    def coarse(self, overlap: _Overlap) -> np.ndarray:
        """IoU at every angle of this mask shrunk (`_shrink`) on `overlap`'s shrunk fixed mask."""
        small = _shrink(self.mask)
        centroid = tuple((c + 0.5) / COARSE_FACTOR - 0.5 for c in self.centroid)  # pixel centres stay aligned
        return np.array([_best_shift(overlap, small, centroid, angle)[0] for angle in self.angles])

    def status(self) -> np.ndarray:
        """Per angle: 1 a peak (`_circular_peaks` of the scores), -1 not, 0 unknown: unscored,
        or a neighbour unscored while the scored one does not beat it."""
        iou, left, right = self.iou, np.roll(self.iou, 1), np.roll(self.iou, -1)
        scored = ~np.isnan(iou)
        known = scored & ~np.isnan(left) & ~np.isnan(right)
        beaten = scored & ((left >= iou) | (right > iou))  # False where a neighbour is unscored (NaN)
        status = np.zeros(len(iou), int)
        status[known] = np.where(beaten[known], -1, 1)
        status[beaten] = -1
        return status

    def open_neighbours(self, where: np.ndarray) -> list[int]:
        """The unscored neighbours of the angles `where`."""
        m = len(self.iou)
        near = np.concatenate([np.flatnonzero(where) - 1, np.flatnonzero(where) + 1]) % m
        return sorted(set(near[np.isnan(self.iou[near])].tolist()))


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
                angle_deg: float) -> tuple[float, np.ndarray]:
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
    return inter / max(union, 1e-9), shift @ rotate


def _circular_peaks(values: np.ndarray) -> np.ndarray:
    """Indices of local maxima of a circular sequence (ties count once)."""
    left, right = np.roll(values, 1), np.roll(values, -1)
    return np.flatnonzero((values > left) & (values >= right))
