"""Handcrafted descriptors of every spot window from dense per-pixel maps, once per image.

The patch path (`handcrafted.describe_patch`) resamples each spot's window at every scale
to 224 px and describes it alone, though the 512 and 1,024 µm windows of neighbouring
spots cover almost the same pixels. Here each scale's level (the image resampled so that a
window is `out_size` px, as the patch path resamples it) is read once, in horizontal strips
with a halo (across only the columns the windows reach), each descriptor family becomes
per-pixel maps whose window means give the descriptor, the maps are summed into cells of
`CELL` px, and each spot's window sums come from running column sums of the cell rows
(linear at fractional cell coordinates: exact where a map is uniform within a cell).
Memory: one strip and the cell rows of one window height, whatever the slide's size.

The maps, per family (the same 67 values as `describe_patch`, in its order):
- colour: tissue fraction; optical density mean and sd, and the mean haematoxylin and eosin
  over tissue; OD deciles from per-window byte histograms of `HIST_BINS` bins (linear within
  a bin); all but the tissue fraction at every fourth pixel (the patch path: every other);
- nuclei: the haematoxylin blobs of the strip; each blob's count, area, elongation, fill
  and size bin spread evenly over its bounding box's cells, so a window counts about the
  share of a blob it holds; the blob mask and its haematoxylin;
- texture: GLCM contrast and homogeneity from the grey-level differences of each offset,
  correlation from contrast and grey-level variance (exact for a symmetric GLCM), and the
  fraction of equal-level pairs in place of energy (not a window mean); uniform LBP labels;
  both at every other pixel (unbiased window means, 4x cheaper); difference-of-Gaussians
  bands on the pyramid the patch path uses for a window.
"""

from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Sequence

import cv2
import numpy as np

from stimpute.data import Section
from stimpute.features import handcrafted as hc
from stimpute.patches import DEFAULT_OUT_SIZE, window_origins, window_sizes_px
from stimpute.threads import opencv_threads

CELL = 8  # level px per cell side
HALO = 48  # level px read around each strip: blobs, LBP/GLCM neighbours and the DoG blurs (3σ) see past its edge
TILE_HALO = 16  # level px read around a window mapped alone: its edge's blobs, LBP/GLCM neighbours, the finer DoG bands
STRIP_PX = 1 << 22  # level px per strip (its rows rounded to whole cells): ~30 B of maps a px alive, per worker
HIST_BINS = 16  # byte bins of the optical-density histograms
_HIST_BITS = 8 - (HIST_BINS.bit_length() - 1)  # a byte's bin: its top bits (HIST_BINS a power of 2)
WORKERS = 2  # threads computing strips (OpenCV and numpy release the GIL)
BOX_CHUNK = 512  # windows summed at once
_N_SIZES = len(hc.NUCLEUS_LOG_AREA_EDGES) - 1
_BLOB_VALUES = ("n", "area", "area2", "elong", "fill")
_LBP_BINS = hc.LBP_POINTS + 2
_DIFF = np.arange(256, dtype=np.float32)  # tables of a grey-level difference (GLCM), for cv2.LUT
_HOM_LUT = 1.0 / (1.0 + _DIFF**2)
# integer maps summed as one, exactly (float32 cell sums below 2**24), and split after summing:
# an offset's squared difference and, 2**16 above, whether it is 0 (4 offsets: < 4 · 31² + 4 · 2**16 a px);
# the GLCM level q and, 2**9 above, q² (16 px a cell: Σq ≤ 496 < 2**9)
_CON_EQ_SHIFT, _Q_SHIFT = 16, 9
_CON_EQ_LUT = (_DIFF**2 + (_DIFF == 0) * 2.0**_CON_EQ_SHIFT).astype(np.int32)
_Q_LUT = (_DIFF + _DIFF**2 * 2.0**_Q_SHIFT).astype(np.int32)
_LBP_LABELS = hc._LBP_LABELS.astype(np.uint8)
_HAEM_LUTS = [np.ascontiguousarray(hc._OD_LUT * hc._HED_FROM_RGB[c, 0]) for c in range(3)]  # OD × haematoxylin weight


