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
processes, one per core (much of the work holds the GIL, so threads barely overlap), which
read the pixels from one shared-memory buffer. The texture statistics are exact, vectorised
equivalents of scikit-image's `graycomatrix`/`graycoprops`; the DoG bands come from a
Gaussian pyramid (`VERSION` 2).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

VERSION = 5  # of the descriptor values, part of their cache key: 3 = pooled from dense maps (`stimpute.features.dense`), 4 = sparse windows mapped alone, maps on the level's even-pixel lattice, 5 = each blob's statistics spread over its bounding box's cells, colour statistics and OD histograms at every fourth pixel, the DoG's σ 2 band at half resolution
TISSUE_MAX_GRAY = 215  # brighter pixels are glass / background
NUCLEUS_H_OD = (0.05, 0.12)  # rgb2hed haematoxylin thresholds (after smoothing): loose and strict nuclei
NUCLEUS_LOG_AREA_EDGES = np.log([4, 16, 40, 80, 160, 400, 1e9])  # blob area bins, px
MIN_NUCLEUS_PX = 4
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
LBP_POINTS = 8
DOG_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
CHUNKS_PER_WORKER = 4  # tasks per worker process and batch
DOG_MIN_SIDE = 32  # px: the DoG pyramid halves no image below this side


# Colour deconvolution as `skimage.color.rgb2hed` computes it, via a per-byte lookup table:
# optical density log(max(v/255, 1e-6)) / log(1e-6), then the H/E/DAB unmixing matrix.
_OD_LUT = (np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)).astype(np.float32)
_OD_LUT3 = np.repeat(_OD_LUT[:, None], 3, axis=1).reshape(256, 1, 3)  # one table per channel, for cv2.LUT
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # skimage.color.rgb_from_hed
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)  # skimage's hed_from_rgb, without importing skimage


def describe_patch(rgb: np.ndarray) -> np.ndarray:
    """Descriptor vector (float32, `HANDCRAFTED_DIM`) of one (H, W, 3) uint8 patch."""
    return np.concatenate(list(_blocks(rgb).values())).astype(np.float32)


