"""Accuracy metrics shared by models, the pipeline and the benchmark (a leaf: imports no stimpute module).

Per-gene Pearson r across spots (the headline), the ASIGN paper's per-spot r across genes,
MSE/MAE, summaries that count undefined correlations as 0, and the paired Wilcoxon test
the benchmark compares methods with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def pearson_columns(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair; NaN where either column is constant (undefined)."""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    p = pred - pred.mean(axis=0)
    t = truth - truth.mean(axis=0)
    denom = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=0) / denom
    undefined = (denom <= 1e-12 * max(1.0, float(np.abs(truth).max(initial=0)))) | ~np.isfinite(r)
    r[undefined] = np.nan
    return np.clip(r, -1.0, 1.0)


def gene_metrics(pred: np.ndarray, truth: np.ndarray, genes) -> pd.DataFrame:
    """One row per gene: `gene, pcc, mse, mae` (pcc NaN when undefined: constant input)."""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    err = pred - truth
    return pd.DataFrame(
        {
            "gene": list(genes),
            "pcc": pearson_columns(pred, truth),
            "mse": (err**2).mean(axis=0),
            "mae": np.abs(err).mean(axis=0),
        }
    )


def spot_pcc(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The ASIGN paper's metric: Pearson r across genes, one value per spot."""
    return pearson_columns(np.asarray(pred).T, np.asarray(truth).T)


@dataclass(frozen=True)
class Summary:
    """Mean/median per-gene PCC with undefined genes counted as 0, and how many there were."""

    mean: float
    median: float
    sd: float
    n_genes: int
    n_undefined: int

    def __str__(self) -> str:
        extra = f", {self.n_undefined} undefined counted as 0" if self.n_undefined else ""
        return f"mean {self.mean:.3f} ± {self.sd:.3f}, median {self.median:.3f} over {self.n_genes} genes{extra}"


def summarise_pcc(pcc) -> Summary:
    values = np.asarray(pcc, np.float64)
    undefined = ~np.isfinite(values)
    filled = np.where(undefined, 0.0, values)
    return Summary(
        mean=float(filled.mean()) if filled.size else float("nan"),
        median=float(np.median(filled)) if filled.size else float("nan"),
        sd=float(filled.std(ddof=1)) if filled.size > 1 else 0.0,
        n_genes=int(values.size),
        n_undefined=int(undefined.sum()),
    )


def paired_test(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Wilcoxon signed-rank p of two methods' per-gene PCCs, paired on (known, target, gene):
    the same genes of the same spots, so the comparison is not blurred by gene difficulty."""
    keys = ["known", "target", "gene"]
    both = a[keys + ["pcc"]].merge(b[keys + ["pcc"]], on=keys, suffixes=("_a", "_b"))
    diff = np.nan_to_num(both.pcc_a.to_numpy()) - np.nan_to_num(both.pcc_b.to_numpy())
    if len(diff) == 0 or not np.any(diff):
        return 1.0
    from scipy import stats  # here: a run that tests nothing does not import scipy.stats (0.7 s) before it starts

    return float(stats.wilcoxon(diff).pvalue)
