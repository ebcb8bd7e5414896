"""`SectionImage` gives one answer per image, whatever was read before."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from stimpute.errors import StimputeError
from stimpute.image import SectionImage


def test_thumbnail_is_the_same_before_and_after_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 255, (96, 128, 3)).repeat(8, 0).repeat(8, 1)).astype(np.uint8)  # 768×1024, blocky
    Image.fromarray(pixels).save(tmp_path / "he.jpg", quality=90)
    image = SectionImage.open(tmp_path / "he.jpg")
    first, scale = image.thumbnail(256)
    image.read_region(0, 0, 10, 10)  # decodes the whole file and keeps it
    again, scale_again = image.thumbnail(256)
    assert scale == scale_again and np.array_equal(first, again)
    image.release()
    assert np.array_equal(SectionImage.open(tmp_path / "he.jpg").thumbnail(256)[0], first)


def test_verify_reads_a_jpeg_at_reduced_scale(tmp_path, monkeypatch):
    """`stimpute info` checks the whole file without holding the full-resolution pixels."""
    Image.fromarray(np.full((2000, 1600, 3), 180, np.uint8)).save(tmp_path / "he.jpg")
    image = SectionImage.open(tmp_path / "he.jpg")
    monkeypatch.setattr(SectionImage, "_full", lambda self: (_ for _ in ()).throw(AssertionError("full decode")))
    image.verify()
    assert image._array is None


def test_windows_resample_from_the_decoded_pyramid_without_aliasing():
    """A 1024 px window read at 224 px comes from the level two halvings down (reduced by
    < 2× after that), antialiased: a one-pixel checkerboard averages to flat grey, and a
    smooth image reads as the area average of its pixels would."""
    yy, xx = np.mgrid[0:1200, 0:1200]
    checker = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    image = SectionImage(array=checker)
    patch = image.read_region(50, 70, 1024, 1024, out_size=224).astype(float)
    assert len(image._levels) == 3  # full, 1/2, 1/4
    assert abs(patch.mean() - 127.5) < 1.5 and patch.std() < 1.5
    smooth = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    window = smooth[70:70 + 1024, 50:50 + 1024]
    reference = np.asarray(Image.fromarray(window).resize((224, 224), Image.BOX)).astype(float)
    ours = SectionImage(array=smooth).read_region(50, 70, 1024, 1024, out_size=224).astype(float)
    assert np.median(np.abs(ours - reference)) < 3  # (the wrap-around edges of `% 256` differ most)
    image.release()
    assert image._levels == [] and image.read_region(0, 0, 8, 8).shape == (8, 8, 3)


def test_jpeg_full_decode_gives_pillows_pixels_and_refuses_a_truncated_file(tmp_path):
    """The full decode (OpenCV, for speed and memory) gives Pillow's pixels; a truncated JPEG
    (which OpenCV would decode in part) still gives the one-line decode error."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3)).astype(np.uint8), (0, 0), 2)
    path = tmp_path / "HE.jpg"
    Image.fromarray(img).save(path, quality=90)
    with Image.open(path) as im:
        want = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(SectionImage(path)._full(), want)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(StimputeError, match=r"HE\.jpg: cannot decode image"):
        SectionImage(path)._full()