def _blocks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    rgb = np.ascontiguousarray(rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    tissue = gray < TISSUE_MAX_GRAY
    od = cv2.LUT(rgb, _OD_LUT3)
    return {"colour": _colour(rgb, od, tissue), "nuclei": _nuclei(_unmix(od, 1), tissue),
            "glcm": _glcm(gray), "lbp": _lbp(gray), "dog": _dog(gray)}


def _unmix(od: np.ndarray, stains: int) -> np.ndarray:
    """The first `stains` of haematoxylin, eosin, DAB (`rgb2hed`) from optical density (H, W, 3)."""
    return np.maximum(cv2.transform(od, np.ascontiguousarray(_HED_FROM_RGB[:, :stains].T)), 0.0)


def describe_batch(patches: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Descriptors (..., dim) of patches (..., H, W, 3), split over `workers` processes
    (default: one per core; 1: in this process)."""
    flat = patches.reshape(-1, *patches.shape[-3:])
    workers = min(workers or os.cpu_count() or 1, len(flat))
    if workers <= 1:
        return _describe_many(flat).reshape(*patches.shape[:-3], -1)
    chunks = min(len(flat), CHUNKS_PER_WORKER * workers)  # several per worker: a slowed worker holds up less
    bounds = np.linspace(0, len(flat), chunks + 1).astype(int)
    with _BATCH_LOCK:  # the pixels go through shared memory: pickling them through the pool's pipes cost ~0.8 ms a patch
        shm = _batch_memory(flat.nbytes)
        np.ndarray(flat.shape, np.uint8, shm.buf)[:] = flat
        parts = worker_pool(workers).map(_describe_shared, [shm.name] * chunks, [flat.shape] * chunks,
                                         bounds[:-1], bounds[1:])
        rows = np.concatenate(list(parts))
    return rows.reshape(*patches.shape[:-3], -1)


_BATCH_LOCK = threading.Lock()
_BATCH: list[SharedMemory] = []  # the parent's batch buffer, kept (fresh pages cost ~0.2 ms a patch) and grown
_ATTACHED: dict[str, SharedMemory] = {}  # a worker's view of the latest batch buffer


def _batch_memory(nbytes: int) -> SharedMemory:
    """The shared batch buffer, at least `nbytes` large (a larger one replaces it)."""
    if not _BATCH or _BATCH[0].size < nbytes:
        _release_batch_memory()
        _BATCH.append(SharedMemory(create=True, size=max(nbytes, 1)))
    return _BATCH[0]


@atexit.register
def _release_batch_memory() -> None:
    while _BATCH:
        shm = _BATCH.pop()
        shm.close()
        shm.unlink()


def _describe_shared(name: str, shape: tuple, start: int, stop: int) -> np.ndarray:
    """Descriptors of patches [start, stop) of the (N, H, W, 3) uint8 array in shared memory `name`."""
    if name not in _ATTACHED:
        for old in _ATTACHED.values():
            old.close()
        _ATTACHED.clear()
        _ATTACHED[name] = SharedMemory(name)
    return _describe_many(np.ndarray(shape, np.uint8, _ATTACHED[name].buf)[start:stop])


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
        resource_tracker.ensure_running()  # shared with the workers, which attach each batch's shared memory
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


def _colour(rgb: np.ndarray, od: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Tissue fraction; optical density mean, sd and deciles; mean haematoxylin and eosin.

    Deconvolved stain spreads and hue histograms were tried and dropped: they follow each
    slide's staining more than its tissue and lowered cross-section prediction.
    Distribution statistics use every other pixel in each direction: ample, 4× cheaper.
    Optical density is a function of the byte value, so its statistics come from the
    256-bin histogram of each channel (the same values as over the pixels, far cheaper).
    """
    keep = tissue[::2, ::2]
    mask = np.ascontiguousarray(keep).view(np.uint8) if keep.sum() >= 16 else None
    sub = np.ascontiguousarray(rgb[::2, ::2])
    counts = np.stack([cv2.calcHist([sub], [c], mask, [256], [0, 256]).ravel() for c in range(3)]).astype(np.float64)
    n = counts[0].sum()
    mean = counts @ _OD_LUT / n
    sd = np.sqrt(np.maximum(counts @ _OD_LUT.astype(np.float64) ** 2 / n - mean**2, 0.0))
    he_means = cv2.mean(_unmix(np.ascontiguousarray(od[::2, ::2]), 2), mask)[:2]
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
    h = cv2.GaussianBlur(haem, (0, 0), 1.0)
    tissue_px = max(int(tissue.sum()), 1)
    return np.concatenate([_blobs(h, ((h > t) & tissue).view(np.uint8), tissue_px) for t in NUCLEUS_H_OD])


def _blobs(h: np.ndarray, mask: np.ndarray, tissue_px: int) -> np.ndarray:
    """Statistics of the connected haematoxylin blobs of one threshold (`mask`: 0/1 uint8)."""
    rows, cols = mask.shape
    small = -(-rows // 2) * -(-cols // 2) < 2**16 - 1  # 8-connected blobs: at most one per 2 × 2 px; 16-bit labels are ~2× faster
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_16U if small else cv2.CV_32S)
    stats = stats[1:]
    mask_px = stats[:, cv2.CC_STAT_AREA].sum()  # every mask pixel lies in one blob
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= MIN_NUCLEUS_PX]
    if len(stats) == 0:
        return np.zeros(7 + len(NUCLEUS_LOG_AREA_EDGES) - 1)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float32)
    w, hh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    elong = np.maximum(w, hh) / np.maximum(np.minimum(w, hh), 1)
    summary = [
        len(area) / tissue_px * 1e3,  # nuclei per 1000 tissue px
        mask_px / tissue_px,  # nuclear fraction of tissue
        np.log(area.mean()),
        area.std() / area.mean(),
        elong.mean(),
        (area / (w * hh)).mean(),  # fill of the bounding box: round vs irregular
        cv2.mean(h, mask)[0],
    ]
    # size histogram (small lymphocytes vs large tumour nuclei), binned as np.histogram bins
    size_bin = np.searchsorted(NUCLEUS_LOG_AREA_EDGES, np.log(area), side="right") - 1
    sizes = np.bincount(size_bin[size_bin >= 0], minlength=len(NUCLEUS_LOG_AREA_EDGES) - 1) / tissue_px * 1e3
    return np.concatenate([summary, sizes])


def _glcm_offsets() -> list[tuple[int, int]]:
    """(row, col) pixel offsets of each GLCM distance at angles 0, π/4, π/2, 3π/4, rounded
    as `skimage.feature.graycomatrix` rounds them (distance-major)."""
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    return [(round(np.sin(a) * d), round(np.cos(a) * d)) for d in GLCM_DISTANCES for a in angles]


_GLCM_OFFSETS = _glcm_offsets()
_GLCM_I, _GLCM_J = np.ogrid[0:GLCM_LEVELS, 0:GLCM_LEVELS]


