"""Spot geometry and image scale from metadata: HEST JSON, Visium scale factors, image tags."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import sparse

from stimpute import StimputeError
from stimpute.errors import StimputeWarning
from stimpute.io import read_section, read_stack, write_h5ad_atomic
from stimpute.io.geometry import image_um_per_px


def _hest_sample(root, meta: dict | None, uns_spatial: dict | None = None, name: str = "S9"):
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(exist_ok=True)
    counts = np.random.default_rng(0).poisson(3, (20, 5)).astype(np.float32) + 1
    adata = ad.AnnData(X=sparse.csr_matrix(counts))
    adata.obsm["spatial"] = np.random.default_rng(0).uniform(10, 90, (20, 2))
    if uns_spatial:
        adata.uns["spatial"] = uns_spatial
    write_h5ad_atomic(adata, root / "st" / f"{name}.h5ad", force=True)
    Image.new("RGB", (100, 100), "white").save(root / "wsis" / f"{name}.tif")
    if meta is not None:
        (root / "metadata" / f"{name}.json").write_text(json.dumps(meta))
    return root / "st" / f"{name}.h5ad"


def test_hest_spot_diameter_and_pitch_come_from_metadata(tmp_path):
    path = _hest_sample(tmp_path, {"pixel_size_um_estimated": 0.5, "spot_diameter": 100.0, "inter_spot_dist": 200.0,
                                   "st_technology": "Spatial Transcriptomics"})
    s = read_section(path)
    assert s.spot_diameter_um == 100.0 and s.pitch_um == 200.0 and s.spot_diameter_px == pytest.approx(200.0)
    assert s.report["geometry"]["spot_diameter_um"] == "S9.json spot_diameter"


def test_hest_technology_gives_geometry_when_diameter_is_missing(tmp_path):
    s = read_section(_hest_sample(tmp_path, {"pixel_size_um_estimated": 0.5, "st_technology": "Visium"}))
    assert (s.spot_diameter_um, s.pitch_um) == (55.0, 100.0)


def test_default_spot_diameter_is_warned_once(tmp_path):
    path = _hest_sample(tmp_path, {"pixel_size_um_estimated": 0.5})
    with pytest.warns(StimputeWarning, match="spot diameter not found") as caught:
        s = read_section(path)
    assert s.spot_diameter_um == 55.0 and len([w for w in caught if w.category is StimputeWarning]) == 1


def test_visium_scalefactors_give_the_scale(tmp_path):
    spatial = {"lib": {"scalefactors": {"spot_diameter_fullres": 110.0, "tissue_lowres_scalef": 0.1}}}
    s = read_section(_hest_sample(tmp_path, {"spot_diameter": 55.0}, uns_spatial=spatial))
    assert s.um_per_px == pytest.approx(0.5) and s.spot_diameter_um == 55.0
    (tmp_path / "metadata" / "S9.json").unlink()
    (tmp_path / "st" / "spatial").mkdir()
    (tmp_path / "st" / "spatial" / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 220.0}))
    plain = _hest_sample(tmp_path, None, name="S9")
    with pytest.warns(StimputeWarning, match="spot diameter"):
        s = read_section(plain)
    assert s.um_per_px == pytest.approx(0.25)


def test_image_resolution_tags_and_screen_dpi(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64, 3), np.uint8), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    assert image_um_per_px(tmp_path / "a.tif")[0] == pytest.approx(0.5)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg", dpi=(72, 72))  # a screen default, not a scan
    assert image_um_per_px(tmp_path / "b.jpg") is None


def test_image_file_is_an_unmeasured_section(synthetic, tmp_path):
    Image.fromarray(synthetic[1].image.read_region(0, 0, *synthetic[1].image.size)).save(tmp_path / "he_5.png")
    s = read_section(tmp_path / "he_5.png", um_per_px=2.0)
    assert s.name == "he_5" and s.n_spots == 0 and not s.has_counts and s.um_per_px == 2.0
    with pytest.raises(StimputeError, match=r"he_5\.png: micrometres per pixel unknown"):
        read_section(tmp_path / "he_5.png")


def test_image_section_takes_the_measured_scale_with_a_warning(tmp_path):
    from tests.helpers import write_her2st_folder

    folder = write_her2st_folder(tmp_path / "A", "A")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "b.png")
    with pytest.warns(StimputeWarning, match=r"b\.png: micrometres per pixel not found"):
        stack = read_stack([folder, tmp_path / "b.png"])
    assert stack.names == ["A", "b"] and stack["b"].um_per_px == pytest.approx(stack["A"].um_per_px)
    assert read_stack([folder, tmp_path / "b.png"], um_per_px=0.3)["b"].um_per_px == 0.3