def _layout() -> dict[str, slice]:
    """Where each map sits among the cell channels."""
    sizes = {"tissue": 1}
    for t in range(len(hc.NUCLEUS_H_OD)):
        sizes |= {f"mask{t}": 1, f"hmask{t}": 1, **{f"{v}{t}": 1 for v in _BLOB_VALUES}, f"sizes{t}": _N_SIZES}
    sizes |= {"q": 1, "q2": 1, **{f"{p}{d}": 1 for d in hc.GLCM_DISTANCES for p in ("con", "hom", "eq")}}
    sizes |= {"lbp": _LBP_BINS, "dog": len(hc.DOG_SIGMAS), "tsub": 1, "od": 3, "od2": 3, "he": 2, "hist": 3 * HIST_BINS}
    ends = np.cumsum(list(sizes.values()))
    return {k: slice(int(e - n), int(e)) for (k, n), e in zip(sizes.items(), ends)}


CHANNELS = _layout()
N_CHANNELS = max(s.stop for s in CHANNELS.values())


def dense_features(section: Section, scales_um: Sequence[float], out_size: int = DEFAULT_OUT_SIZE,
                   stain_normalizer=None, advance: Callable[[int], None] | None = None) -> np.ndarray:
    """Handcrafted descriptors (n_spots, len(scales_um), HANDCRAFTED_DIM) float32 of every
    spot's window at each scale (`stimpute.patches` windows). `advance(n)`: n windows done."""
    feats = np.empty((section.n_spots, len(scales_um), hc.HANDCRAFTED_DIM), np.float32)
    lock = threading.Lock()  # one reader at a time: the image builds its levels and caches tiles as it reads
    # OpenCV's own pool off meanwhile: the `WORKERS` threads keep the cores busy, and its pool's
    # threads spin while they wait (a Visium section: ~10-15 % more CPU, no shorter wall time)
    with opencv_threads(1):
        for s, side in enumerate(window_sizes_px(section, scales_um)):
            f = side / out_size  # full-resolution px per level px
            corners = window_origins(section.xy, side) / f  # windows' top-left corners, level px
            sums = window_sums(lambda x, y, w, h: _read(section.image, x, y, w, h, f, stain_normalizer, lock), corners,
                               out_size, advance)
            feats[:, s] = describe_windows(sums, out_size)
            _return_freed_memory()
    return feats


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc `malloc_trim`): the strips' maps
    are freed in two threads' heaps, which otherwise keep them, so a stack's sections would
    add up (five HER2-ST sections: the process ~0.5-0.7 GB larger after each)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _read(image, x: int, y: int, w: int, h: int, f: float, stain_normalizer, lock: threading.Lock) -> np.ndarray:
    """Level px [y, y+h) × [x, x+w) of the level `f` full-resolution px per level px."""
    with lock:
        rgb = image.read_region(round(x * f), round(y * f), max(1, round(w * f)), max(1, round(h * f)), out_size=(w, h))
    return rgb if stain_normalizer is None else stain_normalizer(rgb)


def window_sums(read: Callable[[int, int, int, int], np.ndarray], corners: np.ndarray, side: int,
                advance: Callable[[int], None] | None = None, tiles: bool | None = None) -> np.ndarray:
    """Sums (n, N_CHANNELS) of every map over the `side`-px windows at `corners` (n, 2)
    (x, y level px), the level read by `read(x, y, w, h)` (uint8 RGB, white outside the image).

    Where the windows are sparse (HER2-ST spot windows: 224 px at a 290 px pitch, so strips
    would cover ~3 × their pixels), each window is read and mapped alone with a `TILE_HALO`
    (`tile_sums`); else in strips (`strip_sums`). `tiles=None` decides from the geometry
    only: tiles where their pixels (with halo) are fewer than the strips' (and `side` is a
    multiple of CELL)."""
    corners = np.asarray(corners, np.float64)
    grid = _Grid(corners, side)
    if tiles is None:
        tiles = side % CELL == 0 and len(corners) * (side + 2 * TILE_HALO) ** 2 < grid.strips_px()
    return tile_sums(read, corners, side, advance) if tiles else strip_sums(read, grid, advance)


