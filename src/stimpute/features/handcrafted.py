"""The offline default encoder: H&E morphology descriptors that need no downloaded weights.

Each 224 px patch (any scale) is described by
- colour: tissue fraction, optical-density and H&E (`skimage.color.rgb2hed`) statistics
  over tissue pixels, and a coarse hue/saturation histogram;
- nuclei: haematoxylin-rich blobs (fixed OD threshold after light smoothing) — density,
  area distribution, elongation and fill, the fraction of tissue covered;
- texture: grey-level co-occurrence (GLCM) properties at two distances, a uniform LBP
  histogram, and band energies of a difference-of-Gaussians pyramid (a cheap stand-in
  for a Gabor bank: it measures how much structure there is at 1-16 px).

At the three stimpute scales this reads the spot's own cells (spot patch) and its tissue
context (region windows). Patches are independent, so batches are split over threads
(OpenCV and numpy release the GIL).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

TISSUE_MAX_GRAY = 215  # brighter pixels are glass / background
NUCLEUS_H_OD = 0.08  # rgb2hed haematoxylin above this (after smoothing) is nuclear
MIN_NUCLEUS_PX = 4
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
LBP_POINTS = 8
DOG_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
HUE_BINS, SAT_BINS = 6, 3


def describe_patch(rgb: np.ndarray) -> np.ndarray:
    """Descriptor vector (float32, `HANDCRAFTED_DIM`) of one (H, W, 3) uint8 patch."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    tissue = gray < TISSUE_MAX_GRAY
    return np.concatenate(
        [_colour(rgb, tissue), _nuclei(rgb, tissue), _glcm(gray), _lbp(gray), _dog(gray)]
    ).astype(np.float32)


def describe_batch(patches: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Descriptors (N, dim) of N patches (N, H, W, 3), computed on a thread pool."""
    flat = patches.reshape(-1, *patches.shape[-3:])
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(flat) == 1:
        rows = [describe_patch(p) for p in flat]
    else:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(describe_patch, flat))
    return np.stack(rows).reshape(*patches.shape[:-3], -1)


def _colour(rgb: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    frac = tissue.mean()
    pix = rgb[tissue] if tissue.sum() >= 16 else rgb.reshape(-1, 3)
    od = -np.log((pix.astype(np.float32) + 1.0) / 256.0)
    hed = rgb2hed(pix[None]).reshape(-1, 3)
    hsv = cv2.cvtColor(pix[None], cv2.COLOR_RGB2HSV).reshape(-1, 3)
    hist = np.histogram2d(hsv[:, 0], hsv[:, 1], bins=(HUE_BINS, SAT_BINS), range=((0, 180), (0, 256)))[0]
    stats = [frac]
    for chans in (od, hed):
        stats += list(chans.mean(0)) + list(chans.std(0))
        stats += list(np.percentile(chans, (10, 50, 90), axis=0).ravel())
    return np.concatenate([stats, hist.ravel() / len(pix)])


def _nuclei(rgb: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    h = rgb2hed(rgb)[..., 0].astype(np.float32)
    h = cv2.GaussianBlur(h, (0, 0), 1.0)
    mask = ((h > NUCLEUS_H_OD) & tissue).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    stats = stats[1:]
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= MIN_NUCLEUS_PX]
    tissue_px = max(int(tissue.sum()), 1)
    if len(stats) == 0:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float32)
    w, hh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    elong = np.maximum(w, hh) / np.maximum(np.minimum(w, hh), 1)
    fill = area / (w * hh)
    return np.array(
        [
            len(area) / tissue_px * 1e3,  # nuclei per 1000 tissue px
            mask.sum() / tissue_px,  # nuclear fraction of tissue
            np.log(area.mean()),
            np.log(np.median(area)),
            area.std() / area.mean(),
            elong.mean(),
            fill.mean(),
            h[mask > 0].mean(),
        ]
    )


def _glcm(gray: np.ndarray) -> np.ndarray:
    q = (gray.astype(np.uint16) * GLCM_LEVELS // 256).astype(np.uint8)
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    glcm = graycomatrix(q, GLCM_DISTANCES, angles, levels=GLCM_LEVELS, symmetric=True, normed=True)
    props = [graycoprops(glcm, p).mean(axis=1) for p in GLCM_PROPS]  # average over angles
    return np.nan_to_num(np.concatenate(props), nan=1.0)


def _lbp(gray: np.ndarray) -> np.ndarray:
    codes = local_binary_pattern(gray, LBP_POINTS, 1, method="uniform")
    return np.bincount(codes.astype(np.int64).ravel(), minlength=LBP_POINTS + 2) / codes.size


def _dog(gray: np.ndarray) -> np.ndarray:
    g = gray.astype(np.float32)
    blurred = [g] + [cv2.GaussianBlur(g, (0, 0), s) for s in DOG_SIGMAS]
    return np.array([np.abs(a - b).mean() for a, b in zip(blurred[:-1], blurred[1:])])


HANDCRAFTED_DIM = int(describe_patch(np.full((32, 32, 3), 200, np.uint8)).size)
