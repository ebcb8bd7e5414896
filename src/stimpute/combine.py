"""Combining expression estimates gene by gene, as patterns rather than levels.

Two estimates of the same genes (an image model and a cross-layer transfer, say) often
agree on where a gene is high and disagree on its level or spread: an image model on a
section stained differently from the known one shifts whole genes up or down. Per-gene
PCC rewards the pattern, so estimates are mixed as per-gene z-scores over the spots of
one section; the mixture then takes the raw mixture's mean and spread, so levels (which
the per-spot PCC across genes rewards) stay those of the estimates.
"""

from __future__ import annotations

import numpy as np

FUSIONS = ("fixed", "calibrated", "even")  # ASIGN's fusion modes (`stimpute.models.asign`), here for `--fusion`'s check at start-up


def zmix(a: np.ndarray, b: np.ndarray, share_b) -> np.ndarray:
    """(1 − share)·a + share·b mixed as per-gene z-scores over the spots, then given the raw
    mixture's per-gene mean and spread (`share_b`: a number, (n_genes,) or (n_spots, n_genes))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    raw = (1 - share_b) * a + share_b * b
    mixed = zscore((1 - share_b) * zscore(a) + share_b * zscore(b))
    return (raw.mean(0) + raw.std(0) * mixed).astype(np.float32)


def zscore(values: np.ndarray) -> np.ndarray:
    """Per-column z-scores over the rows (axis -2, so a stack of matrices is done at once;
    a constant column becomes 0)."""
    spread = values.std(-2, keepdims=True)
    return (values - values.mean(-2, keepdims=True)) / np.where(spread > 1e-12, spread, 1.0)
