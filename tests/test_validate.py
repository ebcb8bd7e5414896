"""Input validation at the boundary: each problem is one clear line, nothing is written."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stimpute import StimputeError
from stimpute.cli import app
from stimpute.errors import StimputeWarning
from stimpute.expression import select_panel
from stimpute.io import read_section, write_h5ad_atomic

runner = CliRunner()


def _sample(tmp_path, counts=None, xy=None, ids=None, image_name="s.png", name="s"):
    """An .h5ad + image beside it, with a stated µm/px; fields overridable to break them."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(4, (6, 3)).astype(np.float32) + 1 if counts is None else np.asarray(counts, np.float32)
    adata = ad.AnnData(X=counts)
    adata.obs_names = ids or [f"spot{i}" for i in range(len(counts))]
    adata.var_names = ["A", "B", "C"][: counts.shape[1]]
    adata.obsm["spatial"] = np.asarray(xy if xy is not None else rng.uniform(5, 45, (len(counts), 2)), float)
    adata.uns["stimpute"] = {"um_per_px": 1.0, "image": image_name}
    write_h5ad_atomic(adata, tmp_path / f"{name}.h5ad", force=True)
    Image.new("RGB", (50, 50), "white").save(tmp_path / "s.png")
    return tmp_path / f"{name}.h5ad"


def _cli_rejects(tmp_path, path, *needles):
    out = tmp_path / "converted"
    result = runner.invoke(app, ["convert", "h5ad", str(path), str(out)])
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not out.exists()  # nothing written
    return result


def test_a_valid_sample_passes(tmp_path):
    assert read_section(_sample(tmp_path)).n_spots == 6


def test_spots_outside_the_image(tmp_path):
    xy = [[10, 10]] * 5 + [[80, 10]]
    _cli_rejects(tmp_path, _sample(tmp_path, xy=xy), "s.h5ad", 'obsm["spatial"]', "1 spot(s) lie outside the 50×50 px image", "spot5")


def test_duplicated_spot_ids(tmp_path):
    path = _sample(tmp_path, ids=["a", "b", "a", "c", "d", "e"])
    _cli_rejects(tmp_path, path, "spot ids: duplicated (a)")


@pytest.mark.parametrize(
    "value,message", [(np.nan, "1 NaN value(s)"), (-2.0, "1 negative value(s)"), (0.5, "non-integer values")]
)
def test_counts_that_are_not_raw(tmp_path, value, message):
    counts = np.ones((6, 3), np.float32)
    counts[2, 1] = value
    _cli_rejects(tmp_path, _sample(tmp_path, counts=counts), "s.h5ad: counts:", message)


def test_all_problems_reported_together(tmp_path):
    counts = np.ones((6, 3), np.float32)
    counts[0, 0] = -1
    result = _cli_rejects(tmp_path, _sample(tmp_path, counts=counts, xy=[[10, 10]] * 5 + [[-3, 10]]), "outside", "negative")
    assert len([ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 2


def test_zero_count_spots_are_dropped_with_a_warning(tmp_path):
    counts = np.ones((6, 3), np.float32)
    counts[[1, 4]] = 0
    with pytest.warns(StimputeWarning, match="dropped 2 spot"):
        s = read_section(_sample(tmp_path, counts=counts))
    assert s.n_spots == 4 and s.report["dropped_zero_count_spots"] == 2
    result = runner.invoke(app, ["info", str(tmp_path / "s.h5ad")])
    assert result.exit_code == 0 and "warning:" in result.output and "dropped 2 spot" in result.output


def test_unsupported_image_format(tmp_path):
    path = _sample(tmp_path, image_name="s.xyz")
    (tmp_path / "s.xyz").write_bytes(b"not an image")
    _cli_rejects(tmp_path, path, "s.xyz", "unsupported image format '.xyz'")


def test_gene_symbols_that_differ_between_sections(tmp_path):
    a = read_section(_sample(tmp_path))
    b = a.adata.copy()
    b.var_names = ["A", "B", "Z"]
    with pytest.warns(StimputeWarning, match="2 gene"):
        assert sorted(select_panel([a.adata, b], n_top=5, rule="mean")) == ["A", "B"]
    b.var_names = ["X", "Y", "Z"]
    with pytest.raises(StimputeError, match="share no gene"):
        select_panel([a.adata, b])
