"""Normalisation and gene panel selection."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from stimpute import StimputeError
from stimpute.expression import normalize_log1p, panel_expression, read_gene_list, select_panel, top_variable


def _adata(counts):
    a = ad.AnnData(X=sparse.csr_matrix(np.asarray(counts, np.float32)))
    a.var_names = [f"G{i}" for i in range(a.n_vars)]
    return a


def test_normalise_total_log1p_matches_hand_computation():
    counts = np.array([[1, 3, 0, 6], [10, 0, 0, 0]], float)
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    assert np.allclose(normalize_log1p(_adata(counts)), expected, atol=1e-5)


def test_reference_normalisation_is_log_of_shifted_fraction():
    counts = np.array([[1, 3, 0], [0, 0, 5]], float)
    expected = np.log((counts + 1) / (counts + 1).sum(1, keepdims=True))
    assert np.allclose(normalize_log1p(_adata(counts), "reference"), expected, atol=1e-6)


def test_hvg_panel_prefers_genes_that_vary_across_spots():
    rng = np.random.default_rng(0)
    n = 200
    programme = rng.random(n) > 0.5
    flat = rng.poisson(20, size=(n, 30))
    varying = rng.poisson(np.where(programme[:, None], 60, 2), size=(n, 5))
    a = _adata(np.c_[flat, varying])
    panel = select_panel(a, n_top=5)
    assert sorted(panel) == [f"G{i}" for i in range(30, 35)]


def test_mean_panel_and_genes_shared_by_all_sections():
    a = _adata([[5, 1, 9], [5, 1, 9]])
    b = _adata([[5, 1], [4, 2]])
    assert select_panel([a, b], n_top=5, rule="mean") == ["G0", "G1"]


def test_user_gene_list_is_checked(tmp_path):
    a = _adata(np.ones((4, 3)))
    f = tmp_path / "genes.txt"
    f.write_text("G2\n# comment\n\nG0\nG2\n")
    assert read_gene_list(f) == ["G2", "G0"]
    assert select_panel(a, genes=f) == ["G2", "G0"]
    f.write_text("G2\nERBB2\nFOO\n")
    with pytest.raises(StimputeError, match=r"genes\.txt: 2 gene\(s\) not measured .*ERBB2, FOO"):
        select_panel(a, genes=f)
    f.write_text("\n# nothing\n")
    with pytest.raises(StimputeError, match="genes.txt: gene list is empty"):
        select_panel(a, genes=f)


def test_panel_expression_uses_the_full_library(synthetic):
    s = synthetic[0]
    panel = ["GENE003", "GENE001"]
    expr = panel_expression(s, panel)
    full = normalize_log1p(s.adata)
    assert expr.shape == (s.n_spots, 2) and np.allclose(expr[:, 0], full[:, 3])
    assert list(top_variable(full, 3)) == list(np.argsort(-full.var(0))[:3])


@pytest.mark.her2st
def test_default_panel_on_her2st_holds_tumour_and_immune_genes(her2st_root):
    from stimpute.io import read_section

    panel = select_panel(read_section(her2st_root / "C3").adata)
    assert len(panel) == 250 and len(set(panel)) == 250
    assert {"ERBB2", "IGKC", "IGHG3"} <= set(panel)
