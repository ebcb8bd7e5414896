"""Which sections to measure: rank candidate known sets from the H&E images alone.

Before paying for ST slides, a lab must choose which section(s) of the block to measure.
`advise` registers the stack and describes every spot's morphology (the same cached
features `impute` uses), never reading counts: every section is stripped to its image and
spot positions first (`count_free`).

**The score: a rehearsal of the imputation on the images.** Each section's *pseudo-
expression* is its spots' leading principal components of image features (centred per
section, standardised over the stack: `embed`). Every section (a *target*) is imputed from
every other section alone the way `impute` propagates genes: the registration kernel's
transfer (`stimpute.register.matching.kernel_links`, with its morphology term) of the
known section's pseudo-expression. The target's own pseudo-expression is the truth: the
pair score `P[k, j]` is the mean per-component PCC of target j imputed from section k
(`pair_scores`). A single pair is noisy (a few hundred spots, 10 components), so the score
reads from P mainly the stack's decay along z (`continuity`, `decay_line`): a robust straight
line (Theil–Sen) through every pair's P against its z distance, never rising with distance;
a pair's own P only breaks ties (`TIE_BREAK`). A candidate known set's `score` is a
facility-location value: the mean over its targets (the sections it leaves out, as the
accuracy averages over them) of the continuity with the target's best known section. With a
straight decay, the sets ranked first are those with the least mean z distance from each
target to its nearest known section, and among those (often many) the pair rehearsal
decides. One exception comes first: a set whose every section has a ruined image
(`StackDescription.usable`: its spots resemble almost none of the other sections' in feature
space) ranks after every set with a usable one, whatever its score; measured alone, such a
section leaves the image model nothing to learn from. Nothing is fitted: no coefficient
comes from any stack. The variants (the decay
as a median per distance (`distance_prior`, the second round's), a line, or an exponential;
how much of a pair's own P to keep; an image-quality test; ties broken by evenness, tissue
area or spot coverage; in the fourth round, targets between two known sections, the whole-set
rehearsal among sets equal on the line, kriging, an image model's reach) were compared on the
even seeds of `benchmarks/bench_advise.py` (the lowest mean regret chose); see
benchmarks/README.md for what else was seen while choosing, and for the ceiling of any score
of this kind (facility location over a pair table).

The first rehearsal (every target imputed from the whole known set, with an image-model
stand-in fused in: `set_scores`) stays as an alternative the benchmark compares.

**What a score gap is worth.** The score is in pseudo-expression PCC, not gene PCC: it
ranks candidates but is no absolute accuracy (`expected_pcc` stays empty: no calibration
of an absolute PCC held across stacks). What is calibrated is the *relative* loss: the
mean per-gene PCC a candidate gives up against the top one, `loss = slope × gap` (gap: the
score difference), with an interval from the range of slopes single stacks showed and the
spread of actual losses around the line
(`CALIBRATION_FILE`, fitted by `benchmarks/bench_advise.py` on one half of its synthetic
stacks and checked on the other half and on HER2-ST). A candidate whose interval reaches
0 may be as good as the top: it is a *tie*.

All combinations are scored while there are at most `MAX_EXHAUSTIVE`; beyond that a beam
search builds sets one section at a time, keeping the `BEAM_WIDTH` best partial sets.
Every (target, known section) pair's kernel transfer is computed once, so a candidate
costs a few array maxima.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree
from scipy.stats import theilslopes

from stimpute.combine import zscore
from stimpute.data import Stack
from stimpute.errors import StimputeError

MIN_DICE = 0.5  # tissue-mask Dice of an adjacent pair after registration below this: not registered
MAX_EXHAUSTIVE = 5000  # candidate sets scored exhaustively up to this many
BEAM_WIDTH = 32  # partial sets kept per size in the beam search beyond that
N_COMPONENTS = 10  # principal components of the standardised spot features: the pseudo-expression
N_DETAILED = 5  # candidates whose per-section reasoning advice.md spells out
N_TIES_NAMED = 10  # tied candidates advice.md names in its verdict (all are in advice.csv)
MODEL_K = 8  # feature-space neighbours of the image model's stand-in (`set_scores`)
TIE_BREAK = 1e-3  # weight of a pair's own rehearsal score beside the typical one as far apart in z
PROPAGATED_SHARE = 2 / 3  # the propagated part's share per unit reach (`stimpute.models.asign.FIXED_SHARE`)
RUINED_SHARE = 0.1  # image coverage below this share of the stack's median: a ruined image (`StackDescription.usable`)
CALIBRATION_FILE = Path(__file__).parent / "data" / "advise_calibration.json"


@dataclass
class StackDescription:
    """Count-free description of a registered stack: per section its spots in µm (x, y in
    the reference frame), its depth, and its spots' pseudo-expression (`embed`)."""

    names: list[str]
    z_um: np.ndarray
    xy_um: list[np.ndarray]
    embedding: list[np.ndarray]
    pitch_um: float
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # registration quality per adjacent pair

    def __post_init__(self):
        from stimpute.register.matching import kernel_links

        n, c = len(self.names), self.embedding[0].shape[1]
        xyz = [np.c_[xy, np.full(len(xy), z)] for xy, z in zip(self.xy_um, self.z_um)]
        self._truth = [zscore(e) for e in self.embedding]
        self._sums = np.stack([e.sum(0) for e in self.embedding])
        self._counts = np.array([len(e) for e in self.embedding], float)
        # per target t, from every source section s (zero for s = t): the kernel's weight,
        # weighted sum of pseudo-expression and spatial weight per spot
        self._weight, self._carried, self._spatial, self._xy_nn = [], [], [], {}
        for t in range(n):
            n_t = len(xyz[t])
            weight, spatial, carried = np.zeros((n, n_t)), np.zeros((n, n_t)), np.zeros((n, n_t, c))
            for s in (s for s in range(n) if s != t):
                linked = kernel_links(xyz[t], xyz[s], self.pitch_um, query_features=self.embedding[t],
                                      known_features=self.embedding[s])
                carried[s] = linked @ self.embedding[s]
                weight[s] = np.asarray(linked.sum(axis=1)).ravel()
                spatial[s] = np.asarray(kernel_links(xyz[t], xyz[s], self.pitch_um).sum(axis=1)).ravel()
                self._xy_nn[t, s] = cKDTree(self.xy_um[s]).query(self.xy_um[t])[0]
            self._weight.append(weight), self._spatial.append(spatial), self._carried.append(carried)

    @cached_property
    def _neighbours(self) -> tuple[list, dict]:
        """Per target t, its spots' nearest spots in feature space over all other sections,
        nearest first (source, values), and {(t, s): distance to the nearest spot of s}
        (for the image-model stand-in and `quantities`; computed on first use)."""
        n = len(self.names)
        trees = [cKDTree(e) for e in self.embedding]
        nearest, feature_nn = [], {}
        for t in range(n):
            n_t = len(self.embedding[t])
            dists, sources, values = [], [], []
            for s in (s for s in range(n) if s != t):
                k = min(MODEL_K, len(self.embedding[s]))
                dist, idx = trees[s].query(self.embedding[t], k=k)
                dist, idx = dist.reshape(n_t, k), idx.reshape(n_t, k)
                feature_nn[t, s] = dist[:, 0]
                dists.append(dist), sources.append(np.full((n_t, k), s)), values.append(self.embedding[s][idx])
            order = np.argsort(np.concatenate(dists, axis=1), axis=1, kind="stable")
            nearest.append((np.take_along_axis(np.concatenate(sources, axis=1), order, axis=1),
                            np.take_along_axis(np.concatenate(values, axis=1), order[..., None], axis=1)))
        return nearest, feature_nn

    def target_scores(self, target: int, sets: np.ndarray, mix: str = "fused") -> np.ndarray:
        """(m, n_components) PCC of the target's pseudo-expression imputed from each of the
        (m, size) known `sets` (none holds the target) with its own, as per-component z-scores
        (`zmix` without its final per-component affine, which PCC ignores). `mix`: "propagated"
        (the registration kernel's transfer alone: `pair_scores`) or "fused" (the first
        rehearsal: the `MODEL_K` known spots nearest in feature space, an image-model stand-in,
        fused in with the propagated share ⅔ · reach, as `impute`'s "fixed" fusion; compared
        in `benchmarks/bench_advise.py`). All sets at once, as matrix products."""
        sets = np.asarray(sets)
        member = np.zeros((len(sets), len(self.names)))
        np.put_along_axis(member, sets, 1.0, axis=1)
        carried_all = self._carried[target]
        weight, spatial = member @ self._weight[target], member @ self._spatial[target]  # (m, n_t)
        carried = (member @ carried_all.reshape(len(self.names), -1)).reshape(len(sets), *carried_all.shape[1:])
        fallback = (member @ self._sums) / (member @ self._counts)[:, None]
        propagated = np.where(weight[..., None] > 0, carried / np.maximum(weight, 1e-300)[..., None], fallback[:, None, :])
        if mix == "propagated":
            return np.mean(zscore(propagated) * self._truth[target], axis=1)
        sources, values = self._neighbours[0][target]
        known = member[:, sources] > 0  # (m, n_t, candidates): the candidate neighbour lies in a known section
        chosen = known & (np.cumsum(known, axis=2, dtype=np.int16) <= MODEL_K)
        chosen = chosen / chosen.sum(2, keepdims=True)
        model = np.matmul(chosen.transpose(1, 0, 2), values).transpose(1, 0, 2)  # mean of the MODEL_K nearest known
        share = PROPAGATED_SHARE * (1.0 - np.exp(-spatial))[..., None]
        mixed = (1 - share) * zscore(model) + share * zscore(propagated)
        return np.mean(zscore(mixed) * self._truth[target], axis=1)

    def set_scores(self, sets, mix: str = "fused") -> np.ndarray:
        """(m, n_sections) the first rehearsal (`target_scores`: every target imputed from the
        whole known set) per section left out of each known set, NaN for its known sections."""
        sets = np.asarray(sets, int).reshape(len(sets), -1)
        out = np.full((len(sets), len(self.names)), np.nan)
        for t in range(len(self.names)):
            rows = ~(sets == t).any(1)
            if rows.any():
                out[rows, t] = self.target_scores(t, sets[rows], mix).mean(1)
        return out

    @cached_property
    def pair_scores(self) -> np.ndarray:
        """(n, n) P[k, j]: mean component PCC of target j imputed from section k alone (the
        propagated part of the rehearsal); NaN on the diagonal."""
        n = len(self.names)
        out = np.full((n, n), np.nan)
        for t in range(n):
            sources = np.array([s for s in range(n) if s != t])
            out[sources, t] = self.target_scores(t, sources[:, None], "propagated").mean(1)
        return out

    @cached_property
    def continuity(self) -> np.ndarray:
        """(n, n) how well known section k stands in for target j (module docstring): the
        stack's decay of pair scores with z distance (`decay_line`), ties broken by the pair's own."""
        return decay_line(self.pair_scores, self.z_um) + TIE_BREAK * self.pair_scores

    @cached_property
    def typical_feature_distance(self) -> float:
        """The stack's median feature-space distance from a spot to the nearest spot of any other
        section: the yardstick of "resembles" (`image_coverage`)."""
        feature_nn, n = self._neighbours[1], len(self.names)
        return float(np.median(np.concatenate([np.min([feature_nn[t, s] for s in range(n) if s != t], axis=0)
                                               for t in range(n)])))

    @cached_property
    def image_coverage(self) -> np.ndarray:
        """(n,) per section k, the share of the other sections' spots whose nearest spot of k in
        feature space is no farther than `typical_feature_distance`: how much of the stack's
        morphology section k shows."""
        feature_nn, n, typical = self._neighbours[1], len(self.names), self.typical_feature_distance
        return np.array([np.mean(np.concatenate([feature_nn[t, k] <= typical for t in range(n) if t != k]))
                         for k in range(n)])

    @cached_property
    def usable(self) -> np.ndarray:
        """(n,) sections whose image is usable: image coverage at least `RUINED_SHARE` of the
        stack's median. A ruined image (smeared, out of focus) resembles almost no spot of the
        other sections; measured alone, it leaves the image model nothing to learn from."""
        return self.image_coverage >= RUINED_SHARE * np.median(self.image_coverage)

    def with_usable_image(self, sets) -> np.ndarray:
        """(m,) whether each known set holds a section with a usable image (`usable`)."""
        return np.array([bool(self.usable[list(known)].any()) for known in sets])

    def target_values(self, sets) -> np.ndarray:
        """(m, n_sections) each section's continuity with its best known section of each set
        (NaN for the set's own sections): what the score averages."""
        return facility_values(self.continuity, sets)

    def scores(self, sets) -> np.ndarray:
        """The score of each known set (module docstring): mean `target_values` over its targets."""
        return np.nanmean(self.target_values(sets), axis=1)

    def quantities(self, known: tuple[int, ...]) -> pd.DataFrame:
        """One row per target (section not in `known`), the reasoning advice.md shows: section,
        coverage (share of its spots within one pitch, in x, y, of a known spot), z_distance_um
        and z_distance_pitches to the nearest known section, morphology (share of its spots whose
        nearest known spot in feature space is no farther than the known spots' own median
        nearest-neighbour distance), reach (mean kernel reach) and score (its continuity with its best known section)."""
        feature_nn = self._neighbours[1]
        typical = float(np.median(np.concatenate([np.min([self._self_nn(k)] + [feature_nn[k, s] for s in known
                                                                                if s != k], axis=0) for k in known])))
        scores = self.target_values([known])[0]
        rows = []
        for t in (t for t in range(len(self.names)) if t not in known):
            xy = np.min([self._xy_nn[t, s] for s in known], axis=0)
            feat = np.min([feature_nn[t, s] for s in known], axis=0)
            z = float(np.min(np.abs(self.z_um[list(known)] - self.z_um[t])))
            rows.append({"section": self.names[t], "coverage": float(np.mean(xy <= self.pitch_um)),
                         "z_distance_um": z, "z_distance_pitches": z / self.pitch_um,
                         "morphology": float(np.mean(feat <= typical)),
                         "reach": float(np.mean(1 - np.exp(-self._spatial[t][list(known)].sum(0)))),
                         "score": scores[t]})
        frame = pd.DataFrame(rows)
        return frame

    def _self_nn(self, k: int) -> np.ndarray:
        """Feature distance of each spot of section k to its nearest other spot of k."""
        e = self.embedding[k]
        return cKDTree(e).query(e, k=2)[0][:, 1] if len(e) > 1 else np.full(len(e), np.inf)


