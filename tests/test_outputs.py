"""`stimpute impute` with an H&E-only section: per-section files, block.h5ad, plots, read-back."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stimpute.cli import app
from stimpute.datasets import synthetic_stack
from stimpute.io import read_sections, write_h5ad_atomic
from stimpute.io.results import block_library, block_section
from tests.helpers import IMAGE_SECTION_STACK


@pytest.fixture(scope="module")
def run(image_section_impute):
    """S0 measured (known), S1 handed over as a PNG alone (he_1), S2 measured target (conftest)."""
    return image_section_impute, synthetic_stack(**IMAGE_SECTION_STACK)


def test_image_section_output_contract(run):
    out, stack = run
    adata = ad.read_h5ad(out / "he_1.h5ad")
    xy = adata.obsm["spatial"]
    assert adata.n_obs > 20 and (xy >= 0).all() and (xy < 600).all()  # own full-resolution pixels
    assert all("x" in name for name in adata.obs_names) and not adata.obs["measured"].any()
    assert (adata.X >= 0).all() and all((adata.layers[f"stimpute{k}"] >= 0).all() for k in ("", "_model", "_propagated"))
    assert ((adata.layers["stimpute_weight"] >= 0) & (adata.layers["stimpute_weight"] <= 1)).all()
    assert adata.obs["stimpute_reach"].between(0, 1).all()
    assert adata.obsm["spatial_3d"].shape == (adata.n_obs, 3) and np.allclose(adata.obsm["spatial_3d"][:, 2], 10.0)
    assert adata.var["stimpute_confidence"].notna().mean() > 0.9 and adata.obs["stimpute_confidence"].between(-1, 1).all()
    lib = adata.uns["spatial"]["he_1"]
    assert max(lib["images"]["hires"].shape) <= 2000 and max(lib["images"]["lowres"].shape) <= 600
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55.0 / 2)
    assert (out / "metrics.csv").is_file()


def test_figures_maps_registration_qc_and_3d_view(run):
    out, _ = run
    names = ["he_1.png", "S2.png", "overlay_S0_he_1.png", "overlay_he_1_S2.png", "spots_3d.png", "block_3d.png"]
    for name in names:
        with Image.open(out / "figures" / name) as im:
            assert min(im.size) > 400, name


def test_block_holds_every_section(run):
    out, stack = run
    block = ad.read_h5ad(out / "block.h5ad")
    assert list(block.obs["section"].cat.categories) == ["S0", "he_1", "S2"]
    assert block.obs.groupby("section", observed=True)["measured"].all().to_dict() == {"S0": True, "he_1": False, "S2": False}
    assert (block.obs["section"] == "S0").sum() == stack[0].n_spots and block.obs_names.is_unique
    z = block.obsm["spatial_3d"][:, 2]
    assert sorted(set(np.round(z, 6))) == [0.0, 10.0, 20.0] and (block.X >= 0).all()
    assert set(block.uns["spatial"]) == {"S0"} and "stimpute_confidence" in block.var  # one library: default plots
    assert set(block.uns["stimpute"]["sections"]["he_1"]["spatial"]["images"]) == {"hires", "lowres"}
    assert "images" not in block.uns["stimpute"]["sections"]["S0"]["spatial"]  # each image once: S0's are uns["spatial"]'s
    library = block_library(block.uns, "S0")
    assert library["images"]["hires"] is block.uns["spatial"]["S0"]["images"]["hires"] and "scalefactors" in library
    on_reference = block.obs["section"] == "S0"  # the reference frame is S0's own pixels
    assert np.allclose(block.obsm["spatial"][on_reference], block.obsm["spatial_section"][on_reference], atol=1e-6)
    he_1 = ad.read_h5ad(out / "he_1.h5ad")
    assert np.allclose(block.obsm["spatial_section"][(block.obs["section"] == "he_1").to_numpy()], he_1.obsm["spatial"])


def test_scanpy_and_squidpy_plot_the_outputs(run):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    out, _ = run
    adata = ad.read_h5ad(out / "he_1.h5ad")
    gene = adata.var_names[0]
    sc.pl.spatial(adata, color=gene, show=False)
    squidpy = pytest.importorskip("squidpy")
    squidpy.pl.spatial_scatter(adata, color=gene)
    block = ad.read_h5ad(out / "block.h5ad")
    sc.pl.spatial(block, color=gene, show=False)  # every section over the reference H&E
    squidpy.pl.spatial_scatter(block, color=gene)
    for name in ("S0", "he_1"):  # one section of the block over its own H&E
        squidpy.pl.spatial_scatter(block_section(block, name), color=gene)


def test_info_reads_every_output_back(run, tmp_path):
    out, _ = run
    for name in ("he_1.h5ad", "S2.h5ad", "block.h5ad"):
        result = CliRunner().invoke(app, ["info", str(out / name)])
        assert result.exit_code == 0, result.output
        assert "imputed" in result.output
    moved = tmp_path / "he_1.h5ad"  # the source image is not where the file says: uns['spatial'] hires is used
    adata = ad.read_h5ad(out / "he_1.h5ad")
    adata.uns["stimpute"]["image_path"] = str(tmp_path / "gone.png")
    write_h5ad_atomic(adata, moved, force=True)
    (section,) = read_sections(moved)
    assert "hires" in section.report["image"] and section.n_spots == adata.n_obs
    assert section.spot_diameter_px == pytest.approx(55.0 / 2 * adata.uns["spatial"]["he_1"]["scalefactors"]["tissue_hires_scalef"])
