"""The offline default encoder: H&E morphology descriptors that need no downloaded weights.

Each 224 px patch (any scale) is described by
- colour: tissue fraction, optical-density statistics over tissue pixels and the mean
  haematoxylin and eosin of `skimage.color.rgb2hed` colour deconvolution;
- nuclei: haematoxylin-rich blobs at a loose and a strict OD threshold — density, a
  size histogram (lymphocytes vs large tumour nuclei), elongation, fill, coverage;
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
from skimage.color import hed_from_rgb
from skimage.feature import graycomatrix, graycoprops

TISSUE_MAX_GRAY = 215  # brighter pixels are glass / background
NUCLEUS_H_OD = (0.05, 0.12)  # rgb2hed haematoxylin thresholds (after smoothing): loose and strict nuclei
NUCLEUS_LOG_AREA_EDGES = np.log([4, 16, 40, 80, 160, 400, 1e9])  # blob area bins, px
MIN_NUCLEUS_PX = 4
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
LBP_POINTS = 8
DOG_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)


# Colour deconvolution as `skimage.color.rgb2hed` computes it, via a per-byte lookup table:
# optical density log(max(v/255, 1e-6)) / log(1e-6), then the H/E/DAB unmixing matrix.
_OD_LUT = (np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)).astype(np.float32)
_HED_FROM_RGB = hed_from_rgb.astype(np.float32)


def describe_patch(rgb: np.ndarray) -> np.ndarray:
    """Descriptor vector (float32, `HANDCRAFTED_DIM`) of one (H, W, 3) uint8 patch."""
    return np.concatenate(list(_blocks(rgb).values())).astype(np.float32)


def _blocks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    tissue = gray < TISSUE_MAX_GRAY
    od = _OD_LUT[rgb]
    hed = np.maximum(od @ _HED_FROM_RGB, 0.0)  # == rgb2hed(rgb)
    return {"colour": _colour(od, hed, tissue), "nuclei": _nuclei(hed[..., 0], tissue),
            "glcm": _glcm(gray), "lbp": _lbp(gray), "dog": _dog(gray)}


def describe_batch(patches: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Descriptors (..., dim) of patches (..., H, W, 3), computed on a thread pool."""
    flat = patches.reshape(-1, *patches.shape[-3:])
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(flat) == 1:
        rows = [describe_patch(p) for p in flat]
    else:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(describe_patch, flat))
    return np.stack(rows).reshape(*patches.shape[:-3], -1)


def _colour(od: np.ndarray, hed: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Tissue fraction; optical density mean, sd and deciles; mean haematoxylin and eosin.

    Deconvolved stain spreads and hue histograms were tried and dropped: they follow each
    slide's staining more than its tissue and lowered cross-section prediction.
    Distribution statistics use every other pixel in each direction: ample, 4× cheaper.
    """
    sub = (slice(None, None, 2), slice(None, None, 2))
    keep = tissue[sub] if tissue[sub].sum() >= 16 else np.ones_like(tissue[sub])
    pix = od[sub][keep]
    he_means = hed[sub][keep][:, :2].mean(0)
    return np.concatenate([[tissue.mean()], pix.mean(0), pix.std(0),
                           np.percentile(pix, (10, 50, 90), axis=0).ravel(), he_means])


def _nuclei(haem: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    h = cv2.GaussianBlur(np.ascontiguousarray(haem), (0, 0), 1.0)
    tissue_px = max(int(tissue.sum()), 1)
    return np.concatenate([_blobs(h, (h > t) & tissue, tissue_px) for t in NUCLEUS_H_OD])


def _blobs(h: np.ndarray, mask: np.ndarray, tissue_px: int) -> np.ndarray:
    """Statistics of the connected haematoxylin blobs of one threshold."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    stats = stats[1:]
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= MIN_NUCLEUS_PX]
    if len(stats) == 0:
        return np.zeros(7 + len(NUCLEUS_LOG_AREA_EDGES) - 1)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float32)
    w, hh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    elong = np.maximum(w, hh) / np.maximum(np.minimum(w, hh), 1)
    summary = [
        len(area) / tissue_px * 1e3,  # nuclei per 1000 tissue px
        mask.sum() / tissue_px,  # nuclear fraction of tissue
        np.log(area.mean()),
        area.std() / area.mean(),
        elong.mean(),
        (area / (w * hh)).mean(),  # fill of the bounding box: round vs irregular
        h[mask].mean(),
    ]
    sizes = np.histogram(np.log(area), NUCLEUS_LOG_AREA_EDGES)[0] / tissue_px * 1e3  # small lymphocytes vs large tumour nuclei
    return np.concatenate([summary, sizes])


def _glcm(gray: np.ndarray) -> np.ndarray:
    q = (gray.astype(np.uint16) * GLCM_LEVELS // 256).astype(np.uint8)
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    glcm = graycomatrix(q, GLCM_DISTANCES, angles, levels=GLCM_LEVELS, symmetric=True, normed=True)
    props = [graycoprops(glcm, p).mean(axis=1) for p in GLCM_PROPS]  # average over angles
    return np.nan_to_num(np.concatenate(props), nan=1.0)


def _uniform_lbp_labels() -> np.ndarray:
    """Rotation-invariant uniform LBP label of each 8-bit code: its number of set bits when
    the circular pattern has at most two 0/1 transitions, else `LBP_POINTS + 1`."""
    codes = np.arange(2**LBP_POINTS)
    bits = (codes[:, None] >> np.arange(LBP_POINTS)) & 1
    transitions = (bits != np.roll(bits, 1, axis=1)).sum(axis=1)
    return np.where(transitions <= 2, bits.sum(axis=1), LBP_POINTS + 1)


_LBP_LABELS = _uniform_lbp_labels()
_LBP_OFFSETS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))  # (dy, dx), radius 1


def _lbp(gray: np.ndarray) -> np.ndarray:
    """Histogram of uniform local binary patterns over the 8-pixel square neighbourhood."""
    g = gray.astype(np.int16)
    centre = g[1:-1, 1:-1]
    code = np.zeros(centre.shape, np.int32)
    for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
        code |= (g[1 + dy : g.shape[0] - 1 + dy, 1 + dx : g.shape[1] - 1 + dx] >= centre).astype(np.int32) << bit
    return np.bincount(_LBP_LABELS[code].ravel(), minlength=LBP_POINTS + 2) / code.size


def _dog(gray: np.ndarray) -> np.ndarray:
    g = gray.astype(np.float32)
    blurred = [g] + [cv2.GaussianBlur(g, (0, 0), s) for s in DOG_SIGMAS]
    return np.array([np.abs(a - b).mean() for a, b in zip(blurred[:-1], blurred[1:])])


def _block_slices() -> dict[str, slice]:
    sizes = {k: v.size for k, v in _blocks(np.full((32, 32, 3), 200, np.uint8)).items()}
    ends = np.cumsum(list(sizes.values()))
    return {k: slice(int(e - n), int(e)) for (k, n), e in zip(sizes.items(), ends)}


BLOCKS: dict[str, slice] = _block_slices()  # where each descriptor group sits in the vector
HANDCRAFTED_DIM = max(s.stop for s in BLOCKS.values())
