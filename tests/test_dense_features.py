"""Handcrafted descriptors from dense maps pooled per window (`stimpute.features.dense`)
against the patch path (`handcrafted.describe_patch`) they replace."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stimpute.features import dense, handcrafted, spot_features
from stimpute.features.encoders import get_spec, weights_id
from stimpute.features.handcrafted import BLOCKS, HANDCRAFTED_DIM, describe_patch
from stimpute.image import SectionImage

from tests.test_patches import make_section, stained_image


def reader(img: np.ndarray):
    """`read(x, y, w, h)` of an in-memory level, white outside it (as `SectionImage` pads)."""
    image = SectionImage(array=img)
    return lambda x, y, w, h: image.read_region(x, y, w, h)


def tissue_image(seed: int, shape=(520, 600), nuclei: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(stained_image(rng, shape), (0, 0), 1.2)
    for x, y in rng.integers(8, np.array(shape[::-1]) - 8, (nuclei, 2)):
        r = rng.integers(2, 5)
        img[y - r:y + r + 1, x - r:x + r + 1] = (70, 40, 120)
    return img


def pooled(img: np.ndarray, corners: np.ndarray, side: int = 224, tiles: bool | None = None) -> np.ndarray:
    return dense.describe_windows(dense.window_sums(reader(img), corners, side, tiles=tiles), side)


@pytest.mark.parametrize("tiles", [False, True])
def test_uniform_colour_gives_the_patch_colour_statistics(tiles):
    img = np.empty((400, 420, 3), np.uint8)
    img[:] = (180, 120, 160)  # uniform tissue
    corners = np.array([[30.0, 40.0], [150.5, 120.25]])
    got = pooled(img, corners, tiles=tiles)[:, BLOCKS["colour"]]
    want = describe_patch(img[:224, :224])[BLOCKS["colour"]]
    exact = np.r_[0:7, 16:18]  # tissue fraction, OD means and sds, H and E means
    np.testing.assert_allclose(got[:, exact], np.tile(want[exact], (2, 1)), rtol=1e-4, atol=1e-5)
    lut = handcrafted._OD_LUT  # deciles from 16-level byte bins: within the bin of the true value
    for c, byte in enumerate((180, 120, 160)):
        bin_od = lut[[byte // 16 * 16 + 15, byte // 16 * 16]]
        assert np.all((got[:, 7 + c::3][:, :3] >= bin_od[0] - 1e-6) & (got[:, 7 + c::3][:, :3] <= bin_od[1] + 1e-6))


@pytest.mark.parametrize("tiles", [False, True])
def test_windows_over_blobs_have_higher_nuclei_density(tiles):
    rng = np.random.default_rng(1)
    img = np.full((300, 700, 3), (225, 170, 200), np.uint8)  # pale eosin-pink tissue
    img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    for x, y in rng.integers(8, (330, 292), (250, 2)):  # nuclei only in the left half
        img[y - 3:y + 4, x - 3:x + 4] = (60, 30, 110)
    corners = np.array([[20.0, 30.0], [100.0, 40.0], [430.0, 30.0], [470.0, 60.0]])
    density = pooled(img, corners, tiles=tiles)[:, BLOCKS["nuclei"].start]
    assert density[:2].min() > 5 * max(density[2:].max(), 1e-3)
    patch = np.array([describe_patch(img[int(y):int(y) + 224, int(x):int(x) + 224])[BLOCKS["nuclei"].start]
                      for x, y in corners])
    np.testing.assert_allclose(density, patch, rtol=0.15, atol=0.05)  # blobs cut by a patch edge count there too


@pytest.mark.parametrize("tiles", [False, True])
def test_pooled_windows_agree_with_described_patches(tiles):
    """The maps' window means are the patch descriptors: colour, texture and the finer
    DoG bands within 15 % of each value's range over the windows, nuclei within that or a
    few blobs (a patch cuts the blobs on its edge, the maps count each whole). Left out:
    the GLCM energy slot (the equal-pair fraction here) and the coarsest DoG band (a
    patch's is dominated by its reflected border)."""
    img = tissue_image(2)
    corners = np.array([[10.0, 12.0], [200.0, 150.0], [333.0, 280.0], [64.0, 250.0]])
    got = pooled(img, corners, tiles=tiles)
    want = np.stack([describe_patch(img[int(y):int(y) + 224, int(x):int(x) + 224]) for x, y in corners])
    assert got.shape == (4, HANDCRAFTED_DIM) and got.dtype == np.float32 and np.isfinite(got).all()
    error = np.abs(got - want) / (np.abs(want).max(axis=0) + 1e-3)
    n_dist = len(handcrafted.GLCM_DISTANCES)
    glcm = np.delete(np.arange(BLOCKS["glcm"].start, BLOCKS["glcm"].stop), np.arange(2 * n_dist, 3 * n_dist))
    close = np.r_[np.arange(BLOCKS["colour"].start, BLOCKS["colour"].stop), glcm,
                  np.arange(BLOCKS["lbp"].start, BLOCKS["lbp"].stop), np.arange(BLOCKS["dog"].start, BLOCKS["dog"].stop - 1)]
    assert error[:, close].max() < 0.15
    nuclei = BLOCKS["nuclei"]
    assert ((error[:, nuclei] < 0.15) | (np.abs(got - want)[:, nuclei] < 0.11)).all()  # 0.1 per 1000 px: 5 blobs


def test_strips_give_the_sums_of_one_pass(monkeypatch):
    """Streaming in strips with a halo (bounded memory) gives the window sums of one strip."""
    img = tissue_image(3, (700, 500))
    corners = np.random.default_rng(3).uniform(-40, 460, (25, 2))
    whole = dense.window_sums(reader(img), corners, 96, tiles=False)
    monkeypatch.setattr(dense, "STRIP_PX", 40 * dense.CELL * dense.CELL)  # strips of a few cell rows
    np.testing.assert_allclose(dense.window_sums(reader(img), corners, 96, tiles=False), whole, rtol=2e-3, atol=1e-2)  # the DoG kernels: 3σ of 4σ inside the halo


def test_descriptor_version_is_part_of_the_cache_key(monkeypatch, tmp_path):
    section = make_section(stained_image(np.random.default_rng(4), (200, 200)), [[60, 70], [120, 110]], 0.686 * 4)
    runs = []
    spot_features(section, cache_dir=tmp_path, runs=runs)
    before = weights_id(get_spec("handcrafted"), None)
    monkeypatch.setattr(handcrafted, "VERSION", handcrafted.VERSION + 1)
    assert weights_id(get_spec("handcrafted"), None) != before
    spot_features(section, cache_dir=tmp_path, runs=runs)
    assert [r.cached for r in runs] == [False, False]


def test_read_region_resamples_to_a_width_and_height():
    img = tissue_image(5, (120, 160))
    image = SectionImage(array=img)
    out = image.read_region(-10, 20, 100, 60, out_size=(50, 30))
    assert out.shape == (30, 50, 3)
    assert (out[:, :4] == 255).all()  # left of the image: white
    np.testing.assert_array_equal(image.read_region(0, 0, 160, 120, out_size=(160, 120)), img)


@pytest.mark.parametrize("side", [224, 96])
def test_dog_pyramid_halves_where_the_patch_path_does(side):
    gray = cv2.cvtColor(tissue_image(6, (side, side)), cv2.COLOR_RGB2GRAY)
    cells = list(dense._dog_cells(np.pad(gray, 32, mode="reflect"), 32, side, side, side))
    bands = np.array([c.sum() for c in cells]) / side**2
    np.testing.assert_allclose(bands, handcrafted._dog(gray), rtol=0.1)


def test_handcrafted_features_import_no_torch_or_skimage():
    """A cached `stimpute features` rerun loads neither (start-up, issue 28)."""
    import subprocess
    import sys

    code = ("import sys, stimpute.features, stimpute.features.stored, stimpute.device; "
            "print(sorted(m for m in ('torch', 'skimage', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_strips_skip_a_gap_no_window_reaches(monkeypatch):
    """Windows in two bands with empty strips between them (tissue pieces far apart, or a
    stack whose declared scale shrinks the windows): the sums of one pass, no crash."""
    img = tissue_image(4, (900, 300))
    rng = np.random.default_rng(4)
    corners = np.vstack([rng.uniform([0, 0], [200, 60], (8, 2)), rng.uniform([0, 700], [200, 780], (8, 2))])
    whole = dense.window_sums(reader(img), corners, 64, tiles=False)
    monkeypatch.setattr(dense, "STRIP_PX", 10 * dense.CELL * dense.CELL)  # strips of a few cell rows
    np.testing.assert_allclose(dense.window_sums(reader(img), corners, 64, tiles=False), whole, rtol=2e-3, atol=1e-2)


def test_windows_mapped_alone_give_the_sums_of_strips(monkeypatch):
    """A window read alone with the strips' halo (`tile_sums`) gets the strips' sums; corners
    on the even cell lattice, where the strips' sums are exact (the DoG kernels reach a
    little past the halo: the same tolerance as strips against one pass)."""
    img = tissue_image(7, (640, 560))
    rng = np.random.default_rng(7)
    corners = (rng.integers(0, 60, (12, 2)) * dense.CELL).astype(float)
    monkeypatch.setattr(dense, "TILE_HALO", dense.HALO)
    np.testing.assert_allclose(dense.window_sums(reader(img), corners, 96, tiles=True),
                               dense.window_sums(reader(img), corners, 96, tiles=False), rtol=2e-3, atol=1e-2)


def test_sparse_windows_are_mapped_alone_and_overlapping_ones_in_strips():
    """The path follows the geometry: windows far apart (HER2-ST's spot scale) are read one
    by one with `TILE_HALO`; overlapping windows (the context scales) in strips."""
    img = tissue_image(8, (700, 700))
    for pitch, alone in ((140, True), (24, False)):
        g = np.arange(40, 560, pitch, dtype=float)
        corners = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
        reads = []

        def read(x, y, w, h):
            reads.append((w, h))
            return reader(img)(x, y, w, h)

        dense.window_sums(read, corners, 96)
        tile = 96 + 2 * dense.TILE_HALO
        assert (set(reads) == {(tile, tile)} and len(reads) == len(corners)) == alone


def test_strips_hold_at_most_strip_px(monkeypatch):
    """Memory is bounded by the strip size, not the level's: every strip read is at most
    STRIP_PX level px (halo aside), however wide the level."""
    img = tissue_image(9, (400, 1200))
    monkeypatch.setattr(dense, "STRIP_PX", 20_000)
    reads = []

    def read(x, y, w, h):
        reads.append((w - 2 * dense.HALO) * (h - 2 * dense.HALO))
        return reader(img)(x, y, w, h)

    g = np.arange(0, 1100, 20, dtype=float)
    corners = np.c_[g, (g * 0.25) % 300]
    dense.window_sums(read, corners, 64, tiles=False)
    assert len(reads) > 5 and max(reads) <= 20_000


def test_strips_read_only_the_column_runs_windows_cover():
    """Two groups of windows side by side with a gap wider than two halos: each strip reads
    the two runs of columns apart (not the gap), and each group gets the sums it gets alone."""
    img = tissue_image(10, (400, 1000))
    rng = np.random.default_rng(10)
    left, right = rng.uniform([0, 0], [150, 250], (6, 2)), rng.uniform([650, 0], [800, 250], (6, 2))
    reads = []

    def read(x, y, w, h):
        reads.append(w)
        return reader(img)(x, y, w, h)

    both = dense.window_sums(read, np.vstack([left, right]), 96, tiles=False)
    assert max(reads) < 500  # the 400 px gap is not read
    alone = np.vstack([dense.window_sums(reader(img), c, 96, tiles=False) for c in (left, right)])
    np.testing.assert_allclose(both, alone, rtol=2e-3, atol=1e-2)


def test_ring_boundaries_are_the_column_sums_of_cumsum():
    """The ring's boundaries, strip after strip and past its wrap, are bit for bit
    `np.cumsum(strip, axis=0, dtype=np.float64)` plus the boundary above the strip."""
    rng = np.random.default_rng(11)
    strips = [rng.uniform(0, 100, (r, 5, dense.N_CHANNELS)).astype(np.float32) for r in (3, 4, 2, 4)]
    ring = dense._Ring(6, 5)
    above = np.zeros((5, dense.N_CHANNELS))
    for strip in strips:
        ring.append(strip)
        want = np.cumsum(strip, axis=0, dtype=np.float64) + above
        got = np.stack([ring.rows[ring.slot(ring.n - len(strip) + j)] for j in range(len(strip))])
        assert np.array_equal(got, want)
        above = want[-1]
        ring.drop(ring.n - 1)  # keep the last boundary only: the next strip wraps around the ring
    with pytest.raises(ValueError):
        ring.append(np.zeros((6, 5, dense.N_CHANNELS), np.float32))


def test_packed_integer_maps_split_into_their_exact_cell_sums():
    """GLCM contrast and equal-pair counts summed as one packed map give the cell sums of each."""
    rng = np.random.default_rng(12)
    diffs = rng.integers(0, 32, (4, 64, 48)).astype(np.uint8)  # the 4 offsets' grey-level differences
    diffs[:, :8] = 0  # cells of equal pairs only
    packed = sum(cv2.LUT(d, dense._CON_EQ_LUT) for d in diffs)
    high = np.empty((16, 12), np.float32)
    con = dense._split_cells(packed, 4, dense._CON_EQ_SHIFT, high)
    want_con = dense._cells(sum(d.astype(np.float32) ** 2 for d in diffs), 4)
    want_eq = dense._cells(sum((d == 0).astype(np.float32) for d in diffs), 4)
    assert np.array_equal(con, want_con) and np.array_equal(high, want_eq) and high.max() == 64


def test_blob_box_shares_are_each_cells_part_of_the_box():
    """Each blob's statistics are spread over its bounding box: a cell holds the share of the
    box it overlaps (counted pixel by pixel here), boxes cut by the grid's edge keep the share
    inside, and a box inside the grid sums to one blob."""
    rng = np.random.default_rng(13)
    cols, rows = 5, 4
    x, y = rng.integers(-12, 44, 30), rng.integers(-12, 36, 30)
    w, h = rng.integers(1, 30, 30), rng.integers(1, 30, 30)
    blob, cell, share = dense._box_shares(x, w, y, h, cols, rows)
    got = np.zeros((30, rows * cols))
    np.add.at(got, (blob, cell), share)
    yy, xx = np.mgrid[0:rows * dense.CELL, 0:cols * dense.CELL]
    want = np.stack([np.bincount(((yy // dense.CELL) * cols + xx // dense.CELL)[(xx >= x[i]) & (xx < x[i] + w[i]) & (yy >= y[i]) & (yy < y[i] + h[i])],
                                 minlength=rows * cols) / (w[i] * h[i]) for i in range(30)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    inside = (x >= 0) & (y >= 0) & (x + w <= cols * dense.CELL) & (y + h <= rows * dense.CELL)
    assert inside.sum() > 3 and np.allclose(got[inside].sum(axis=1), 1.0)