def decay_line(pairs: np.ndarray, z_um: np.ndarray) -> np.ndarray:
    """(n, n) for every pair of sections, the Theil–Sen line (median of the pairwise slopes,
    robust to the many noisy pairs) of all pair scores against z distance, its slope capped at
    0 (continuity never rises with distance), evaluated at the pair's distance; NaN on the
    diagonal. A stack with one distance only (two sections) gets its median pair score."""
    apart = np.abs(np.subtract.outer(z_um, z_um))
    off = ~np.eye(len(z_um), dtype=bool)
    x, y = apart[off], pairs[off]
    x, y = x[np.isfinite(y)], y[np.isfinite(y)]
    slope = min(float(theilslopes(y, x)[0]), 0.0) if len(np.unique(x)) > 1 else 0.0
    out = np.full(pairs.shape, np.nan)
    out[off] = np.median(y - slope * x) + slope * apart[off]
    return out


def distance_prior(pairs: np.ndarray, z_um: np.ndarray) -> np.ndarray:
    """(n, n) for every pair of sections, the median of `pairs` over all pairs as far apart in z
    (0.1 µm bins), made non-increasing with distance: the second round's decay along z (a step
    curve whose flat steps tie many sets; compared in `benchmarks/bench_advise.py`)."""
    apart = np.round(np.abs(np.subtract.outer(z_um, z_um)), 1)
    off = ~np.eye(len(z_um), dtype=bool)
    distances = np.unique(apart[off])
    typical = np.array([np.nanmedian(pairs[off & (apart == a)]) for a in distances])
    typical = np.minimum.accumulate(np.nan_to_num(typical, nan=-1.0))
    out = np.full(pairs.shape, np.nan)
    out[off] = typical[np.searchsorted(distances, apart[off])]
    return out


