"""Readers and writers: HER2-ST raw folders, section folders, HEST-style .h5ad, bad input."""

from __future__ import annotations

import copy
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from stimpute import Stack, StimputeError
from stimpute.io import read_h5ad_section, read_section, read_stack, write_h5ad_atomic, write_section
from tests.helpers import write_her2st_folder


@pytest.mark.her2st
@pytest.mark.parametrize("name,kept,dropped,genes", [("C2", 187, 0, 15706), ("C3", 180, 2, 15821), ("C4", 184, 3, 15842)])
def test_her2st_reader_on_shared_sections(her2st_root, name, kept, dropped, genes):
    s = read_section(her2st_root / name)
    assert (s.n_spots, s.adata.n_vars) == (kept, genes)
    assert s.report["dropped_spots_without_counts"] == dropped
    assert s.um_per_px == pytest.approx(0.687, abs=0.005)  # 200 µm lattice pitch over ~291 px
    assert 130 < s.spot_diameter_px < 160  # README: a spot spans roughly 150 px
    W, H = s.image.size
    assert (W, H)[0] > 9000 and np.all(s.xy > 0) and np.all(s.xy < [W, H])
    assert sparse.issparse(s.adata.X) and s.adata.X.sum() > 0


@pytest.mark.her2st
def test_her2st_stack_converts_and_reads_back(her2st_root, tmp_path):
    s = read_section(her2st_root / "C3")
    back = read_section(write_section(s, tmp_path))
    assert back.name == "C3" and back.um_per_px == pytest.approx(s.um_per_px)
    assert np.array_equal(back.xy, s.xy) and (back.adata.X != s.adata.X).nnz == 0
    assert back.report["spots_kept"] == 180
    assert "C3" in back.adata.uns["spatial"]  # scanpy/squidpy thumbnail layout


def test_her2st_reader_joins_on_spot_id_and_reports_drops(tmp_path):
    s = read_section(write_her2st_folder(tmp_path / "X1"))
    assert s.n_spots == 35 and s.adata.n_vars == 8
    assert s.report == {"spots_selected": 36, "spots_kept": 35, "dropped_spots_without_counts": 1, "dropped_counts_without_spot": 1}
    assert s.um_per_px == pytest.approx(200 / 40)
    assert list(s.adata.obs["array_col"][:2]) == [2, 3]  # 1x1 had no counts row


def test_section_folder_round_trip_synthetic(synthetic, tmp_path):
    src = synthetic[1]
    back = read_section(write_section(src, tmp_path))
    assert back.name == "S1" and back.z_um == src.z_um and back.spot_diameter_um == src.spot_diameter_um
    assert np.allclose(back.xy, src.xy)
    assert np.array_equal(back.image.read_region(100, 200, 64, 64), src.image.read_region(100, 200, 64, 64))
    with pytest.raises(StimputeError, match="already exists"):
        write_section(src, tmp_path)


def test_a_section_read_back_from_its_folder_writes_again(synthetic, tmp_path):
    """`convert h5ad` of a project section.h5ad: its report comes back from h5ad as arrays."""
    src = copy.copy(synthetic[1])  # the session's stack stays as it is (its report holds the synthetic truth)
    src.report = {"dropped": ["a", "b"], "counts": [1, 2]}
    back = read_section(write_section(src, tmp_path / "one"))
    again = read_section(write_section(back, tmp_path / "two"))
    assert list(again.report["dropped"]) == ["a", "b"] and list(again.report["counts"]) == [1, 2]


def test_hest_style_h5ad_with_wsi_folder_and_metadata(tmp_path):
    (tmp_path / "st").mkdir(), (tmp_path / "wsis").mkdir(), (tmp_path / "metadata").mkdir()
    counts = np.random.default_rng(0).poisson(3, (20, 5)).astype(np.float32)
    counts[:, 0] += 1  # no empty spot
    adata = ad.AnnData(X=sparse.csr_matrix(counts))
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["spatial"] = np.random.default_rng(0).uniform(10, 90, (20, 2))
    write_h5ad_atomic(adata, tmp_path / "st" / "S9.h5ad", force=True)
    Image.new("RGB", (100, 100), "white").save(tmp_path / "wsis" / "S9.tif")
    (tmp_path / "metadata" / "S9.json").write_text(json.dumps({"pixel_size_um_estimated": 0.5}))
    s = read_section(tmp_path / "st" / "S9.h5ad")
    assert s.name == "S9" and s.um_per_px == 0.5 and s.image.size == (100, 100) and s.n_spots == 20
    s2 = read_h5ad_section(tmp_path / "st" / "S9.h5ad", image=tmp_path / "wsis" / "S9.tif", um_per_px=0.25)
    assert s2.um_per_px == 0.25


