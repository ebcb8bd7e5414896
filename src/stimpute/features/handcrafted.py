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
context (region windows). Patches are independent, so batches are split over worker
processes, one per core (much of the work holds the GIL, so threads barely overlap).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

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
    return {"colour": _colour(rgb, hed, tissue), "nuclei": _nuclei(hed[..., 0], tissue),
            "glcm": _glcm(gray), "lbp": _lbp(gray), "dog": _dog(gray)}


def describe_batch(patches: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Descriptors (..., dim) of patches (..., H, W, 3), split over `workers` processes
    (default: one per core; 1: in this process)."""
    flat = patches.reshape(-1, *patches.shape[-3:])
    workers = min(workers or os.cpu_count() or 1, len(flat))
    if workers <= 1:
        return _describe_many(flat).reshape(*patches.shape[:-3], -1)
    chunks = np.array_split(flat, workers)
    rows = np.concatenate(list(worker_pool(workers).map(_describe_many, chunks)))
    return rows.reshape(*patches.shape[:-3], -1)


def _describe_many(patches: np.ndarray) -> np.ndarray:
    return np.stack([describe_patch(p) for p in patches])


_POOLS: dict[int, ProcessPoolExecutor] = {}


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool kept for the life of the program (started once: workers are forked
    where the platform allows, which is quick and needs no re-import of the caller's script).
    OpenCV re-creates its thread pool in forked children by itself; changing its thread
    count there (`cv2.setNumThreads`) deadlocks, so it is left alone."""
    if workers not in _POOLS:
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_die_with_parent,
                                   initargs=(os.getpid(), threading.current_thread() is threading.main_thread()))
        pool.submit(int).result()  # start the workers now, before callers start threads of their own
        _POOLS[workers] = pool
    return _POOLS[workers]


def _die_with_parent(parent: int, from_main_thread: bool) -> None:
    """Linux: a worker is killed with its parent, so a killed `stimpute` leaves no idle
    workers behind (they would wait on the pool's queue for ever). Only for pools started
    by the main thread: the kernel signals when the forking *thread* ends."""
    if from_main_thread and sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _colour(rgb: np.ndarray, hed: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Tissue fraction; optical density mean, sd and deciles; mean haematoxylin and eosin.

    Deconvolved stain spreads and hue histograms were tried and dropped: they follow each
    slide's staining more than its tissue and lowered cross-section prediction.
    Distribution statistics use every other pixel in each direction: ample, 4× cheaper.
    Optical density is a function of the byte value, so its statistics come from the
    256-bin histogram of each channel (the same values as over the pixels, far cheaper).
    """
    sub = (slice(None, None, 2), slice(None, None, 2))
    keep = tissue[sub] if tissue[sub].sum() >= 16 else np.ones_like(tissue[sub])
    pix = rgb[sub][keep]
    counts = np.stack([np.bincount(pix[:, c], minlength=256) for c in range(3)]).astype(np.float64)
    n = counts[0].sum()
    mean = counts @ _OD_LUT / n
    sd = np.sqrt(np.maximum(counts @ _OD_LUT.astype(np.float64) ** 2 / n - mean**2, 0.0))
    he_means = hed[sub][keep][:, :2].mean(0)
    return np.concatenate([[tissue.mean()], mean, sd, _od_percentiles(counts, (10, 50, 90)).ravel(), he_means])


def _od_percentiles(counts: np.ndarray, q) -> np.ndarray:
    """(len(q), 3) percentiles of optical density, as `np.percentile` (linear) over the pixels,
    from per-channel byte histograms `counts` (3, 256): OD falls as the byte value rises."""
    n = int(counts[0].sum())
    rank = np.asarray(q, np.float64) / 100.0 * (n - 1)  # position in the ascending-OD order
    lo = np.floor(rank).astype(int)
    frac = rank - lo
    out = np.empty((len(rank), 3))
    for c in range(3):
        ascending = np.cumsum(counts[c][::-1])  # OD ascending = byte value descending
        byte = 255 - np.searchsorted(ascending, np.c_[lo, np.minimum(lo + 1, n - 1)], side="right")
        below, above = _OD_LUT[byte].astype(np.float64).T
        out[:, c] = below + frac * (above - below)
    return out


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