def facility_values(continuity: np.ndarray, sets) -> np.ndarray:
    """(m, n) for each (m, size) known set, every section's `continuity` with its best known
    section (the facility-location objective's terms), NaN for the set's own sections."""
    sets = np.asarray(sets, int).reshape(len(sets), -1)
    values = np.max(np.nan_to_num(continuity, nan=-np.inf)[sets], axis=1)
    np.put_along_axis(values, sets, np.nan, axis=1)
    return values


@dataclass
class Advice:
    """Ranked candidates (`table`: rank, known, expected_pcc (empty: see the module docstring),
    score, gap, loss, loss_low, loss_high, tie, usable_image) and their reasoning (`details[known]`: per target)."""

    table: pd.DataFrame
    details: dict[str, pd.DataFrame]
    description: StackDescription
    budget: int
    search: str


def count_free(stack: Stack) -> Stack:
    """The stack with every section stripped to image, spots and geometry (no counts),
    so nothing downstream can read expression; stored features and registered positions
    (`obsm["<encoder>_features"]`, `obsm["coords_3d"]`) are kept."""
    from stimpute.features.stored import is_stored_key

    sections = []
    for s in stack:
        obs = s.adata.obs[[c for c in ("array_row", "array_col") if c in s.adata.obs.columns]].copy()
        adata = AnnData(X=sparse.csr_matrix((s.n_spots, 0), dtype=np.float32), obs=obs)
        adata.obsm["spatial"] = s.xy
        for key in [k for k in s.adata.obsm if is_stored_key(k) or k == "coords_3d"]:
            adata.obsm[key] = s.adata.obsm[key]
        sections.append(replace(s, adata=adata, report=dict(s.report)))
    return Stack(sections, thickness_um=stack.thickness_um)