class _Grid:
    """The cell grid of a level's windows, and its strips of cell rows: `rows` a strip, so
    that a strip's maps stay within `STRIP_PX` level px (bounded memory, whatever the slide)."""

    def __init__(self, corners: np.ndarray, side: int):
        # on the level's own CELL lattice: every other pixel (texture, colour) is the level's even
        # pixels, whichever windows a section has (a JPEG's 2 × 2 chroma blocks move LBP with the
        # parity), and a window whose corner is on the lattice gets exact sums
        self.x0 = CELL * (math.floor(corners[:, 0].min()) // CELL - 1)
        self.y0 = CELL * (math.floor(corners[:, 1].min()) // CELL - 1)
        self.wc = math.ceil((corners[:, 0].max() + side + 1 - self.x0) / CELL)  # grid width, cells
        self.hc = math.ceil((corners[:, 1].max() + side + 1 - self.y0) / CELL)
        self.cx, self.cy = (corners[:, 0] - self.x0) / CELL, (corners[:, 1] - self.y0) / CELL  # corners, cell units
        self.span = side / CELL
        self.rows = max(1, min(self.hc, STRIP_PX // (self.wc * CELL * CELL)))  # cell rows per strip

    def strip(self, r0: int) -> tuple[int, int, list[tuple[int, int]]]:
        """Cell rows [r0, r1) of strip `r0` and the runs of cell columns [c0, c1) its windows
        cover: columns no window reaches are not read where the gap is wider than two halos
        (irregular tissue, holes), so a run is read and mapped with its own halo."""
        r1 = min(r0 + self.rows, self.hc)
        near = (self.cy < r1) & (self.cy + self.span > r0)
        if not near.any():
            return r0, r1, []
        lo = np.maximum(np.floor(self.cx[near]), 0).astype(int)
        hi = np.minimum(np.ceil(self.cx[near] + self.span), self.wc).astype(int)
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], np.maximum.accumulate(hi[order])
        new = np.flatnonzero(np.r_[True, (lo[1:] - hi[:-1]) * CELL > 2 * HALO])
        return r0, r1, list(zip(lo[new].tolist(), hi[np.r_[new[1:] - 1, len(lo) - 1]].tolist()))

    def strips_px(self) -> int:
        """Level px the strips read, halos included."""
        return sum(((r1 - r0) * CELL + 2 * HALO) * ((c1 - c0) * CELL + 2 * HALO)
                   for r0, r1, runs in map(self.strip, range(0, self.hc, self.rows)) for c0, c1 in runs)


def tile_sums(read: Callable[[int, int, int, int], np.ndarray], corners: np.ndarray, side: int,
              advance: Callable[[int], None] | None = None) -> np.ndarray:
    """`window_sums` of each window mapped alone: read at its rounded corner with `TILE_HALO`
    px around it (`side` a multiple of CELL), in raster order (a slide's tiles are reused).
    Corners are rounded to even level px, as the strips' every other pixel is the level's even ones."""
    xy = 2 * np.rint(corners / 2).astype(int)
    order = np.lexsort((xy[:, 0], xy[:, 1] // max(side, 1)))
    out = np.empty((len(xy), N_CHANNELS))
    read_side = side + 2 * TILE_HALO

    def tile(i: int) -> np.ndarray:
        rgb = read(int(xy[i, 0]) - TILE_HALO, int(xy[i, 1]) - TILE_HALO, read_side, read_side)
        return strip_cells(rgb, TILE_HALO).sum(axis=(1, 2), dtype=np.float64)

    with ThreadPoolExecutor(WORKERS) as pool:
        for k, (i, sums) in enumerate(zip(order, pool.map(tile, order))):
            out[i] = sums
            if advance is not None and ((k + 1) % BOX_CHUNK == 0 or k + 1 == len(order)):
                advance((k % BOX_CHUNK) + 1)
    return out


def strip_sums(read: Callable[[int, int, int, int], np.ndarray], grid: _Grid,
               advance: Callable[[int], None] | None = None) -> np.ndarray:
    """`window_sums` from strips of the level: each strip's maps summed into cells (in the
    workers), each window's sums from running column sums of the cell rows (`_box`), kept in
    a ring of a window's and a strip's rows (rows above the first waiting window reused)."""
    g = grid
    order = np.argsort(g.cy + g.span)  # spots by the cell row their window ends on
    ends = (g.cy + g.span)[order]
    out = np.empty((len(g.cx), N_CHANNELS))
    ring = _Ring(math.ceil(g.span) + 3 + g.rows, g.wc)
    evaluated = 0

    def strip(r0: int) -> np.ndarray:
        """Cell sums (rows, wc, N_CHANNELS) float32 of strip rows [r0, r0 + rows), read only
        across the windows that reach it."""
        r0, r1, runs = g.strip(r0)
        cells = np.zeros((r1 - r0, g.wc, N_CHANNELS), np.float32)  # channels last: a window's columns gathered whole
        for c0, c1 in runs:
            rgb = read(g.x0 + c0 * CELL - HALO, g.y0 + r0 * CELL - HALO, (c1 - c0) * CELL + 2 * HALO, (r1 - r0) * CELL + 2 * HALO)
            cells[:, c0:c1] = strip_cells(rgb, HALO).transpose(1, 2, 0)
        return cells

    with ThreadPoolExecutor(WORKERS) as pool:
        for cells in pool.map(strip, range(0, g.hc, g.rows)):
            ring.append(cells)
            del cells
            ready = order[evaluated:len(order) if ring.done >= g.hc else np.searchsorted(ends, ring.done, side="right")]
            evaluated += len(ready)
            for chunk in np.array_split(ready, max(1, -(-len(ready) // BOX_CHUNK))):
                out[chunk] = _box(ring, g.cx[chunk], g.cy[chunk] - ring.top, g.span)
            if advance is not None and len(ready):
                advance(len(ready))
            if evaluated < len(order):  # keep the rows from the first waiting window's top, and the last boundary
                ring.drop(min(max(0, math.floor(g.cy[order[evaluated:]].min()) - ring.top), ring.n - 1))
    return out


class _Ring:
    """Column prefix sums (cols, N_CHANNELS) float64 at the cell-row boundaries [top, done]
    (`n` of them) in a ring of `size`: bounded memory, and boundaries dropped cost no copy.
    Channels last: `_box` gathers each window's cells with their channels contiguous (~2.5 ×
    faster than gathering one channel a cache line)."""

    def __init__(self, size: int, cols: int):
        self.rows = np.zeros((size, cols, N_CHANNELS))  # boundary 0: zeros
        self.top, self.n = 0, 1

    @property
    def done(self) -> int:
        return self.top + self.n - 1

    def slot(self, i):
        """Where boundary `top + i` is kept."""
        return (self.top + i) % len(self.rows)

    def append(self, cells: np.ndarray) -> None:
        """The boundaries below each cell row of `cells` (rows, cols, N_CHANNELS) float32: the
        strip's own running sums (float64) each plus the last boundary, as
        `np.cumsum(cells, axis=0, dtype=np.float64) + last` but ~10 × cheaper (numpy's cumsum
        over the outer axis with a cast runs element by element) and with no float64 copy."""
        if self.n + len(cells) > len(self.rows):
            raise ValueError(f"{len(cells)} cell rows do not fit a ring of {len(self.rows)} holding {self.n}")
        last = self.rows[self.slot(self.n - 1)]
        running = np.empty(cells.shape[1:])
        for j, row in enumerate(cells):
            if j:
                np.add(running, row, out=running)
            else:
                running[:] = row
            np.add(running, last, out=self.rows[self.slot(self.n + j)])
        self.n += len(cells)

    def drop(self, k: int) -> None:
        """Forget the first `k` boundaries."""
        self.top, self.n = self.top + k, self.n - k


def _box(ring: _Ring, x: np.ndarray, y: np.ndarray, span: float) -> np.ndarray:
    """Sums (n, C) over windows [x, x+span) × [y, y+span) (cell units, fractional; rows from
    the ring's top) from its column prefix sums: linear between row boundaries, each cell
    column weighted by its overlap with the window (exact where a map is uniform within a
    cell)."""
    prefix = ring.rows
    k = math.ceil(span) + 1  # cell columns a window can touch
    j0 = np.clip(np.floor(x).astype(int), 0, prefix.shape[1] - k)
    cols = j0[:, None] + np.arange(k)
    weights = np.clip(np.minimum(cols + 1, (x + span)[:, None]) - np.maximum(cols, x[:, None]), 0.0, 1.0)

    def at(ys: np.ndarray) -> np.ndarray:  # prefix at fractional row boundaries, (n, k, C)
        ys = np.clip(ys, 0, ring.n - 1)
        i = np.minimum(ys.astype(int), ring.n - 2)
        f = (ys - i)[:, None, None]
        below = prefix[ring.slot(i)[:, None], cols]
        below *= 1 - f
        above = prefix[ring.slot(i + 1)[:, None], cols]
        above *= f
        return np.add(below, above, out=below)  # (in place: the same values, no temporaries)

    bottom = at(y + span)
    return np.einsum("nk,nkc->nc", weights, np.subtract(bottom, at(y), out=bottom))


def strip_cells(rgb: np.ndarray, halo: int) -> np.ndarray:
    """Cell sums (N_CHANNELS, rows/CELL, cols/CELL) float32 of every map over the core of a
    strip (`rgb` uint8 with `halo` px on every side; core sides multiples of CELL)."""
    rgb = np.ascontiguousarray(rgb)
    H, W = rgb.shape[0] - 2 * halo, rgb.shape[1] - 2 * halo
    core = (slice(halo, halo + H), slice(halo, halo + W))
    half = CELL // 2  # cell side on the sub grid
    out = np.empty((N_CHANNELS, H // CELL, W // CELL), np.float32)

    def put(name: str, cells: np.ndarray) -> None:
        """Cells (rows, cols[, k]) or flat counts (rows × cols × k) into the channels `name`."""
        rows, cols = out.shape[1:]
        out[CHANNELS[name]] = cells.reshape(rows, cols, -1).transpose(2, 0, 1)  # (np.moveaxis: ~0.1 ms a call more)

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    tissue = gray < hc.TISSUE_MAX_GRAY
    put("tissue", _cells(tissue[core], CELL))
    h = _haematoxylin(rgb)
    for t, threshold in enumerate(hc.NUCLEUS_H_OD):
        for name, cells in _blob_cells((h > threshold) & tissue, h, halo, H, W).items():
            put(f"{name}{t}", cells)
    n_cells = out.shape[1] * out.shape[2]
    # texture at every other pixel (even rows and columns of the core), neighbours at full
    # resolution: each neighbour offset is a shifted view of one of the four parity planes
    q = gray // (256 // hc.GLCM_LEVELS)
    planes = {(a, b): (np.ascontiguousarray(q[a::2, b::2]), np.ascontiguousarray(gray[a::2, b::2])) for a in (0, 1) for b in (0, 1)}

    def shifted(dy: int, dx: int, which: int) -> np.ndarray:
        plane = planes[dy % 2, dx % 2][which]
        r, c = (halo + dy) // 2, (halo + dx) // 2
        return plane[r:r + H // 2, c:c + W // 2]

    first = shifted(0, 0, 0)
    put("q", _split_cells(cv2.LUT(first, _Q_LUT), half, _Q_SHIFT, out[CHANNELS["q2"]]))
    for d, offsets in zip(hc.GLCM_DISTANCES, np.reshape(hc._GLCM_OFFSETS, (len(hc.GLCM_DISTANCES), -1, 2))):
        hom = con_eq = None
        for dr, dc in offsets:
            diff = cv2.absdiff(first, shifted(int(dr), int(dc), 0))
            hom = cv2.LUT(diff, _HOM_LUT) if hom is None else cv2.add(hom, cv2.LUT(diff, _HOM_LUT), hom)
            con_eq = cv2.LUT(diff, _CON_EQ_LUT) if con_eq is None else cv2.add(con_eq, cv2.LUT(diff, _CON_EQ_LUT), con_eq)
        put(f"con{d}", _split_cells(con_eq, half, _CON_EQ_SHIFT, out[CHANNELS[f"eq{d}"]]))
        put(f"hom{d}", _cells(hom, half))
    centre = shifted(0, 0, 1)
    code = np.zeros(centre.shape, np.uint8)
    for bit, (dy, dx) in enumerate(hc._LBP_OFFSETS):
        code |= cv2.compare(shifted(dy, dx, 1), centre, cv2.CMP_GE) & np.uint8(1 << bit)
    put("lbp", np.bincount((_scaled_index(H // 2, W // 2, half, _LBP_BINS) + cv2.LUT(code, _LBP_LABELS)).ravel(),
                           minlength=n_cells * _LBP_BINS))
    for k, band in enumerate(_dog_cells(gray, halo, H, W)):
        out[CHANNELS["dog"].start + k] = band
    # colour at every fourth pixel (3,136 of a 224 px window: ample for its means, spreads and
    # deciles; t = 0/1: OD²·t = (OD·t)², unmix(OD)·t = unmix(OD·t))
    quarter = CELL // 4  # cell side on the colour grid
    tq = np.ascontiguousarray(tissue[halo:halo + H:4, halo:halo + W:4]).view(np.uint8)
    rgb_q = cv2.resize(rgb[core], (W // 4, H // 4), interpolation=cv2.INTER_NEAREST)  # = rgb[core][::4, ::4], faster
    odt = cv2.LUT(rgb_q, hc._OD_LUT3) * tq[..., None]
    put("tsub", _cells(tq, quarter))
    put("od", _cells(odt, quarter))
    put("od2", _cells(odt * odt, quarter))
    put("he", _cells(hc._unmix(odt, 2), quarter))
    glass = (tq ^ 1) * np.uint8(HIST_BINS)  # glass: an extra bin, dropped
    base = _scaled_index(H // 4, W // 4, quarter, HIST_BINS + 1)
    for c, channel in enumerate(cv2.split(rgb_q)):
        bins = cv2.max(channel >> _HIST_BITS, glass)
        counts = np.bincount((base + bins).ravel(), minlength=n_cells * (HIST_BINS + 1))
        first_bin = CHANNELS["hist"].start + c * HIST_BINS
        out[first_bin:first_bin + HIST_BINS] = counts.reshape(*out.shape[1:], HIST_BINS + 1)[..., :HIST_BINS].transpose(2, 0, 1)
    return out


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """max(Σ_c unmixing weight × OD of channel c, 0), as `rgb2hed`, smoothed (σ 1 px) as the
    patch path smooths it; summed in place (the strip's largest temporaries)."""
    channels = cv2.split(rgb)
    haem = cv2.LUT(channels[0], _HAEM_LUTS[0])
    for c in (1, 2):
        cv2.add(haem, cv2.LUT(channels[c], _HAEM_LUTS[c]), haem)
    del channels
    return cv2.GaussianBlur(cv2.max(haem, 0.0, haem), (0, 0), 1.0)


def _split_cells(packed: np.ndarray, k: int, shift: int, high: np.ndarray) -> np.ndarray:
    """Cell sums of the low bits of an integer map `packed` (sums below 2**shift), returned;
    those of its bits from `shift` up, into `high` (float32: exact, the cell sums of
    `packed` being below 2**24)."""
    cells = _cells(packed, k)
    np.floor(cells * 2.0**-shift, out=high.reshape(cells.shape))
    return cells - high.reshape(cells.shape) * 2.0**shift


def _cells(values: np.ndarray, k: int) -> np.ndarray:
    """Sums over k × k px cells of a (H, W[, C]) map (sides multiples of k), float32."""
    values = values.astype(np.float32, copy=False)
    if k == 1:
        return values
    H, W = values.shape[:2]
    return cv2.resize(values, (W // k, H // k), interpolation=cv2.INTER_AREA) * float(k * k)


@lru_cache(maxsize=4)
def _scaled_index(rows: int, cols: int, k: int, bins: int) -> np.ndarray:
    """`bins` × the flat cell number (rows, cols) int64 of each pixel, k × k px cells in
    row-major order: add a pixel's bin to count per cell with one `np.bincount`."""
    return ((np.arange(rows) // k)[:, None] * (cols // k) + (np.arange(cols) // k)[None, :]) * bins


def _blob_cells(mask: np.ndarray, h: np.ndarray, halo: int, H: int, W: int) -> dict[str, np.ndarray]:
    """The nuclei maps of one threshold: blob mask and its haematoxylin per pixel, and the
    statistics of each blob of at least MIN_NUCLEUS_PX spread evenly over its bounding box's
    cells (each cell carrying the share of the box it holds): a window holding a blob whole
    counts it once, a window holding part of it about that fraction (as a patch holds the
    part it cuts). Spreading each blob over its own pixels cost ~2 × the labelling in
    per-pixel sums; over its box, a few entries a blob."""
    # block-based decision trees (BBDT): the default's (Spaghetti) labels and statistics, ~2.4 × faster with statistics
    _, _, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_BBDT)
    core = mask[halo:halo + H, halo:halo + W]
    maps = {"mask": _cells(core, CELL), "hmask": _cells(cv2.copyTo(h[halo:halo + H, halo:halo + W], core.view(np.uint8)), CELL)}
    stats = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= hc.MIN_NUCLEUS_PX].astype(np.int64)
    area, w, hh = stats[:, cv2.CC_STAT_AREA].astype(np.float64), stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    blob, cell, share = _box_shares(stats[:, cv2.CC_STAT_LEFT] - halo, w, stats[:, cv2.CC_STAT_TOP] - halo, hh, W // CELL, H // CELL)
    n_cells = (H // CELL) * (W // CELL)
    per_blob = {"area": area, "area2": area * area, "elong": np.maximum(w, hh) / np.maximum(np.minimum(w, hh), 1),
                "fill": area / (w * hh)}
    maps["n"] = np.bincount(cell, weights=share, minlength=n_cells)
    maps |= {k: np.bincount(cell, weights=share * v[blob], minlength=n_cells) for k, v in per_blob.items()}
    size_bin = np.maximum(np.searchsorted(hc.NUCLEUS_LOG_AREA_EDGES, np.log(area), side="right") - 1, 0)
    maps["sizes"] = np.bincount(cell * _N_SIZES + size_bin[blob], weights=share, minlength=n_cells * _N_SIZES)
    return maps


def _box_shares(x: np.ndarray, w: np.ndarray, y: np.ndarray, h: np.ndarray, cols: int, rows: int):
    """(blob, cell, share): the share of each box [x, x+w) × [y, y+h) (px) that each cell of
    CELL px holds, for the cells of a `rows` × `cols` grid (row-major cell numbers)."""
    bx, cx, sx = _span_shares(x, w, cols)
    by, cy, sy = _span_shares(y, h, rows)
    ny = np.bincount(by, minlength=len(x))
    reps = ny[bx]  # each column entry pairs with its box's row entries
    xi = np.repeat(np.arange(len(bx)), reps)
    yi = (np.cumsum(ny) - ny)[bx[xi]] + np.arange(len(xi)) - np.repeat(np.cumsum(reps) - reps, reps)
    return bx[xi], cy[yi] * cols + cx[xi], sx[xi] * sy[yi]


def _span_shares(lo: np.ndarray, size: np.ndarray, cells: int):
    """(span, cell, share): the share of each span [lo, lo+size) px that each cell of CELL px
    in [0, cells) holds."""
    first, count = lo // CELL, (lo + size - 1) // CELL - lo // CELL + 1
    span = np.repeat(np.arange(len(lo)), count)
    cell = first[span] + np.arange(len(span)) - np.repeat(np.cumsum(count) - count, count)
    share = (np.minimum((cell + 1) * CELL, (lo + size)[span]) - np.maximum(cell * CELL, lo[span])) / size[span]
    inside = (cell >= 0) & (cell < cells)
    return span[inside], cell[inside], share[inside]


def dog_halvings(side: int) -> list[bool]:
    """Before which `DOG_SIGMAS` band the patch path's DoG pyramid halves a `side`-px window."""
    halve, step, sigma, n = [], 1, 0.0, side
    for target in hc.DOG_SIGMAS:
        halve.append(hc.dog_halves(sigma, step, n))
        if halve[-1]:
            step, n = step * 2, -(-n // 2)
        sigma = target
    return halve


def _dog_cells(gray: np.ndarray, halo: int, H: int, W: int, side: int = DEFAULT_OUT_SIZE):
    """Cell sums of each difference-of-Gaussians band |level - blurred| (in full-resolution
    px units), on the pyramid the patch path builds for a `side`-px window."""
    level, step, sigma = gray.astype(np.float32), 1, 0.0
    for target, halve in zip(hc.DOG_SIGMAS, dog_halvings(side)):
        if halve:
            level, step = np.ascontiguousarray(level[::2, ::2]), step * 2
        blurred = cv2.GaussianBlur(level, (0, 0), np.sqrt(target**2 - sigma**2) / step)
        core = (slice(halo // step, (halo + H) // step), slice(halo // step, (halo + W) // step))
        band = cv2.absdiff(level[core], blurred[core])
        yield _cells(band, CELL // step) * float(step * step)
        level, sigma = blurred, target


def describe_windows(sums: np.ndarray, side: int) -> np.ndarray:
    """Descriptors (n, HANDCRAFTED_DIM) float32 from window sums (n, N_CHANNELS) of
    `side` × `side` px windows (the layout of `handcrafted.BLOCKS`)."""
    n = len(sums)
    full, sub = float(side * side), side * side / 4.0

    def S(name: str) -> np.ndarray:
        return sums[:, CHANNELS[name]]

    tissue, tsub = S("tissue")[:, 0], np.maximum(S("tsub"), 1e-9)
    mean = S("od") / tsub
    sd = np.sqrt(np.maximum(S("od2") / tsub - mean**2, 0.0))
    pct = od_percentiles(S("hist").reshape(n, 3, HIST_BINS), (10, 50, 90))
    colour = np.c_[tissue / full, mean, sd, pct.reshape(n, -1), S("he") / tsub]
    nuclei = []
    tissue_px = np.maximum(tissue, 1.0)[:, None]
    for t in range(len(hc.NUCLEUS_H_OD)):
        count = S(f"n{t}")
        some = count > 1e-6
        per = lambda v: S(v) / np.where(some, count, 1.0)  # noqa: E731 - mean over the window's blobs
        mean_area = np.maximum(per(f"area{t}"), 1e-9)
        block = np.c_[count / tissue_px * 1e3, S(f"mask{t}") / tissue_px, np.log(mean_area),
                      np.sqrt(np.maximum(per(f"area2{t}") - mean_area**2, 0.0)) / mean_area, per(f"elong{t}"),
                      per(f"fill{t}"), S(f"hmask{t}") / np.maximum(S(f"mask{t}"), 1e-9), S(f"sizes{t}") / tissue_px * 1e3]
        nuclei.append(np.where(some, block, 0.0))
    mu = S("q")[:, 0] / sub
    var = S("q2")[:, 0] / sub - mu**2
    pairs = sub * len(hc._GLCM_OFFSETS) / len(hc.GLCM_DISTANCES)
    props = {p: np.stack([S(f"{key}{d}")[:, 0] / pairs for d in hc.GLCM_DISTANCES], axis=1)
             for p, key in (("contrast", "con"), ("homogeneity", "hom"), ("energy", "eq"))}
    flat = var[:, None] < 1e-9
    props["correlation"] = np.where(flat, 1.0, 1.0 - props["contrast"] / (2 * np.where(flat, 1.0, var[:, None])))
    glcm = np.concatenate([props[p] for p in hc.GLCM_PROPS], axis=1)
    return np.concatenate([colour, *nuclei, glcm, S("lbp") / sub, S("dog") / full], axis=1).astype(np.float32)


def od_percentiles(counts: np.ndarray, q) -> np.ndarray:
    """(n, len(q), 3) optical-density percentiles from byte histograms `counts` (n, 3,
    HIST_BINS) of tissue pixels, each bin's pixels spread evenly over its byte values."""
    width = 256 // HIST_BINS
    desc = counts[..., ::-1]  # bins by byte value descending = OD ascending
    cum = np.cumsum(desc, axis=-1)
    total = cum[..., -1]
    out = np.zeros((len(counts), len(q), 3))
    for i, p in enumerate(q):
        rank = p / 100.0 * total
        k = np.minimum((cum <= rank[..., None]).sum(-1), HIST_BINS - 1)
        before = np.take_along_axis(cum, k[..., None], -1)[..., 0] - np.take_along_axis(desc, k[..., None], -1)[..., 0]
        inbin = np.take_along_axis(desc, k[..., None], -1)[..., 0]
        frac = np.clip((rank - before) / np.maximum(inbin, 1e-9), 0.0, 1.0)
        byte = (HIST_BINS - k) * width - 0.5 - frac * width  # from the top of the bin down
        out[:, i] = np.where(total > 0, np.interp(np.clip(byte, 0, 255), np.arange(256), hc._OD_LUT), 0.0)
    return out