def test_stack_orders_sections_and_assigns_z(synthetic):
    stack = Stack([synthetic[0], synthetic[2]])
    assert stack.names == ["S0", "S2"] and stack.index("S2") == 1
    with pytest.raises(StimputeError, match="not in the stack"):
        stack.index("S7")
    with pytest.raises(StimputeError, match="unique"):
        Stack([synthetic[0], synthetic[0]])


def test_read_stack_of_two_raw_folders(tmp_path):
    st = read_stack([write_her2st_folder(tmp_path / "A", "A"), write_her2st_folder(tmp_path / "B", "B", seed=1)], thickness_um=5)
    assert st.names == ["A", "B"] and [s.z_um for s in st] == [0, 5] and st.measured == ["A", "B"]


def test_counts_that_do_not_match_the_spot_table(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1", missing_counts_rows=30, extra_counts_rows=30)
    with pytest.raises(StimputeError, match=r"X1\.tsv\.gz: spot ids do not match"):
        read_section(folder)


def test_h5ad_without_spatial_coordinates(tmp_path):
    write_h5ad_atomic(ad.AnnData(X=np.ones((3, 2))), tmp_path / "bad.h5ad", force=True)
    with pytest.raises(StimputeError, match=r'bad\.h5ad: no obsm\["spatial"\]'):
        read_section(tmp_path / "bad.h5ad")


def test_missing_inputs_name_the_file(tmp_path):
    with pytest.raises(StimputeError, match="nothere: not found"):
        read_section(tmp_path / "nothere")
    folder = write_her2st_folder(tmp_path / "X1")
    next(folder.glob("*.jpg")).unlink()
    with pytest.raises(StimputeError, match="no H&E image found"):
        read_section(folder)


def test_truncated_jpeg_is_caught_on_verify(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    jpg = next(folder.glob("*.jpg"))
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    s = read_section(folder)  # header still readable: reading stays lazy
    with pytest.raises(StimputeError, match=r"HE_X1\.jpg: cannot decode image"):
        s.image.verify()


def test_image_regions_are_padded_white_outside(synthetic):
    img = synthetic[0].image
    W, H = img.size
    region = img.read_region(W - 10, -5, 20, 20)
    assert region.shape == (20, 20, 3) and (region[:5] == 255).all() and (region[:, 10:] == 255).all()
    assert img.read_region(0, 0, 50, 50, out_size=16).shape == (16, 16, 3)
    thumb, scale = img.thumbnail(200)
    assert max(thumb.shape[:2]) == 200 and scale == pytest.approx(0.1)


def test_prediction_h5ad_is_written_atomically(tmp_path):
    adata = ad.AnnData(X=np.ones((2, 2), np.float32), obs=pd.DataFrame(index=["a", "b"]))
    path = write_h5ad_atomic(adata, tmp_path / "pred.h5ad")
    assert ad.read_h5ad(path).shape == (2, 2) and not list(tmp_path.glob("*.part"))
    with pytest.raises(StimputeError, match="already exists"):
        write_h5ad_atomic(adata, path)


def test_text_in_pandas_string_dtype_is_written_as_plain_strings(tmp_path):
    """pandas 3 gives text its string dtype by default; anndata refuses to write it unless
    told to (and anndata < 0.11 cannot read it): outputs are written as plain strings."""
    text = pd.array(["a", "b", "a"], dtype="string")
    obs = pd.DataFrame({"spot": text, "kind": pd.Categorical(text), "z": [0.0, 1.0, 2.0]},
                       index=pd.Index(["s1", "s2", "s3"], dtype="string"))
    adata = ad.AnnData(np.ones((3, 2), np.float32), obs=obs, var=pd.DataFrame(index=["g1", "g2"]))
    back = ad.read_h5ad(write_h5ad_atomic(adata, tmp_path / "strings.h5ad"))
    assert list(back.obs["spot"]) == ["a", "b", "a"] and list(back.obs_names) == ["s1", "s2", "s3"]
    assert list(back.obs["kind"].cat.categories) == ["a", "b"] and list(back.obs["z"]) == [0.0, 1.0, 2.0]


def test_large_single_level_tiff_is_read_tile_by_tile(tmp_path, monkeypatch):
    """A TIFF above the decode limit stays with tiffslide even without a pyramid, and its
    thumbnail is built band by band; both agree with the pixels."""
    import cv2
    import tifffile

    import stimpute.image as image_module

    rng = np.random.default_rng(0)
    pixels = cv2.GaussianBlur(rng.integers(0, 255, (500, 640, 3), dtype=np.uint8), (15, 15), 5)
    tifffile.imwrite(tmp_path / "big.tif", pixels, tile=(128, 128), photometric="rgb")
    monkeypatch.setattr(image_module, "MAX_DECODED_PIXELS", 100 * 100)
    img = image_module.SectionImage.open(tmp_path / "big.tif")
    assert img._open_slide() is not None and img._array is None
    assert np.array_equal(img.read_region(100, 50, 64, 32), pixels[50:82, 100:164])
    thumb, scale = img.thumbnail(64)
    assert thumb.shape == (50, 64, 3) and scale == pytest.approx(0.1)
    assert np.abs(thumb.astype(float).mean() - pixels.astype(float).mean()) < 2
    assert img._array is None  # never decoded whole


def test_pyramid_tiff_written_by_tiles_reads_back_through_the_tile_cache(tmp_path):
    """`write_pyramid_tiff` (tile stream → tiled JPEG pyramid) and `SectionImage`'s decoded-tile
    reader: regions agree with tiffslide's reader at every level, white outside the slide."""
    import tiffslide

    from stimpute.image import SectionImage
    from stimpute.io.wsi import _tiles_of, write_pyramid_tiff

    rng = np.random.default_rng(0)
    W, H, tile = 1000, 700, 128
    blocks = rng.integers(60, 200, (H // 25 + 1, W // 25 + 1, 1), dtype=np.uint8) + np.array([40, 0, 30], np.uint8)
    pixels = np.kron(blocks, np.ones((25, 25, 1), np.uint8))  # H&E-like pink-purple blocks

    path = write_pyramid_tiff(tmp_path / "p.tif", W, H, _tiles_of(pixels[:H, :W], tile), um_per_px=0.5, tile=tile,
                              min_side=200)
    slide = tiffslide.TiffSlide(path)
    assert slide.level_dimensions == ((1000, 700), (500, 350), (250, 175), (125, 88))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    assert not list(tmp_path.glob(".*"))  # no scratch files left
    img = SectionImage.open(path)
    assert img._open_slide() is not None and img._tiles is not None
    level0 = img.read_region(-20, -10, W + 40, H + 20)
    assert (level0[:10] == 255).all() and (level0[:, :20] == 255).all() and (level0[-10:] == 255).all()
    assert np.abs(level0[10:-10, 20:-20].astype(int) - pixels[:H, :W]).mean() < 4  # JPEG
    for level in range(slide.level_count):
        ds = slide.level_downsamples[level]
        ours = img._tiles.read(level, 37, 21, 60, 40)
        theirs = np.asarray(slide.read_region((int(np.ceil(37 * ds)), int(np.ceil(21 * ds))), level, (60, 40), as_array=True))
        assert np.array_equal(ours, theirs)
    coarse = img.read_region(100, 100, 400, 400, out_size=50)  # resampled from level 3 (ds 8)
    assert coarse.shape == (50, 50, 3)
    assert np.abs(coarse.astype(float).mean() - pixels[100:500, 100:500].mean()) < 3


def test_h5ad_images_are_stored_uncompressed_and_read_back_exactly(tmp_path):
    """`write_h5ad_atomic`: the RGB images in uns are written as they are (gzip costs most of
    the writing time and gains little on them), everything else gzip-compressed."""
    import anndata as ad
    import h5py

    from stimpute.io.anndata_io import write_h5ad_atomic

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    adata = ad.AnnData(X=rng.random((5, 4)).astype(np.float32))
    adata.uns["spatial"] = {"S0": {"images": {"hires": image}, "scalefactors": {"tissue_hires_scalef": 0.5}}}
    write_h5ad_atomic(adata, tmp_path / "a.h5ad")
    assert adata.uns["spatial"]["S0"]["images"]["hires"] is image  # the object is left as it was
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert np.array_equal(back.uns["spatial"]["S0"]["images"]["hires"], image) and np.array_equal(back.X, adata.X)
    with h5py.File(tmp_path / "a.h5ad") as f:
        assert f["uns/spatial/S0/images/hires"].compression is None and f["X"].compression == "gzip"