def describe_stack(stack: Stack, cache_dir: str | Path | None = None, encoder: str | None = None,
                   progress: bool = False, qc_dir: str | Path | None = None, grid=None) -> StackDescription:
    """Register the (count-free) stack and embed its spot features (see module docstring).

    `encoder`: default the features the sections carry, else handcrafted
    (`stimpute.features.stored`). H&E-only sections (image files, no spots) get virtual spots (`stimpute.register.grid`):
    the first section with spots gives the grid, else `grid` (a `GridOptions`: pitch and
    diameter, Visium's by default).

    Raises StimputeError naming the pair when adjacent sections do not register (mask
    Dice < MIN_DICE); the overlay figures to look at are written to `qc_dir` first.
    """
    from stimpute.features.stored import stack_features
    from stimpute.register import register_stack

    if len(stack) < 2:
        only = stack[0]
        raise StimputeError(only.source or only.name, "advice needs at least two sections; the stack has only this one")
    stack = count_free(stack)
    if any(s.n_spots == 0 for s in stack):
        from stimpute.register.grid import place_virtual_spots

        with_spots = [i for i, s in enumerate(stack) if s.n_spots > 0]
        registration = place_virtual_spots(stack, with_spots[:1], grid, progress=progress, default_grid=True)
    else:
        registration = register_stack(stack, progress=progress)
    _check_registration(stack, registration, qc_dir)
    features, _ = stack_features(stack, encoder, cache_dir=cache_dir, progress=progress)
    return description_of(stack, registration, features)


