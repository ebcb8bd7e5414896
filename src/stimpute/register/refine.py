"""Fine rigid alignment by intensity (OpenCV ECC) and the quality scores of a placement.

ECC (Evangelidis & Psarakis 2008) maximises the enhanced correlation coefficient between
the fixed stain density and the warped moving one, so it aligns tissue texture, not only
outlines. It is run with a Euclidean motion model on the moving image already resampled
by the coarse placement, so it only has to find a small residual motion.
"""

from __future__ import annotations

import cv2
import numpy as np

from stimpute.register.masks import View
from stimpute.register.rigid import full_matrix, view_matrix

ECC_ITERATIONS = 200
ECC_EPS = 1e-6
ECC_BLUR = 3  # Gaussian kernel (view px) ECC applies to both images: ~37 µm at the HER2-ST refinement scale


def warp_to_fixed(fixed: View, image: np.ndarray, matrix_view: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Resample a moving-view image onto the fixed view's grid (0 outside)."""
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    h, w = fixed.shape
    return cv2.warpAffine(image, matrix_view[:2], (w, h), flags=flags, borderValue=0)


def pair_quality(fixed: View, moving: View, matrix: np.ndarray) -> dict[str, float]:
    """Tissue-mask Dice and stain NCC (over both masks' intersection) of a placement.

    `matrix` maps full-resolution moving px to fixed px.
    """
    a = view_matrix(fixed, moving, matrix)
    mask = warp_to_fixed(fixed, moving.mask.astype(np.uint8), a, nearest=True).astype(bool)
    inter = np.logical_and(mask, fixed.mask)
    dice = 2.0 * inter.sum() / max(mask.sum() + fixed.mask.sum(), 1)
    density = warp_to_fixed(fixed, moving.density, a)
    return {"dice": float(dice), "ncc": _ncc(fixed.density[inter], density[inter])}


def refine_ecc(fixed: View, moving: View, matrix: np.ndarray) -> np.ndarray | None:
    """ECC-refined full-resolution transform starting from `matrix`; None if ECC fails.

    The moving view is first resampled onto the fixed grid with `matrix`, and ECC finds
    the small residual rigid motion from the identity: OpenCV's Euclidean ECC loses
    rotations beyond ±90° and cannot represent a mirror, so neither may reach it. The
    whole view is compared, glass included: the tissue outline is part of the signal
    (on synthetic stacks this halves the error of masking ECC to the tissue).
    """
    a = view_matrix(fixed, moving, matrix)
    density = warp_to_fixed(fixed, moving.density, a)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPS)
    try:
        _, residual = cv2.findTransformECC(
            fixed.density, density, np.eye(2, 3, dtype=np.float32), cv2.MOTION_EUCLIDEAN, criteria, None, ECC_BLUR
        )
    except cv2.error:
        return None
    residual = np.vstack([residual.astype(np.float64), [0.0, 0.0, 1.0]])  # fixed px -> pre-warped px
    return full_matrix(fixed, moving, np.linalg.inv(residual) @ a)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0
