"""Metrics against hand-computed values, including constant and NaN cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stimpute.metrics import gene_metrics, paired_test, pearson_columns, spot_pcc, summarise_pcc


def test_per_gene_pcc_mse_mae_by_hand():
    truth = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    pred = np.array([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0]])
    m = gene_metrics(pred, truth, ["A", "B"])
    assert m.loc[0, "pcc"] == pytest.approx(1.0)
    assert np.isnan(m.loc[1, "pcc"])  # constant prediction: undefined
    assert m.loc[0, "mse"] == pytest.approx((1 + 4 + 9) / 3)
    assert m.loc[1, "mae"] == pytest.approx((5 + 4 + 5) / 3)


def test_pcc_matches_scipy_and_constant_truth_is_undefined():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    b[:, 2] = 7.0
    r = pearson_columns(a, b)
    assert r[0] == pytest.approx(stats.pearsonr(a[:, 0], b[:, 0])[0])
    assert np.isnan(r[2])


def test_spot_pcc_is_across_genes():
    truth = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert np.allclose(spot_pcc(truth * 2, truth), [1.0, 1.0])
    assert np.allclose(spot_pcc(truth[::-1], truth), [-1.0, -1.0])


def test_summary_counts_undefined_as_zero():
    s = summarise_pcc([0.5, np.nan, 0.7, 0.0])
    assert s.mean == pytest.approx(0.3) and s.n_undefined == 1 and s.n_genes == 4
    assert "1 undefined counted as 0" in str(s)


def test_paired_test_pairs_on_split_target_and_gene():
    import pandas as pd
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    keys = pd.DataFrame({"known": "A", "target": "B", "gene": [f"g{i}" for i in range(30)]})
    a = keys.assign(pcc=rng.normal(size=30))
    b = keys.assign(pcc=a.pcc - 0.1 + rng.normal(scale=0.01, size=30)).sample(frac=1, random_state=0)  # shuffled rows
    assert paired_test(a, b) == pytest.approx(wilcoxon(a.pcc - b.sort_index().pcc).pvalue)
    assert paired_test(a, b) < 1e-5 and paired_test(a, a) == 1.0
