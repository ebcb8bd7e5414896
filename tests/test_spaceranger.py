"""Space Ranger `outs/` folders as sections: Visium v1/v2/CytAssist layouts, written by the tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stimpute.datasets import synthetic_stack
from stimpute.errors import InputError, StimputeWarning
from stimpute.io import read_section
from tests.helpers import one_error_line, run_cli, write_spaceranger_outs


@pytest.fixture(scope="module")
def stack():
    return synthetic_stack(2, seed=0, n_genes=30, tissue_radius_um=350.0, image_size=800)


@pytest.mark.parametrize("layout,antibodies", [("v1", 0), ("v2", 3), ("parquet", 0)])
def test_outs_folder_reads_spots_under_tissue_with_their_counts(stack, tmp_path, layout, antibodies):
    truth = stack[0]
    outs = write_spaceranger_outs(tmp_path / "A1", truth, layout=layout, antibodies=antibodies)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StimputeWarning)  # the full-resolution image is there: no warning
        section = read_section(outs)
    assert section.name == "A1" and section.n_spots == truth.n_spots  # the 5 spots on glass are left out
    assert section.genes == truth.genes and section.adata.var["gene_ids"].iloc[0].startswith("ENSG")
    np.testing.assert_array_equal(section.adata.X.toarray(), truth.adata.X.toarray())
    np.testing.assert_allclose(section.xy, truth.xy, atol=0.5)
    assert section.um_per_px == pytest.approx(truth.um_per_px) and section.spot_diameter_um == 55.0
    assert section.pitch_um == 100.0 and section.image.size == truth.image.size
    assert section.report["geometry"]["um_per_px"] == "scalefactors_json.json spot_diameter_fullres (55 µm)"
    assert list(section.adata.obs.columns) == ["array_row", "array_col"]


def test_run_folder_and_fiducials_and_the_um_per_px_option(stack, tmp_path, monkeypatch):
    outs = write_spaceranger_outs(tmp_path / "run", stack[0])
    factors = outs / "spatial" / "scalefactors_json.json"
    factors.write_text(factors.read_text().replace("spot_diameter_fullres", "unused"))
    section = read_section(tmp_path / "run")  # the run folder holding outs/
    assert section.name == "run" and section.um_per_px == pytest.approx(stack[0].um_per_px)
    monkeypatch.chdir(tmp_path / "run")
    assert read_section(Path("outs")).name == read_section(Path(".")).name == "run"
    assert "fiducial_diameter_fullres (65 µm)" in section.report["geometry"]["um_per_px"]
    assert read_section(outs, um_per_px=1.5).um_per_px == 1.5


def test_without_the_full_resolution_image_the_hires_image_is_used_with_one_warning(stack, tmp_path):
    outs = write_spaceranger_outs(tmp_path / "B2", stack[0], fullres=False, hires_scalef=0.5)
    with pytest.warns(StimputeWarning, match="no full-resolution image in outs/; using spatial/tissue_hires_image.png") as caught:
        section = read_section(outs)
    assert len(caught) == 1
    assert section.image.size == (400, 400) and section.um_per_px == pytest.approx(2 * stack[0].um_per_px)
    np.testing.assert_allclose(section.xy, stack[0].xy / 2, atol=0.5)
    assert section.spot_diameter_px == pytest.approx(stack[0].spot_diameter_px / 2)
    # an image given explicitly (convert spaceranger --image) is the full-resolution image
    Image.fromarray(stack[0].image.read_region(0, 0, 800, 800)).save(tmp_path / "scan.png")
    assert read_section(outs, image=tmp_path / "scan.png").image.size == (800, 800)


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda outs: (outs / "spatial" / "scalefactors_json.json").unlink(), ["spatial", "no scalefactors_json.json"]),
        (lambda outs: (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5"), ["filtered_feature_bc_matrix.h5", "cannot read 10x matrix"]),
        (lambda outs: (outs / "spatial" / "tissue_positions.csv").write_text("barcode,in_tissue\nA,1\n"), ["tissue_positions.csv", "lacks columns"]),
        (lambda outs: (outs / "extra.jpg").write_bytes((outs / "C1_HE.tif").read_bytes()), ["several images", "extra.jpg"]),
    ],
)
def test_a_broken_outs_folder_is_one_error_line(stack, tmp_path, edit, needles):
    outs = write_spaceranger_outs(tmp_path / "C1", stack[0])
    edit(outs)
    one_error_line(run_cli("info", outs), *needles)


def test_info_and_convert_spaceranger(stack, tmp_path):
    outs = write_spaceranger_outs(tmp_path / "D1", stack[0], fullres=False)
    info = run_cli("info", outs)
    assert info.exit_code == 0 and "D1" in info.output and str(stack[0].n_spots) in info.output
    Image.fromarray(stack[0].image.read_region(0, 0, 800, 800)).save(tmp_path / "scan.png")
    result = run_cli("convert", "spaceranger", outs, tmp_path / "sections", "--image", tmp_path / "scan.png")
    assert result.exit_code == 0, result.output
    section = read_section(tmp_path / "sections" / "D1")
    assert section.n_spots == stack[0].n_spots and section.image.size == (800, 800)
    assert section.um_per_px == pytest.approx(stack[0].um_per_px)


def test_impute_on_an_outs_folder_and_an_he_image_runs_end_to_end(stack, tmp_path):
    import anndata as ad

    outs = write_spaceranger_outs(tmp_path / "V1", stack[0])
    he = tmp_path / "V2.png"
    Image.fromarray(stack[1].image.read_region(0, 0, 800, 800)).save(he)
    out = tmp_path / "imputed"
    result = run_cli("impute", outs, he, "--known", "V1", "--out", out, "--um-per-px", stack[1].um_per_px, "--epochs", 5)
    assert result.exit_code == 0, result.output
    imputed = ad.read_h5ad(out / "V2.h5ad")
    assert imputed.n_obs > 10 and list(imputed.var_names)[:1] and np.isfinite(imputed.X).all()
    block = ad.read_h5ad(out / "block.h5ad")
    assert set(block.obs["section"]) == {"V1", "V2"}
    with pytest.raises(InputError, match="not a section"):
        read_section(tmp_path / "V1" / "outs" / "spatial")
