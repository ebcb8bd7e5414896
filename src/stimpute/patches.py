"""Spot-centred image patches at three scales, streamed in batches.

ASIGN describes every spot by three views: the 224 px spot patch and the 512 px and
1024 px regions around it, all at the HER2-ST image resolution (0.686 µm/px). stimpute
defines these fields of view in micrometres (`SCALES_UM`), so a downscaled image and a
40× whole-slide image give the same tissue window; each window is read through
`SectionImage.read_region` (pyramid-aware, never the whole slide) and resampled to the
encoder's input size.

Unlike the reference, which tiles the slide into 512/1024 regions shared by several
spots, the two larger views here are context windows *centred on each spot*: every spot
sees its own neighbourhood, symmetric around it. Windows reaching past the image border
are padded white (glass) and counted by `padding_report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from stimpute.data import Section

REFERENCE_UM_PER_PX = 0.686  # HER2-ST image resolution, where ASIGN's pixel sizes apply
REFERENCE_SCALES_PX = (224, 512, 1024)  # spot patch, 512 region, 1024 region
SCALES_UM: tuple[float, ...] = tuple(round(px * REFERENCE_UM_PER_PX, 1) for px in REFERENCE_SCALES_PX)
SCALE_NAMES = ("spot", "region512", "region1024")
DEFAULT_OUT_SIZE = 224  # encoder input side
DEFAULT_BATCH_SIZE = 32


@dataclass
class PatchBatch:
    """Patches of a batch of spots: `patches[b, s]` is spot `index[b]` at scale `s`."""

    index: np.ndarray  # (B,) spot positions in section.adata order
    patches: np.ndarray  # (B, n_scales, out_size, out_size, 3) uint8


def window_sizes_px(section: Section, scales_um: Sequence[float] = SCALES_UM) -> np.ndarray:
    """Side of each scale's window in the section's full-resolution pixels."""
    return np.maximum(1, np.rint(np.asarray(scales_um, float) / section.um_per_px)).astype(int)


def window_origins(xy: np.ndarray, side: int) -> np.ndarray:
    """Top-left corners (n, 2) of `side`-px windows centred on spot centres `xy`.

    A window of `side` pixels covers [c - side/2, c + side/2), so the spot centre lies at
    the window's centre (side/2, side/2) in window pixel coordinates.
    """
    return np.rint(np.asarray(xy, float) - side / 2.0).astype(int)


def padding_report(section: Section, scales_um: Sequence[float] = SCALES_UM) -> dict[str, int]:
    """Number of spots whose window at each scale reaches past the image border (padded white)."""
    W, H = section.image.size
    report = {}
    for name, side in zip(scale_names(scales_um), window_sizes_px(section, scales_um)):
        x0, y0 = window_origins(section.xy, side).T
        outside = (x0 < 0) | (y0 < 0) | (x0 + side > W) | (y0 + side > H)
        report[name] = int(outside.sum())
    return report


def iter_patches(
    section: Section,
    scales_um: Sequence[float] = SCALES_UM,
    out_size: int = DEFAULT_OUT_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stain_normalizer=None,
    raster_order: bool = False,
) -> Iterator[PatchBatch]:
    """Yield `PatchBatch`es of all spots (adata order), `batch_size` spots at a time.

    `raster_order`: visit spots row by row across the slide instead, so consecutive windows
    share the image tiles the reader has cached (a whole-slide image's spots are often
    stored in barcode order, scattered over the slide); each batch still names its spots.

    Memory stays bounded by one batch (B × scales × out_size² × 3 bytes) plus what the
    image reader holds (a flat JPEG is decoded once; pyramidal slides are read by region).
    `stain_normalizer` (e.g. `stimpute.stain.MacenkoNormalizer`) maps each patch's colours.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    spots = SpotWindows(section, scales_um, out_size, stain_normalizer, raster_order)
    for start in range(0, len(spots), batch_size):
        index = spots.order[start:start + batch_size]
        batch = np.empty((len(index), len(spots.sides), out_size, out_size, 3), np.uint8)
        for b, i in enumerate(index):
            spots.read(i, batch[b])
        yield PatchBatch(index=index, patches=batch)


class SpotWindows:
    """The spots of a section as a map-style dataset (e.g. for a torch `DataLoader`): item
    `k` is (spot index, its windows (n_scales, out_size, out_size, 3) uint8) of the k-th
    spot in adata order, or in `raster_order` (`iter_patches`)."""

    def __init__(self, section: Section, scales_um: Sequence[float] = SCALES_UM, out_size: int = DEFAULT_OUT_SIZE,
                 stain_normalizer=None, raster_order: bool = False):
        self.section, self.out_size, self.stain_normalizer = section, out_size, stain_normalizer
        self.sides = window_sizes_px(section, scales_um)
        self.origins = [window_origins(section.xy, side) for side in self.sides]
        self.order = raster_spot_order(section) if raster_order else np.arange(section.n_spots)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
        i = int(self.order[k])
        return i, self.read(i)

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """The windows of spot `i` at every scale, into `out` if given."""
        if out is None:
            out = np.empty((len(self.sides), self.out_size, self.out_size, 3), np.uint8)
        for s, side in enumerate(self.sides):
            x, y = self.origins[s][i]
            patch = self.section.image.read_region(x, y, side, side, out_size=self.out_size)
            out[s] = patch if self.stain_normalizer is None else self.stain_normalizer(patch)
        return out


def raster_spot_order(section: Section) -> np.ndarray:
    """Spot indices sorted into rows one spot diameter high, left to right within a row."""
    xy = section.xy
    row = np.floor(xy[:, 1] / max(section.spot_diameter_px, 1.0))
    return np.lexsort((xy[:, 0], row))


def scale_names(scales_um: Sequence[float] = SCALES_UM) -> list[str]:
    """Labels of the scales, used as cache dataset names."""
    if tuple(scales_um) == SCALES_UM:
        return list(SCALE_NAMES)
    return [f"{um:g}um" for um in scales_um]

