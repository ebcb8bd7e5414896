"""Which sections to measure: rank candidate known sets from the H&E images alone.

Before paying for ST slides, a lab must choose which section(s) of the block to measure.
`advise` registers the stack and describes every spot's morphology (the same cached
features `impute` uses), never reading counts: every section is stripped to its image and
spot positions first (`count_free`). For each candidate known set of `budget` sections
and each other section (a *target*) it measures, without counts:

- coverage: the fraction of the target's spots within one spot pitch (xy, µm, after
  registration) of a spot of a known section: where imputation has measured neighbours;
- z distance: µm from the target to the nearest known section;
- morphological coverage: the share of the target's spots whose nearest known spot in
  feature space (spot features centred per section, standardised, PCA) is no farther than the known spots'
  own typical (median) nearest-neighbour distance: whether the known set shows the
  target's kinds of tissue.

A small linear model, fitted on measured stacks by `benchmarks/bench_advise.py`, turns
these into the expected mean per-gene PCC of each target; a candidate's `expected_pcc`
is the mean over its targets. All combinations are scored while there are at most
`MAX_EXHAUSTIVE`; beyond that a beam search builds sets one section at a time, keeping
the `BEAM_WIDTH` best partial sets at each size.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from stimpute.data import Stack
from stimpute.errors import StimputeError

MIN_DICE = 0.5  # tissue-mask Dice of an adjacent pair after registration below this: not registered
MAX_EXHAUSTIVE = 5000  # candidate sets scored exhaustively up to this many
BEAM_WIDTH = 32  # partial sets kept per size in the beam search beyond that
N_COMPONENTS = 10  # PCA components of the standardised spot features
N_DETAILED = 5  # candidates whose per-section reasoning advice.md spells out

# Expected per-target PCC = Σ coefficient × term, clipped to [-1, 1]; a term is a quantity
# of `StackDescription.quantities`, a product of them ("a*b"), or "intercept". Fitted by
# `python benchmarks/bench_advise.py --write-model` (least squares over one row per known
# set and target); the file records the data, the fit error and its leave-one-section-out error.
MODEL_FILE = Path(__file__).parent / "data" / "advise_model.json"
MODEL_TERMS = ("coverage", "coverage*morphology", "z_distance_pitches")


def load_model(path: str | Path = MODEL_FILE) -> dict:
    """The packaged expected-PCC model: {"terms": {term: coefficient}, "source", "rmse", "loso_rmse"}."""
    return json.loads(Path(path).read_text())


def term_values(quantities: pd.DataFrame, term: str) -> np.ndarray:
    """Values of one model term for every row of `quantities`."""
    if term == "intercept":
        return np.ones(len(quantities))
    return np.prod([quantities[name].to_numpy(float) for name in term.split("*")], axis=0)


@dataclass
class StackDescription:
    """Count-free description of a registered stack: per section its spots in µm (x, y in
    the reference frame), its depth, and its spots' standardised feature embedding."""

    names: list[str]
    z_um: np.ndarray
    xy_um: list[np.ndarray]
    embedding: list[np.ndarray]
    pitch_um: float
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # registration quality per adjacent pair

    def __post_init__(self):
        self._xy_trees = [cKDTree(xy) for xy in self.xy_um]
        self._feature_trees = [cKDTree(e) for e in self.embedding]
        n = len(self.names)
        # per ordered pair (t, s): each spot of t's nearest-spot distance to section s
        self._xy_nn = [[self._xy_trees[s].query(self.xy_um[t])[0] for s in range(n)] for t in range(n)]
        self._feature_nn = [[self._nearest(t, s) for s in range(n)] for t in range(n)]

    def _nearest(self, t: int, s: int) -> np.ndarray:
        """Feature distance of each spot of t to its nearest *other* spot of s."""
        if t != s:
            return self._feature_trees[s].query(self.embedding[t])[0]
        if len(self.embedding[t]) < 2:
            return np.full(len(self.embedding[t]), np.inf)
        return self._feature_trees[s].query(self.embedding[t], k=2)[0][:, 1]

    def quantities(self, known: tuple[int, ...]) -> pd.DataFrame:
        """One row per target (section not in `known`): section, coverage, z_distance_um,
        z_distance_pitches, morphology."""
        typical = float(np.median(np.concatenate([np.min([self._feature_nn[k][s] for s in known], axis=0) for k in known])))
        rows = []
        for t in range(len(self.names)):
            if t in known:
                continue
            xy = np.min([self._xy_nn[t][s] for s in known], axis=0)
            feat = np.min([self._feature_nn[t][s] for s in known], axis=0)
            z = float(np.min(np.abs(self.z_um[list(known)] - self.z_um[t])))
            rows.append({"section": self.names[t], "coverage": float(np.mean(xy <= self.pitch_um)),
                         "z_distance_um": z, "z_distance_pitches": z / self.pitch_um,
                         "morphology": float(np.mean(feat <= typical))})
        return pd.DataFrame(rows)


def expected_target_pcc(quantities: pd.DataFrame, model: dict) -> np.ndarray:
    """The model's expected per-gene PCC of each target row of `quantities`."""
    value = sum(coef * term_values(quantities, term) for term, coef in model["terms"].items())
    return np.clip(value, -1.0, 1.0)


@dataclass
class Advice:
    """Ranked candidates (`table`: rank, known, expected_pcc) and their reasoning
    (`details[known]`: the per-target quantities and expectations)."""

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
    from stimpute.graph import spot_pitch
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