def glcm(gray: np.ndarray) -> np.ndarray:
    """Symmetric, normalised grey-level co-occurrence matrices (offsets, levels, levels) of a
    uint8 image quantised to `GLCM_LEVELS`: `graycomatrix(..., symmetric=True, normed=True)`
    with the offsets moved to the front, counted by one 2-D `cv2.calcHist` per offset."""
    q = gray // (256 // GLCM_LEVELS)
    H, W = q.shape
    counts = np.empty((len(_GLCM_OFFSETS), GLCM_LEVELS, GLCM_LEVELS))
    for k, (dr, dc) in enumerate(_GLCM_OFFSETS):
        first = q[max(0, -dr):H - max(0, dr), max(0, -dc):W - max(0, dc)]
        second = q[max(0, dr):H - max(0, -dr), max(0, dc):W - max(0, -dc)]
        counts[k] = cv2.calcHist([first, second], [0, 1], None, [GLCM_LEVELS] * 2, [0, GLCM_LEVELS] * 2)
    counts += counts.transpose(0, 2, 1)
    total = counts.sum(axis=(1, 2), keepdims=True)
    return counts / np.where(total == 0, 1, total)


def glcm_props(p: np.ndarray) -> dict[str, np.ndarray]:
    """`graycoprops` contrast, homogeneity, energy and correlation of each matrix of
    `p` (offsets, levels, levels), symmetric and normalised."""
    i, j = _GLCM_I, _GLCM_J
    mean = (p * i).sum(axis=(1, 2))  # = the column mean: p is symmetric
    dev = i - mean[:, None, None]
    var = (p * dev**2).sum(axis=(1, 2))
    cov = (p * dev * dev.transpose(0, 2, 1)).sum(axis=(1, 2))
    flat = var < 1e-30  # graycoprops: correlation 1 where either standard deviation is < 1e-15
    return {"contrast": (p * (i - j) ** 2).sum(axis=(1, 2)),
            "homogeneity": (p / (1.0 + (i - j) ** 2)).sum(axis=(1, 2)),
            "energy": np.sqrt((p**2).sum(axis=(1, 2))),
            "correlation": np.where(flat, 1.0, cov / np.where(flat, 1.0, var))}


def _glcm(gray: np.ndarray) -> np.ndarray:
    props = glcm_props(glcm(gray))
    return np.concatenate([props[p].reshape(len(GLCM_DISTANCES), -1).mean(axis=1) for p in GLCM_PROPS])  # average over angles


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
    centre = gray[1:-1, 1:-1]
    code = np.zeros(centre.shape, np.uint8)
    for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
        code |= (gray[1 + dy : gray.shape[0] - 1 + dy, 1 + dx : gray.shape[1] - 1 + dx] >= centre).view(np.uint8) << bit
    codes = np.bincount(code.ravel(), minlength=2**LBP_POINTS)
    return np.bincount(_LBP_LABELS, weights=codes, minlength=LBP_POINTS + 2) / code.size


def _dog(gray: np.ndarray) -> np.ndarray:
    """Mean absolute difference-of-Gaussians between consecutive `DOG_SIGMAS` (px).

    A Gaussian pyramid: each blur is reached from the previous one (σ² adds), and an image
    is halved before blurring further once it holds little finer (`dog_halves`), so the
    coarse bands cost a fraction of full-resolution blurs of σ 2-16; each band's mean is
    taken at the resolution of its finer blur."""
    level = gray.astype(np.float32)
    step, sigma = 1, 0.0  # the level's pixel side and its blur, in full-resolution px
    bands = []
    for target in DOG_SIGMAS:
        if dog_halves(sigma, step, min(level.shape)):
            level, step = np.ascontiguousarray(level[::2, ::2]), step * 2
        blurred = cv2.GaussianBlur(level, (0, 0), np.sqrt(target**2 - sigma**2) / step)
        bands.append(np.abs(level - blurred).mean())
        level, sigma = blurred, target
    return np.array(bands)


def dog_halves(sigma: float, step: int, side: int) -> bool:
    """Whether the DoG pyramid halves a level of `side` px (`step` full-resolution px each,
    blurred by `sigma` of them) before its next blur: the full-resolution image once blurred
    by 1 px (its σ √3 blur at full resolution was 5 % of the dense maps' CPU), a halved one
    once blurred by 2 of its px; no level below `DOG_MIN_SIDE`."""
    return sigma / step >= (1.0 if step == 1 else 2.0) and side >= 2 * DOG_MIN_SIDE


def _block_slices() -> dict[str, slice]:
    sizes = {k: v.size for k, v in _blocks(np.full((32, 32, 3), 200, np.uint8)).items()}
    ends = np.cumsum(list(sizes.values()))
    return {k: slice(int(e - n), int(e)) for (k, n), e in zip(sizes.items(), ends)}


BLOCKS: dict[str, slice] = _block_slices()  # where each descriptor group sits in the vector
HANDCRAFTED_DIM = max(s.stop for s in BLOCKS.values())