def description_of(stack: Stack, registration, features: list[np.ndarray]) -> StackDescription:
    """The description of a stack already registered (`register_stack`) with its spot features."""
    from stimpute.graph import spot_pitch

    ref_um = stack[0].um_per_px
    xy_um = [np.asarray(c, float) * ref_um for c in registration.coords_ref]
    pitch_um = float(np.median([spot_pitch(xy) for xy in xy_um]))
    return StackDescription(stack.names, np.array([s.z_um for s in stack], float), xy_um, embed(features),
                            pitch_um, registration.pairs)


def embed(features: list[np.ndarray], n_components: int = N_COMPONENTS) -> list[np.ndarray]:
    """Spot features of every section (scales concatenated), centred per section,
    standardised over the stack and projected on its first `n_components` principal
    components. Centring removes each slide's stain and scan shift, so that distances
    compare tissue, not slides (on HER2-ST it raises the correlation of morphological
    coverage with accuracy; see benchmarks/README.md)."""
    flat = [np.asarray(f, np.float64).reshape(len(f), -1) for f in features]
    X = np.concatenate([f - f.mean(0) for f in flat])
    X = X / np.where(X.std(0) > 1e-12, X.std(0), 1.0)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    Z = X @ vt[: min(n_components, vt.shape[0])].T
    return np.split(Z, np.cumsum([len(f) for f in flat])[:-1])


