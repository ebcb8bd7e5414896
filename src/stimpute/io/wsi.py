"""Writing pyramidal whole-slide TIFFs tile by tile, in bounded memory.

`write_pyramid_tiff` takes the full-resolution tiles of an RGB image (row-major, one
`tile`² array each) and writes a tiled, JPEG-compressed BigTIFF whose lower-resolution
levels (each half the previous) are SubIFDs, the layout tiffslide and OpenSlide-style
readers take as a pyramid. Level 0 is streamed to disk as the tiles arrive; each lower
level is built on the fly into a disk-backed array (`numpy.memmap`) beside the output and
written after it, so no full image at any level is ever held in memory.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from stimpute.files import atomic_write

DEFAULT_TILE = 512
MIN_LEVEL_SIDE = 1024  # the coarsest level is the first whose longer side is at most this
JPEG_QUALITY = 90


def pyramid_shapes(width: int, height: int, min_side: int = MIN_LEVEL_SIDE) -> list[tuple[int, int]]:
    """(width, height) of every level: halved until the longer side is at most `min_side`."""
    shapes = [(width, height)]
    while max(shapes[-1]) > min_side:
        w, h = shapes[-1]
        shapes.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
    return shapes


def write_pyramid_tiff(path: str | Path, width: int, height: int, tiles: Iterable[np.ndarray], um_per_px: float,
                       tile: int = DEFAULT_TILE, min_side: int = MIN_LEVEL_SIDE) -> Path:
    """Write a pyramidal tiled TIFF of `width` × `height` px from its level-0 `tiles`.

    `tiles` yields ceil(height/tile) × ceil(width/tile) uint8 (tile, tile, 3) arrays in
    row-major order (edge tiles full-sized; what lies past the image is ignored). The
    pixel size is stored as the TIFF resolution (tiffslide reads it as `mpp`).
    The file appears atomically (temporary name, then rename).
    """
    import tifffile

    path = Path(path)
    shapes = pyramid_shapes(width, height, min_side)
    resolution = (1e4 / um_per_px, 1e4 / um_per_px)  # pixels per centimetre

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.levels.") as scratch:
            lower = [np.memmap(Path(scratch) / f"level{k}.u8", np.uint8, "w+", shape=(h, w, 3))
                     for k, (w, h) in enumerate(shapes[1:], start=1)]
            with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
                options = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg",
                               compressionargs={"level": JPEG_QUALITY}, resolution=resolution,
                               resolutionunit="CENTIMETER")
                tif.write(_downsampling(tiles, lower, width, height, tile), shape=(height, width, 3),
                          subifds=len(lower), **options)
                for k, level in enumerate(lower, start=1):
                    level.flush()
                    ds = 2**k
                    tif.write(_tiles_of(level, tile), shape=level.shape, subfiletype=1,
                              **{**options, "resolution": (resolution[0] / ds, resolution[1] / ds)})
            del lower

    atomic_write(path, write)
    return path


def _downsampling(tiles: Iterable[np.ndarray], lower: list[np.memmap], width: int, height: int,
                  tile: int) -> Iterator[np.ndarray]:
    """Pass level-0 tiles through, area-averaging each into every lower level as it goes.

    A tile covers tile/2^k px of level k; `tile` is a power of two ≥ 2^levels, so these
    blocks never straddle (cv2 INTER_AREA over exact power-of-two blocks is a box mean).
    """
    n_x = math.ceil(width / tile)
    for index, pixels in enumerate(tiles):
        if pixels.shape != (tile, tile, 3):
            raise ValueError(f"tile {index} has shape {pixels.shape}, expected {(tile, tile, 3)}")
        ty, tx = divmod(index, n_x)
        for k, level in enumerate(lower, start=1):
            side = tile >> k
            if side == 0:
                raise ValueError(f"tile side {tile} is too small for {len(lower)} pyramid levels")
            small = cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA)
            y0, x0 = ty * side, tx * side
            h, w = min(side, level.shape[0] - y0), min(side, level.shape[1] - x0)
            if h > 0 and w > 0:
                level[y0:y0 + h, x0:x0 + w] = small[:h, :w]
        yield pixels


def _tiles_of(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major `tile`² tiles of an (H, W, 3) array, edge tiles padded white."""
    H, W = image.shape[:2]
    for y in range(0, H, tile):
        for x in range(0, W, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = image[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            yield block
