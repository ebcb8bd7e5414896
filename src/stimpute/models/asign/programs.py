"""Gene programs: the few directions in which the known sections' expression co-varies.

A spot's measured counts are noisy, and so is every prediction of 250 genes learnt from
a few hundred of them: much of what an image model or a cross-layer transfer predicts
lies in directions that no other section shares. Projecting each prediction onto the
leading principal axes of the known sections' (log-normalised) expression keeps the
gene programs the block really varies along and drops the rest; a gene's prediction then
borrows strength from the genes it co-varies with (low-rank outputs, one of the levers
the field reports for small data, `../shared/docs/accuracy-levers.md`).

How many programs to keep depends on the data (spot count, depth, tissue), so the rank
is not a constant: `choose_rank` cross-validates it on the known spots. Each fold's spots
are predicted by the two cheap parts of the imputation, the kernel ridge probe and the
cross-layer transfer of its residuals, both fitted without the fold, fused evenly by
reach; the rank whose
projection gives the highest mean per-gene PCC on the held-out spots wins, and "all
axes" (no projection) is always a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stimpute.metrics import pearson_columns
from stimpute.timing import timed

RANKS = (2, 3, 5, 8, 10, 15, 20, 30, 50)
CV_FOLDS = 5
CV_MAX_SPOTS = 3000  # bounds the kernel ridge fits of the cross-validation on big stacks


@dataclass
class GenePrograms:
    """Mean expression, all principal axes (n_axes, n_genes) of the known spots, and how
    many of them to keep: `rank` ≥ n_axes keeps everything (no projection)."""

    mean: np.ndarray
    axes: np.ndarray
    rank: int
    scores: dict[int, float] | None = None  # cross-validated mean per-gene PCC per candidate rank

    @property
    def full(self) -> bool:
        return self.rank >= len(self.axes)

    def project(self, values: np.ndarray) -> np.ndarray:
        """`values` (n_spots, n_genes) with only their components along the kept programs."""
        if self.full:
            return values
        axes = self.axes[:self.rank]
        centred = np.asarray(values, np.float64) - self.mean
        return ((centred @ axes.T) @ axes + self.mean).astype(np.asarray(values).dtype)


def programs_record(option: str | int, programs: GenePrograms) -> dict:
    """What config.yaml says about the projection: the option, the rank kept, the CV scores."""
    record = {"option": option, "rank": "all (no projection)" if programs.full else programs.rank}
    if programs.scores:
        record["cv_gene_pcc"] = {str(r): round(v, 4) for r, v in programs.scores.items()}  # h5ad keys are text
    return record


def fit_programs(expression: np.ndarray, rank: int | None = None) -> GenePrograms:
    """Principal axes of `expression` (spots × genes), keeping `rank` (None: all, no projection)."""
    expression = np.asarray(expression, np.float64)
    mean = expression.mean(axis=0)
    _, _, axes = np.linalg.svd(expression - mean, full_matrices=False)
    return GenePrograms(mean, axes, len(axes) if rank is None else max(1, min(rank, len(axes))))


def resolve_programs(prepared, known: list[int], programs: str | int, seed: int = 0,
                     morphology: bool = True) -> GenePrograms:
    """`programs`: "auto" (rank cross-validated), "none" (no projection) or a fixed rank."""
    expression = np.concatenate([prepared.known_expression(i) for i in known])
    if programs == "none":
        return fit_programs(expression)
    if programs == "auto":
        return choose_rank(prepared, known, seed, morphology)
    rank = int(programs)
    if rank < 1:
        raise ValueError(f"gene programs: a rank must be ≥ 1, got {programs!r} (or use 'auto' / 'none')")
    return fit_programs(expression, rank)


@timed("gene programs")
def choose_rank(prepared, known: list[int], seed: int = 0, morphology: bool = True,
                ranks: tuple[int, ...] = RANKS, folds: int = CV_FOLDS) -> GenePrograms:
    """Programs of the known spots, with the rank of the best cross-validated projection."""
    truth, predicted = _cross_validated(prepared, known, seed, morphology, folds)
    programs = fit_programs(np.concatenate([prepared.known_expression(i) for i in known]))
    candidates = sorted({r for r in ranks if r < programs.rank} | {programs.rank})
    scores = {}
    for rank in candidates:
        programs.rank = rank
        scores[rank] = float(np.nan_to_num(pearson_columns(programs.project(predicted), truth)).mean())
    programs.rank = max(candidates, key=lambda r: (scores[r], -r))
    programs.scores = scores
    return programs


def _cross_validated(prepared, known, seed, morphology, folds) -> tuple[np.ndarray, np.ndarray]:
    """Truth and out-of-fold predictions (kernel ridge ⊕ its transferred residuals, even by
    reach) of up to `CV_MAX_SPOTS` known spots."""
    from stimpute.evidence import transfer
    from stimpute.models.baselines import flat_features, probe_residuals

    sizes = [len(prepared.known_expression(i)) for i in known]
    chosen = np.random.default_rng(seed).permutation(sum(sizes))[:CV_MAX_SPOTS]
    fold_of = np.full(sum(sizes), -1)
    fold_of[chosen] = np.arange(len(chosen)) % folds  # balanced folds over a seeded subset
    fold_of = np.split(fold_of, np.cumsum(sizes)[:-1])
    features = {i: flat_features(prepared, [i]) for i in known}
    expression = {i: prepared.known_expression(i) for i in known}
    truth, predicted = [], []
    for f in range(folds):
        held = {i: fold_of[j] == f for j, i in enumerate(known)}
        train = {i: (fold_of[j] >= 0) & ~held[i] for j, i in enumerate(known)}
        ridge, residual = probe_residuals(features, expression, train, seed)
        carried, reach = transfer(prepared, known, known, [residual[i] for i in known], features=morphology,
                                  exclude={i: ~train[i] for i in known})
        for i in known:
            w = 0.5 * reach[i][held[i], None]
            model = ridge.predict(features[i][held[i]])
            predicted.append(w * (model + carried[i][held[i]]) + (1 - w) * model)
            truth.append(expression[i][held[i]])
    return np.concatenate(truth), np.concatenate(predicted)
