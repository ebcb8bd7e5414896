"""`SectionImage` gives one answer per image, whatever was read before."""

from __future__ import annotations

import numpy as np
from PIL import Image

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
