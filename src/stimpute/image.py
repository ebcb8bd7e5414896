"""Lazy access to a section's H&E image: regions and thumbnails, never a whole WSI in memory.

Pyramidal whole-slide images (.svs, .tif, .ndpi, ...) are opened with tiffslide and read
region by region from the pyramid level that best fits the requested output size. Tiled
levels are read tile by tile straight from tifffile with a bounded cache of decoded tiles
(`TILE_CACHE_MIB`): neighbouring spot windows share tiles, and one region read costs
microseconds instead of tiffslide's per-call overhead of several milliseconds. Flat images (JPEG,
PNG, small TIFFs) are read with Pillow; they are decoded once on the first region read and
kept until `release()`, with a halving pyramid built on demand, so a window of any size is
resampled (OpenCV) from a level at most 2× finer than the output, as with a slide. In-memory arrays (synthetic data, AnnData images) use the same
interface; an array may be a downscaled copy (`scale` = array px per full-resolution px,
scanpy's `tissue_hires_scalef`), and is still addressed in full-resolution pixels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from stimpute.errors import InputError

Image.MAX_IMAGE_PIXELS = None  # slides are trusted input and routinely exceed Pillow's bomb guard

WSI_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif", ".qptiff"}
FLAT_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
IMAGE_SUFFIXES = WSI_SUFFIXES | FLAT_SUFFIXES
FILL = 255  # padding outside the image: white, like glass
MAX_DECODED_PIXELS = 8192 * 8192  # a larger TIFF is read tile by tile even without a pyramid
TILE_CACHE_MIB = 192  # decoded tiles kept per open slide (~250 tiles of 512², a few tile rows of a 40k px slide)


class SectionImage:
    """An RGB image addressed in full-resolution pixels (x to the right, y down)."""

    def __init__(self, path: str | Path | None = None, array: np.ndarray | None = None, scale: float = 1.0):
        if (path is None) == (array is None):
            raise ValueError("give exactly one of path or array")
        if not (np.isfinite(scale) and scale > 0) or (path is not None and scale != 1.0):
            raise ValueError(f"scale (array px per full-resolution px) must be > 0 and only given with an array, got {scale}")
        self.path = None if path is None else Path(path)
        self.scale = float(scale)
        self._array = None if array is None else _as_rgb(array)
        self._slide = None
        self._tiles: _TileCache | None = None
        self._flat = False  # a TIFF that Pillow reads whole (small and single-level)
        self._levels: list[np.ndarray] = []  # the decoded image's halving pyramid (`_level`)
        self._size: tuple[int, int] | None = None
        if self._array is not None:
            self._size = (round(self._array.shape[1] / self.scale), round(self._array.shape[0] / self.scale))

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "SectionImage":
        """Open an image file lazily; checks that it exists and its header is readable."""
        path = Path(path)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(path, f"unsupported image format {path.suffix or '(no suffix)'!r} (supported: {', '.join(sorted(IMAGE_SUFFIXES))})")
        img = cls(path=path)
        _ = img.size
        return img

    def _open_slide(self):
        """The tiffslide handle of a TIFF-family file, or None where Pillow reads it whole.

        Pyramids and any image over `MAX_DECODED_PIXELS` stay with tiffslide, which reads
        only the tiles a region touches; small flat TIFFs are simpler and faster in Pillow.
        """
        suffix = self.path.suffix.lower()
        if self._slide is None and not self._flat and suffix in WSI_SUFFIXES:
            import tiffslide

            try:
                slide = tiffslide.TiffSlide(str(self.path))
            except Exception:
                if suffix not in FLAT_SUFFIXES:
                    raise
                self._flat = True
                return None
            width, height = slide.dimensions
            if slide.level_count > 1 or suffix not in FLAT_SUFFIXES or width * height > MAX_DECODED_PIXELS:
                self._slide = slide
                self._tiles = _TileCache.open(slide)
            else:
                slide.close()
                self._flat = True
        return self._slide

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in full-resolution pixels."""
        if self._size is None:
            if not self.path.exists():
                raise InputError(self.path, "image file not found")
            try:
                slide = self._open_slide()
                if slide is not None:
                    self._size = tuple(int(v) for v in slide.dimensions)
                else:
                    with Image.open(self.path) as im:
                        self._size = im.size
            except InputError:
                raise
            except Exception as exc:
                raise InputError(self.path, f"cannot read image ({_reason(exc)})") from None
        return self._size

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def verify(self) -> None:
        """Decode a flat image's whole file to catch truncated or corrupt files, at reduced
        scale where the format allows (JPEG), so a large slide never sits in memory. A JPEG
        too small for the size its header claims is refused first: its decoder would pad the
        missing pixels with grey and raise nothing (`_check_jpeg_data`)."""
        if self._array is not None or self._open_slide() is not None:
            return
        _check_jpeg_data(self.path, self.size)
        self.thumbnail()

    def _full(self) -> np.ndarray:
        if self._array is None:
            self._array = _decode_jpeg(self.path)
        if self._array is None:
            try:
                with Image.open(self.path) as im:
                    im.load()
                    self._array = _as_rgb(np.asarray(im.convert("RGB")))
            except FileNotFoundError:
                raise InputError(self.path, "image file not found") from None
            except Exception as exc:
                raise InputError(self.path, f"cannot decode image ({_reason(exc)})") from None
        return self._array

    def release(self) -> None:
        """Drop decoded pixels and file handles; they are reopened on the next read."""
        self._levels = []
        if self.path is not None:
            self._array = None
        if self._slide is not None:
            self._slide.close()
            self._slide = None
            self._tiles = None

    # -- reading ---------------------------------------------------------------------
    def read_region(self, x: int, y: int, w: int, h: int, out_size: int | tuple[int, int] | None = None) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) as (h, w, 3) uint8, padded white outside the image.

        With `out_size` (a side, or (width, height)), the region is resampled to that size,
        read from the coarsest level that still has enough resolution: a slide's pyramid, or
        the halving pyramid of a decoded image (`_level`).
        """
        x, y, w, h = int(round(x)), int(round(y)), int(round(w)), int(round(h))
        ow, oh = (None, None) if out_size is None else (out_size, out_size) if np.isscalar(out_size) else out_size
        reduction = None if out_size is None else max(w / ow, h / oh)  # full-resolution px per output px
        slide = self._open_slide() if self.path is not None and self._array is None else None
        region = self._read_slide(slide, x, y, w, h, reduction) if slide is not None else self._read_decoded(x, y, w, h, reduction)
        if out_size is not None and region.shape[:2] != (oh, ow):
            region = resample(region, ow, oh)
        return region

    def _read_decoded(self, x, y, w, h, reduction):
        """A region of a decoded image (flat file or array, possibly downscaled by `scale`),
        read like a slide from the level of its halving pyramid that keeps at least one px
        per output px (`reduction`: full-resolution px per output px), so resampling reduces
        it by less than 2×; without `reduction`, full-resolution pixels."""
        level = 0
        if reduction is not None:
            level = max(0, math.floor(math.log2(reduction * self.scale)))
        pixels, level = self._level(level)
        s = self.scale / 2**level
        if s == 1.0:
            return _crop_padded(pixels, x, y, w, h)
        x0, y0 = math.floor(x * s), math.floor(y * s)
        x1, y1 = max(x0 + 1, math.ceil((x + w) * s)), max(y0 + 1, math.ceil((y + h) * s))
        region = _crop_padded(pixels, x0, y0, x1 - x0, y1 - y0)
        return region if reduction is not None else resample(region, w, h)

    def _level(self, level: int) -> tuple[np.ndarray, int]:
        """Level `level` of the decoded image's halving pyramid (each level the previous one
        averaged over 2 × 2 pixels; the smallest where the image is too small for it), and
        its index. Levels are built on first use and kept until `release()`."""
        if not self._levels:
            self._levels.append(self._full())
        while len(self._levels) <= level and min(self._levels[-1].shape[:2]) >= 2:
            top = self._levels[-1]
            h, w = top.shape[0] // 2, top.shape[1] // 2
            self._levels.append(cv2.resize(top[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA))
        level = min(level, len(self._levels) - 1)
        return self._levels[level], level

    def _read_slide(self, slide, x, y, w, h, reduction):
        level = 0
        if reduction is not None:
            level = slide.get_best_level_for_downsample(reduction)
        ds = slide.level_downsamples[level]
        lw, lh = max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds))
        if self._tiles is not None:
            return self._tiles.read(level, int(x / ds), int(y / ds), lw, lh)
        region = np.asarray(slide.read_region((x, y), level, (lw, lh), as_array=True))[..., :3]
        # tiffslide pads outside the slide with zeros (black); paint it white like glass
        W, H = self.size
        x0, y0 = max(0, -x), max(0, -y)
        x1, y1 = min(w, W - x), min(h, H - y)
        if x0 > 0 or y0 > 0 or x1 < w or y1 < h:
            region = region.copy()
            mask = np.ones(region.shape[:2], bool)
            mask[int(y0 / ds) : int(math.ceil(max(y1, 0) / ds)), int(x0 / ds) : int(math.ceil(max(x1, 0) / ds))] = False
            region[mask] = FILL
        return np.ascontiguousarray(region)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """A downscaled RGB copy no larger than `max_side`, and its scale (thumb px / full px).

        Flat images are always decoded from the file (JPEG at reduced scale), never from
        pixels a region read left in memory, so the result never depends on what was read before.
        """
        W = self.size[0]
        tw, th = self._thumbnail_size(max_side)
        if self.path is None:
            im = Image.fromarray(self._array)
        elif (slide := self._open_slide()) is not None:
            return _slide_thumbnail(slide, tw, th, self._tiles), tw / W
        else:  # always from the file, whether or not it was decoded in full: one answer per image
            try:
                with Image.open(self.path) as source:
                    source.draft("RGB", (tw, th))  # JPEG: decode at 1/2..1/8 scale directly
                    im = source.convert("RGB")
            except Exception as exc:
                raise InputError(self.path, f"cannot decode image ({_reason(exc)})") from None
        thumb = np.asarray(im.resize((tw, th), Image.BILINEAR))
        return thumb, tw / W

    def thumbnails(self, sides: Sequence[int]) -> list[tuple[np.ndarray, float]]:
        """`thumbnail(side)` for each of `sides` from one decode: the largest is read, the
        others are resampled from it (antialiased bilinear, as `thumbnail` resamples)."""
        finest, _ = self.thumbnail(max(sides))
        out = []
        for side in sides:
            tw, th = self._thumbnail_size(side)
            same = (th, tw) == finest.shape[:2]
            out.append((finest if same else np.asarray(Image.fromarray(finest).resize((tw, th), Image.BILINEAR)),
                        tw / self.size[0]))
        return out

    def _thumbnail_size(self, max_side: int) -> tuple[int, int]:
        """(width, height) px of the thumbnail no larger than `max_side`."""
        W, H = self.size
        scale = min(1.0, max_side / max(W, H))
        return max(1, round(W * scale)), max(1, round(H * scale))

    def array_digest(self) -> str | None:
        """SHA-256 of an in-memory image's pixels and scale (cache identity); None for a file."""
        if self.path is not None:
            return None
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self._array).tobytes())
        h.update(f"{self._array.shape}:{self.scale}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        src = self.path if self.path is not None else "array"
        return f"SectionImage({src})"


def resample(region: np.ndarray, width: int, height: int) -> np.ndarray:
    """`region` (h, w, 3) uint8 resampled to (height, width). Bilinear, which reads every
    source pixel while it reduces by less than 2× (as it does after a pyramid level is
    picked, `read_region`); pixel-area averaging (antialiased) where it reduces by more."""
    reduction = max(region.shape[1] / width, region.shape[0] / height)
    return cv2.resize(np.ascontiguousarray(region), (width, height),
                      interpolation=cv2.INTER_AREA if reduction >= 2 else cv2.INTER_LINEAR)


def _slide_thumbnail(slide, tw: int, th: int, tiles: "_TileCache | None" = None) -> np.ndarray:
    """Downscale the pyramid level closest to (tw, th) band by band, so a huge
    single-level slide never sits in memory whole."""
    W, H = slide.dimensions
    level = slide.get_best_level_for_downsample(max(W / tw, H / th))
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    band_rows = max(1, MAX_DECODED_PIXELS // (4 * lw) * th // lh)  # output rows per band
    bands = []
    for r0 in range(0, th, band_rows):
        r1 = min(th, r0 + band_rows)
        y0, y1 = round(r0 * lh / th), max(round(r0 * lh / th) + 1, round(r1 * lh / th))
        if tiles is not None:
            band = tiles.read(level, 0, y0, lw, y1 - y0)
        else:
            band = np.asarray(slide.read_region((0, round(y0 * ds)), level, (lw, y1 - y0), as_array=True))[..., :3]
        bands.append(cv2.resize(np.ascontiguousarray(band), (tw, r1 - r0), interpolation=cv2.INTER_AREA))
    return np.concatenate(bands, axis=0)


class _TileCache:
    """Regions of a tiled TIFF pyramid assembled from decoded tiles, the most recent kept.

    Used where every level tiffslide exposes is a tiled, chunky (Y, X, samples) uint8 page
    of the slide's main series; anything else stays with tiffslide's own reader.
    """

    def __init__(self, tif, pages: list, max_bytes: int):
        self.handle, self.pages, self.max_bytes = tif.filehandle, pages, max_bytes
        self.tiles: OrderedDict = OrderedDict()
        self.bytes = 0

    @classmethod
    def open(cls, slide) -> "_TileCache | None":
        try:
            tif = slide.ts_tifffile
            levels = tif.series[slide.properties["tiffslide.series-index"]].levels
            pages = [level.keyframe for level in levels]
        except Exception:
            return None
        dims = [(p.imagewidth, p.imagelength) for p in pages]
        usable = all(p.is_tiled and p.dtype == np.uint8 and p.samplesperpixel in (3, 4) and p.imagedepth == 1
                     and p.planarconfig == 1 and len(level.pages) == 1 for p, level in zip(pages, levels))
        if not usable or dims != [tuple(d) for d in slide.level_dimensions]:
            return None
        return cls(tif, pages, TILE_CACHE_MIB << 20)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) of `level` (its own pixels), white outside the level."""
        page = self.pages[level]
        tw, th, W, H = page.tilewidth, page.tilelength, page.imagewidth, page.imagelength
        inside = x >= 0 and y >= 0 and x + w <= W and y + h <= H  # then the tiles cover every pixel
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), FILL, np.uint8)
        n_x = -(-W // tw)
        for ty in range(max(y, 0) // th, min(y + h, H) // th + 1):
            for tx in range(max(x, 0) // tw, min(x + w, W) // tw + 1):
                if ty * th >= min(y + h, H) or tx * tw >= min(x + w, W):
                    continue
                tile = self._tile(level, ty * n_x + tx)
                x0, y0 = max(x, tx * tw), max(y, ty * th)
                x1, y1 = min(x + w, (tx + 1) * tw, W), min(y + h, (ty + 1) * th, H)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
        return out

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        tile = self.tiles.get(key)
        if tile is not None:
            self.tiles.move_to_end(key)
            return tile
        page = self.pages[level]
        offset, size = page.dataoffsets[index], page.databytecounts[index]
        if size:
            decode = page.decode  # built on first use, which itself reads the file: before the seek
            self.handle.seek(offset)
            tile = decode(self.handle.read(size), index, jpegtables=page.jpegtables)[0]
        if not size or tile is None:  # a tile the writer left out (sparse slides): nothing scanned there
            tile = np.full((page.tilelength, page.tilewidth, 3), FILL, np.uint8)
        tile = np.ascontiguousarray(np.asarray(tile).reshape(page.tilelength, page.tilewidth, -1)[..., :3])
        self.tiles[key] = tile
        self.bytes += tile.nbytes
        while self.bytes > self.max_bytes and len(self.tiles) > 1:
            self.bytes -= self.tiles.popitem(last=False)[1].nbytes
        return tile


def _decode_jpeg(path: Path) -> np.ndarray | None:
    """A JPEG's RGB pixels decoded by OpenCV (the same pixels as Pillow's, in 0.6 × its CPU
    and one copy of the image at its peak instead of four); None for other files and for
    what OpenCV cannot read, and a file that does not end as a JPEG does (OpenCV decodes a
    truncated one silently in part: Pillow then decodes it, or says why not)."""
    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(-2, 2)
            if fh.read(2) != b"\xff\xd9":  # end-of-image marker
                return None
    except OSError:
        return None
    flags = cv2.IMREAD_IGNORE_ORIENTATION  # as Pillow: EXIF orientation not applied
    if hasattr(cv2, "IMREAD_COLOR_RGB"):  # recent OpenCV: the decoder's own RGB output (the same pixels, no swap of the image)
        return cv2.imread(str(path), cv2.IMREAD_COLOR_RGB | flags)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | flags)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)


def _as_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def _crop_padded(img: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    H, W = img.shape[:2]
    if x >= 0 and y >= 0 and x + w <= W and y + h <= H:
        return img[y : y + h, x : x + w]
    out = np.full((h, w, 3), FILL, np.uint8)
    sx0, sy0, sx1, sy1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = img[sy0:sy1, sx0:sx1]
    return out


HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}  # JPEG start-of-frame markers of Huffman-coded images


def _check_jpeg_data(path: Path, size: tuple[int, int]) -> None:
    """Refuse a Huffman-coded JPEG smaller than its header's size allows: each 8×8 block of
    the first component codes its DC term in at least one bit (baseline and progressive)."""
    with open(path, "rb") as fh:
        frame = _jpeg_frame(fh)
    if frame not in HUFFMAN_FRAMES:
        return
    W, H = size
    need, have = math.ceil(W / 8) * math.ceil(H / 8) // 8, path.stat().st_size
    if have < need:
        raise InputError(path, f"the JPEG header claims {W}×{H} px, which takes at least {need:,} bytes of image data, "
                               f"but the file holds {have:,}: truncated, or a false header")


def _jpeg_frame(fh) -> int | None:
    """The start-of-frame marker of a JPEG stream (0xC0..0xCF), or None (not a JPEG, no frame)."""
    if fh.read(2) != b"\xff\xd8":
        return None
    while (head := fh.read(4)) and len(head) == 4 and head[0] == 0xFF:
        marker, length = head[1], int.from_bytes(head[2:], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:  # scan data before any frame header
            return None
        fh.seek(length - 2, 1)
    return None


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