def _check_registration(stack: Stack, registration, qc_dir: str | Path | None) -> None:
    bad = registration.pairs[registration.pairs["dice_after"] < MIN_DICE]
    if bad.empty:
        return
    row = bad.iloc[0]
    where = ""
    if qc_dir is not None:
        from stimpute.io.registration import write_figures

        write_figures(stack, registration, Path(qc_dir))
        where = f"; look at {Path(qc_dir) / f'overlay_{row.fixed}_{row.moving}.png'}"
    raise StimputeError(stack[row.moving].source or row.moving,
                        f"sections {row.moving} and {row.fixed} do not register: tissue overlap Dice "
                        f"{row.dice_after:.2f} < {MIN_DICE} after alignment (wrong order, or not one block?){where}")


def load_calibration(path: str | Path = CALIBRATION_FILE) -> dict:
    """The packaged loss calibration: {"slope", "slope_low", "slope_high", "low", "high", "level",
    "source", ...} (module docstring; a file without slope_low/slope_high reads them as slope)."""
    calibration = json.loads(Path(path).read_text())
    return {"slope_low": calibration["slope"], "slope_high": calibration["slope"], **calibration}


def expected_loss(gap: np.ndarray, calibration: dict | None = None) -> dict[str, np.ndarray]:
    """The calibrated loss of mean per-gene PCC against the top of candidates whose score is
    `gap` below it: loss, loss_low, loss_high (the interval: the range of slopes stacks showed,
    plus the spread around the line) and tie (the interval reaches 0)."""
    calibration = calibration or load_calibration()
    gap = np.asarray(gap, float)
    low = calibration["slope_low"] * gap + calibration["low"]
    return {"loss": calibration["slope"] * gap, "loss_low": low,
            "loss_high": calibration["slope_high"] * gap + calibration["high"], "tie": low <= 0}


def check_budget(names: list[str], budget: int) -> None:
    """A budget must leave at least one section to impute, and the stack needs two sections."""
    if len(names) < 2:
        raise StimputeError(None, f"advice needs at least two sections; the stack has only {', '.join(names)}")
    if not 1 <= budget <= len(names) - 1:
        raise StimputeError("--budget", f"must be between 1 and {len(names) - 1} (the stack has {len(names)} sections "
                                        f"and at least one must be left to impute), got {budget}")