def check_budget(names: list[str], budget: int) -> None:
    """A budget must leave at least one section to impute, and the stack needs two sections."""
    if len(names) < 2:
        raise StimputeError(None, f"advice needs at least two sections; the stack has only {', '.join(names)}")
    if not 1 <= budget <= len(names) - 1:
        raise StimputeError("--budget", f"must be between 1 and {len(names) - 1} (the stack has {len(names)} sections "
                                        f"and at least one must be left to impute), got {budget}")


def advise(description: StackDescription, budget: int, model: dict | None = None, max_exhaustive: int = MAX_EXHAUSTIVE,
           beam_width: int = BEAM_WIDTH) -> Advice:
    """Rank candidate known sets of `budget` sections by expected mean per-gene PCC."""
    model = model or load_model()
    n = len(description.names)
    check_budget(description.names, budget)

    def score(known: tuple[int, ...]) -> float:
        return float(np.mean(expected_target_pcc(description.quantities(known), model)))

    if math.comb(n, budget) <= max_exhaustive:
        search = f"all {math.comb(n, budget)} combinations"
        scored = {known: score(known) for known in itertools.combinations(range(n), budget)}
    else:
        search = f"beam search (width {beam_width}) over {math.comb(n, budget)} combinations"
        scored = _beam(n, budget, score, beam_width)
    order = sorted(scored, key=lambda known: (-scored[known], known))
    labels = ["+".join(description.names[i] for i in known) for known in order]
    table = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "known": labels,
                          "expected_pcc": [round(scored[known], 4) for known in order]})
    details = {}
    for label, known in zip(labels[:N_DETAILED], order[:N_DETAILED]):
        frame = description.quantities(known)
        frame["expected_pcc"] = expected_target_pcc(frame, model)
        details[label] = frame
    return Advice(table, details, description, budget, search)


def _beam(n: int, budget: int, score, width: int) -> dict[tuple[int, ...], float]:
    """Sets of `budget` sections grown one section at a time, keeping the `width` best
    at each size (sets smaller than `budget` are scored as they are)."""
    beam = {(): 0.0}
    for _ in range(budget):
        grown = {tuple(sorted(known + (i,))) for known in beam for i in range(n) if i not in known}
        scored = {known: score(known) for known in grown}
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
    """advice.csv (rank, known, expected_pcc), advice.md (the reasoning) and advice.png."""
    from stimpute.files import write_text_atomic
    from stimpute.figures import advice_figure

    out = Path(out)
    csv = write_text_atomic(out / "advice.csv", result.table.to_csv(index=False))
    figure = advice_figure(result.details, result.description.names, out / "advice.png")
    md = write_text_atomic(out / "advice.md", advice_markdown(result, figure.name))
    return [csv, md, figure]


def advice_markdown(result: Advice, figure: str, model: dict | None = None, n_ranked: int = 20) -> str:
    """The reasoning a user can check: ranking, the model, per-candidate quantities, registration QC."""
    model = model or load_model()
    d = result.description
    formula = " ".join(f"{c:+.4f} × {t}" for t, c in model["terms"].items())
    lines = [
        f"# Which {result.budget} section(s) to measure", "",
        f"Stack (cutting order): {', '.join(f'{n} (z {z:g} µm)' for n, z in zip(d.names, d.z_um))}; spot pitch "
        f"{d.pitch_um:.0f} µm. Candidates: {result.search}, ranked by `expected_pcc`, the expected mean per-gene "
        "PCC of the sections left to impute. Computed from the H&E images and their registration only "
        "(counts, where present, are never read).", "",
        "| rank | known | expected_pcc |", "|---|---|---|",
        *[f"| {r.rank} | {r.known} | {r.expected_pcc:.4f} |" for r in result.table.head(n_ranked).itertuples()],
    ]
    if len(result.table) > n_ranked:
        lines.append(f"\n({len(result.table) - n_ranked} more in advice.csv)")
    lines += [
        "", "## How `expected_pcc` is computed", "",
        "For each section left to impute (a target):",
        "- **coverage**: fraction of its spots within one spot pitch (in x, y after registration) of a spot of a known section;",
        "- **z distance**: µm to the nearest known section (`z_distance_pitches`: the same in spot pitches);",
        "- **morphology**: share of its spots whose nearest known spot in image-feature space (per-section centred, "
        "standardised, PCA) is no farther than the known spots' own median nearest-neighbour distance.", "",
        f"Expected per-target PCC = {formula} (clipped to [-1, 1]); a candidate's `expected_pcc` is the mean over its "
        f"targets. Fitted on {model['source']}: RMSE {model['rmse']} in sample, {model['loso_rmse']} leave-one-section-out, "
        f"over {model['n_rows']} (known set, target) rows (`benchmarks/bench_advise.py`).", "",
        "## Per-section reasoning of the top candidates", "",
        f"![coverage and morphological coverage per section]({figure})", "",
    ]
    for label, frame in result.details.items():
        lines += [f"**known {label}**", "", "| target | coverage | z distance µm | morphology | expected PCC |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.section} | {r.coverage:.3f} | {r.z_distance_um:g} | {r.morphology:.3f} | {r.expected_pcc:.4f} |"
                  for r in frame.itertuples()]
        lines.append("")
    if not d.pairs.empty:
        lines += ["## Registration (adjacent pairs)", "", "| moving → fixed | tissue Dice after | stain NCC |", "|---|---|---|"]
        lines += [f"| {r.moving} → {r.fixed} | {r.dice_after:.3f} | {r.ncc_after:.3f} |" for r in d.pairs.itertuples()]
        lines.append("")
    return "\n".join(lines)
