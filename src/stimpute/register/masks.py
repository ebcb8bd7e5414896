"""Tissue masks and stain images of H&E thumbnails, sized in micrometres.

Tissue is what absorbs light: the summed optical density, relative to the slide's own
glass (its brightest pixels), is thresholded with Otsu. Pen ink (bluish-green or black
strokes) is removed before morphology; a closing bridges torn tissue, holes up to
`max_hole_um2` are filled, and specks of dust (components far smaller than the largest
piece of tissue) are dropped. Every size is given in µm so one setting fits every
image scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import gaussian, threshold_otsu  # by name: skimage loads them here, not in the first registration
from skimage.morphology import remove_small_holes

from stimpute.data import Section
from stimpute.errors import StimputeError
from stimpute.stain import optical_density

GLASS_PERCENTILE = 95.0  # the brightest 5 % of a slide thumbnail are taken as glass
MIN_OD = 0.25  # a threshold below this summed OD would call faint glass tissue
PEN_GREEN_EXCESS = 10  # G above R by this much: blue/green ink, not H&E
PEN_DARK = 40  # every channel below this: black ink or debris
STAIN_SMOOTH_UM = 30.0  # blur of the stain image: cell-level texture differs between serial sections
MIN_TISSUE_PX = 25  # fewer foreground pixels in a view than this: no tissue
FLOAT32_RADIUS = 1000  # px: `close_disk` reads OpenCV's float32 distance transform up to this disk radius


def relative_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density (H, W) over the slide's own glass level, ≥ 0.

    Subtracting the glass OD removes slide-to-slide differences in illumination and
    background tint (e.g. a pink blush), so one threshold rule fits every slide.
    """
    od = optical_density(rgb)
    od = od[..., 0] + od[..., 1] + od[..., 2]  # the sum over channels, in that order: numpy's own sum, several times faster
    glass = np.percentile(od, 100.0 - GLASS_PERCENTILE)
    return np.maximum(od - glass, 0.0)


def pen_marks(rgb: np.ndarray) -> np.ndarray:
    """Pixels of marker ink: greener than red (blue/green pens) or nearly black."""
    r, g = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    dark = (rgb[..., 0] < PEN_DARK) & (rgb[..., 1] < PEN_DARK) & (rgb[..., 2] < PEN_DARK)  # rgb.max(axis=2), many times faster
    return (g > r + PEN_GREEN_EXCESS) | dark


def tissue_mask(
    rgb: np.ndarray,
    um_per_px: float,
    smooth_um: float = 20.0,
    close_um: float = 60.0,
    max_hole_um2: float = 2.0e6,
    min_piece_fraction: float = 0.05,
    density: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean (H, W) foreground of an H&E thumbnail whose pixels measure `um_per_px`.

    Pieces smaller than `min_piece_fraction` of the largest are dust; holes smaller than
    `max_hole_um2` (tears, lumina) are filled so masks of serial sections compare well.
    `density` is the thumbnail's `relative_density` where the caller has it already.
    """
    sigma = max(smooth_um / um_per_px, 0.5)
    density = gaussian(relative_density(rgb) if density is None else density, sigma=sigma)
    if density.max() <= MIN_OD:
        return np.zeros(density.shape, bool)
    threshold = max(threshold_otsu(density), MIN_OD)
    ink = pen_marks(rgb)
    if ink.any():  # most slides carry none: nothing to dilate
        ink = ndimage.binary_dilation(ink, iterations=int(np.ceil(2 * sigma)))  # and its blurred fringe
    mask = (density > threshold) & ~ink
    mask = close_disk(mask, max(int(round(close_um / um_per_px)), 1))
    mask = remove_small_holes(mask, max_size=int(max_hole_um2 / um_per_px**2))
    return _drop_specks(mask, min_piece_fraction)


def close_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing of `mask` by a disk of `radius` px (skimage's `disk`), nothing beyond
    the image counting as tissue: the result of `ndimage.binary_closing` on the mask padded by
    `radius`, from two Euclidean distance transforms, whose cost does not grow with the disk
    (a fine thumbnail needs a disk of thousands of pixels)."""
    if not mask.any():
        return mask.copy()
    limit = radius**2 + 0.5  # squared distances are whole numbers
    pad = radius + 1  # the dilation fits, and a ring of background stands for the outside
    # OpenCV's float32 distances square to within 0.2 of the whole numbers up to this radius; scipy's float64 beyond
    distance = _distance if radius <= FLOAT32_RADIUS else ndimage.distance_transform_edt
    dilated = distance(~np.pad(mask, pad)) ** 2 < limit
    closed = distance(dilated) ** 2 > limit
    return closed[pad:-pad, pad:-pad]


def _distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every True pixel of `mask` to the nearest False one: OpenCV's exact
    transform (Felzenszwalb's), float32, about 4× faster than `ndimage.distance_transform_edt`."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _drop_specks(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    areas = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(areas >= min_fraction * areas.max()) + 1
    return np.isin(labels, keep)


@dataclass
class View:
    """A section thumbnail at a chosen µm/px with its tissue mask and stain density.

    `to_view` maps full-resolution pixels of the section to view pixels (pixel centres
    kept aligned), so transforms found on views convert back to full resolution exactly.
    """

    rgb: np.ndarray
    mask: np.ndarray
    density: np.ndarray  # float32 relative optical density blurred to tissue structure: the "stain" image
    scale: float  # view px per full-resolution px
    um_per_px: float

    @property
    def to_view(self) -> np.ndarray:
        s, c = self.scale, 0.5 * (self.scale - 1.0)
        return np.array([[s, 0.0, c], [0.0, s, c], [0.0, 0.0, 1.0]])

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape


def section_view(section: Section, um_per_px: float) -> View:
    """Thumbnail of `section` at about `um_per_px` (never finer than the image itself).

    Raises StimputeError naming the section's file when no tissue is found.
    """
    return section_views(section, [um_per_px])[0]


def section_views(section: Section, um_per_px: Sequence[float]) -> list[View]:
    """`section_view` at each of `um_per_px` from one decode of the image
    (`SectionImage.thumbnails`)."""
    W, H = section.image.size
    sides = [max(1, int(round(max(W, H) * section.um_per_px / um))) for um in um_per_px]
    return [_view(section, rgb, scale) for rgb, scale in section.image.thumbnails(sides)]


def _view(section: Section, rgb: np.ndarray, scale: float) -> View:
    view_um = section.um_per_px / scale
    relative = relative_density(rgb)
    mask = tissue_mask(rgb, view_um, density=relative)
    if mask.sum() < MIN_TISSUE_PX:
        raise StimputeError(
            section.image.path or section.source or section.name,
            "no tissue found in the image (it looks like blank glass); check the file or the section order",
        )
    density = gaussian(relative, sigma=max(STAIN_SMOOTH_UM / view_um, 0.5)).astype(np.float32)
    return View(rgb=rgb, mask=mask, density=density, scale=scale, um_per_px=view_um)