def advise(description: StackDescription, budget: int, max_exhaustive: int = MAX_EXHAUSTIVE,
           beam_width: int = BEAM_WIDTH) -> Advice:
    """Rank candidate known sets of `budget` sections by their score (module docstring)."""
    n = len(description.names)
    check_budget(description.names, budget)

    def score(sets: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
        """Scores of `sets`."""
        return dict(zip(sets, description.scores(sets).tolist()))

    if math.comb(n, budget) <= max_exhaustive:
        search = f"all {math.comb(n, budget)} combinations"
        scored = score(list(itertools.combinations(range(n), budget)))
    else:
        search = f"beam search (width {beam_width}) over {math.comb(n, budget)} combinations"
        scored = _beam(n, budget, score, beam_width)
    usable = dict(zip(scored, description.with_usable_image(list(scored))))
    order = sorted(scored, key=lambda known: (not usable[known], -scored[known], known))
    labels = ["+".join(description.names[i] for i in known) for known in order]
    gap = scored[order[0]] - np.array([scored[known] for known in order])
    set_apart = usable[order[0]] & ~np.array([usable[known] for known in order])  # last for their images: no loss estimate
    loss = {k: np.where(set_apart, np.nan, np.round(v, 4)) if k != "tie" else v & ~set_apart
            for k, v in expected_loss(gap).items()}
    table = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "known": labels, "expected_pcc": np.nan,
                          "score": np.round([scored[known] for known in order], 4), "gap": np.round(gap, 4), **loss,
                          "usable_image": [usable[known] for known in order]})
    details = {label: description.quantities(known) for label, known in zip(labels[:N_DETAILED], order[:N_DETAILED])}
    return Advice(table, details, description, budget, search)


def _beam(n: int, budget: int, score, width: int) -> dict[tuple[int, ...], float]:
    """Sets of `budget` sections grown one section at a time, keeping the `width` best
    at each size (sets smaller than `budget` are scored as they are)."""
    beam = {(): 0.0}
    for _ in range(budget):
        grown = sorted({tuple(sorted(known + (i,))) for known in beam for i in range(n) if i not in known})
        scored = score(grown)
        beam = dict(heapq.nlargest(width, scored.items(), key=lambda item: (item[1], [-i for i in item[0]])))
    return beam


def run_advise(sections, budget: int, out: str | Path, encoder: str | None = None, force: bool = False,
               progress: bool = False, um_per_px: float | None = None, grid=None) -> tuple[Advice, list[Path]]:
    """`stimpute advise`: read the sections (stack order), check the budget, describe the
    stack (features cached in OUT/cache, shared with `impute`; registration QC figures in
    OUT/figures when it fails), rank the candidates and write OUTPUT_NAMES into OUT."""
    from stimpute.io import read_stack
    from stimpute.files import run_ownership

    out = Path(out)
    with run_ownership(out, "advise", sections, force) as run:
        stack = read_stack(sections, um_per_px=um_per_px)
        check_budget(stack.names, budget)
        run.claim([*OUTPUT_NAMES, "figures/"], caches=["cache/"])
        description = describe_stack(stack, cache_dir=out / "cache", encoder=encoder, progress=progress,
                                     qc_dir=out / "figures", grid=grid)
        result = advise(description, budget)
        return result, write_advice(result, out)


OUTPUT_NAMES = ("advice.csv", "advice.md", "advice.png")


def write_advice(result: Advice, out: str | Path) -> list[Path]:
    """advice.csv (rank, known, expected_pcc, score, gap, loss, loss_low, loss_high, tie, usable_image), advice.md
    (the reasoning) and advice.png."""
    from stimpute.files import write_text_atomic
    from stimpute.figures import advice_figure

    out = Path(out)
    csv = write_text_atomic(out / "advice.csv", result.table.to_csv(index=False))
    figure = advice_figure(result.details, result.description.names, out / "advice.png")
    md = write_text_atomic(out / "advice.md", advice_markdown(result, figure.name))
    return [csv, md, figure]


def advice_markdown(result: Advice, figure: str, n_ranked: int = 20) -> str:
    """The reasoning a user can check: ranking with ties, how the score is made and what its
    gaps are worth, per-candidate quantities, registration QC."""
    d, table, calibration = result.description, result.table, load_calibration()
    tied = table.loc[table["tie"], "known"].tolist()
    verdict = (f"**{tied[0]}** is clearly ahead: every other candidate is expected to lose accuracy against it."
               if len(tied) == 1 else
               f"**These {len(tied)} are a tie**: {', '.join(tied[:N_TIES_NAMED])}"
               f"{f' and {len(tied) - N_TIES_NAMED} more (column tie of advice.csv)' if len(tied) > N_TIES_NAMED else ''}. "
               "Each may be as good as the top one (its expected loss interval reaches 0); choose among them on other "
               "grounds.")
    level = f"{calibration['level']:.0%}"
    lines = [
        f"# Which {result.budget} section(s) to measure", "",
        f"Stack (cutting order): {', '.join(f'{n} (z {z:g} µm)' for n, z in zip(d.names, d.z_um))}; spot pitch "
        f"{d.pitch_um:.0f} µm. Candidates: {result.search}. Computed from the H&E images and their registration "
        "only (counts, where present, are never read).", "", verdict, "",
        f"| rank | known | score | expected loss of mean per-gene PCC against the top ({level} interval) | tie |",
        "|---|---|---|---|---|",
        *[f"| {r.rank} | {r.known} | {r.score:.4f} | "
          + ("not estimated: no usable image" if pd.isna(r.loss) else f"{r.loss:.3f} ({r.loss_low:+.3f} to {r.loss_high:+.3f})")
          + f" | {'yes' if r.tie else 'no'} |" for r in table.head(n_ranked).itertuples()],
    ]
    if len(table) > n_ranked:
        lines.append(f"\n({len(table) - n_ranked} more in advice.csv)")
    ruined = [f"{name} (image coverage {c:.3f})" for name, c, ok in zip(d.names, d.image_coverage, d.usable) if not ok]
    if ruined:
        lines += ["", f"Ruined image: {', '.join(ruined)}, against the stack's median {np.median(d.image_coverage):.3f} (the "
                  "share of the other sections' spots that resemble one of its spots in feature space). Measured alone, "
                  "such a section leaves the image model nothing to learn from, so a set made only of such sections ranks "
                  "after every other (its loss is not estimated)."]
    lines += [
        "", "## What the score is, and what the numbers claim", "",
        f"Each section's *pseudo-expression* is its spots' first {N_COMPONENTS} principal components of image "
        "features. Every section (a target) is imputed from every other section alone, as `stimpute impute` "
        "propagates genes (transfer through the registration, distance and morphology kernel), and the pair's "
        "score is the PCC of the imputed with the target's own pseudo-expression. One pair is noisy, so a pair's "
        "*continuity* is read from a robust straight line (Theil–Sen) through all pairs' scores against their z "
        f"distance (the stack's decay along z, never rising with distance), the pair's own score only breaking "
        f"ties (weight {TIE_BREAK:g}). A candidate's `score` is the mean, over the sections it leaves out, of each "
        "one's continuity with its best known section (the per-section column below): the sets that leave the "
        "least z distance to a known section come first, and the pair rehearsal orders those. No coefficient of "
        "the score is fitted to any stack.", "",
        "The score ranks; it is not the gene PCC you will get (that depends on the panel and the tissue), so "
        "`expected_pcc` is left empty: no absolute calibration held on stacks it was not fitted on. What is "
        f"calibrated is the **relative** loss: a score gap g is expected to cost {calibration['slope']:.2f} × g of "
        f"mean per-gene PCC, between {calibration['slope_low']:.2f} × g {calibration['low']:+.3f} and "
        f"{calibration['slope_high']:.2f} × g {calibration['high']:+.3f} (the range of slopes seen across stacks and "
        f"the spread around the line: {level} of {calibration['source']}). How it held on stacks it was not fitted on: `benchmarks/README.md` "
        "(advisor section).", "",
        "## Per-section reasoning of the top candidates", "",
        f"![coverage, morphological coverage and score per section]({figure})", "",
    ]
    for label, frame in result.details.items():
        lines += [f"**known {label}**", "", "| target | coverage | z distance µm | morphology | reach | score |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.section} | {r.coverage:.3f} | {r.z_distance_um:g} | {r.morphology:.3f} | {r.reach:.3f} | "
                  f"{r.score:.4f} |" for r in frame.itertuples()]
        lines.append("")
    if not d.pairs.empty:
        lines += ["## Registration (adjacent pairs)", "", "| moving → fixed | tissue Dice after | stain NCC |", "|---|---|---|"]
        lines += [f"| {r.moving} → {r.fixed} | {r.dice_after:.3f} | {r.ncc_after:.3f} |" for r in d.pairs.itertuples()]
        lines.append("")
    return "\n".join(lines)
