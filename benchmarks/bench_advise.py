"""Does `stimpute advise` pick the right sections on stacks it has never seen (issue 29)?

Stacks with known truth: `N_SYNTHETIC` synthetic stacks (`stimpute.datasets.synthetic_stack`,
each drawn from its seed by `synthetic_case`: 5-12 sections, 3-6 tissue programmes,
patch size, drift along z, ruined section images, torn-off tissue), every budget 1-3
(every candidate set, up to `MAX_SETS` = 220: all of them on these stacks); and HER2-ST
C2/C3/C4, budgets 1 and 2 (budget 2: each section left out in turn). Every candidate known set is imputed for real and
scored on the sections left out; per stack and budget the advisor and the rival picks are
compared with the best set:

- **actual**: mean per-gene PCC over the targets (the other sections) of the stand-in
  imputation: `impute_stack` with the kernel ridge as the only image model (no MSAGNet,
  which adds <= 0.002 PCC per benchmarks/README.md, and minutes per split). `--check-full SEEDS`
  imputes every single-section set of those synthetic stacks with the full pipeline
  (MSAGNet + kernel ridge) too and reports how the two rank sets alike.
- **advisor**: `stimpute.advise` (facility location over the pairs' image continuity,
  nothing fitted) and its ablations (`rule_scores`): without the z prior, without making
  pairs symmetric, with the issue's image-quality idea added (`untrustworthy`), the
  first rehearsal of issue 29 (whole known set, image-model stand-in fused in) and its
  propagated part alone, and the fourth round's: the sets equal on the advisor's z line
  ordered by interpolation (`far_side`), by the first rehearsal, or by a cross-family image
  model's reach (`cross_family`), and `kriging` over the line; the fifth round's: the advisor without
  setting ruined images apart (the third round's score) and the soft facility over the line;
- **old model**: the issue-19 linear model (coverage, morphology, z distance; coefficients
  fitted on HER2-ST, `benchmarks/advise_old_model.json`);
- **middle section** (the `budget` sections around the middle) and **evenly spaced**
  (section ⌊(i + ½)·n/budget⌋);
- beside them, reading the counts: the **noise floor** (the best set by a second draw of the
  counts, `--draw`) and the **pair-level ceiling** (`--singles`: every single section imputed,
  each target's accuracy kept: what facility location, the advisor's kind of score, picks
  when its pair table is the true one in gene space), and which set-level form of that true table
  (`ORACLE_FORMS`, `ORACLE_SET_TERMS`) predicts the sets' actuals best.

Reported per rule: Spearman's rho of its scores with the actual over the candidate sets
(rules with one pick have none), regret (best actual minus the pick's actual; >= 0) and the
share of (stack, budget) cases with regret <= 0.01, on all synthetic stacks, on the even
seeds (the development half, where the score's variants were chosen) and on the odd seeds
(held out). The advisor's relative calibration (`src/stimpute/data/advise_calibration.json`,
`--write-calibration`) is fitted on the even seeds and checked on the odd seeds and on HER2-ST.

Run: `python benchmarks/bench_advise.py [--out bench-advise] [--synthetic 20] [--check-full SEEDS] [--measure SEEDS]
[--draw 1] [--singles SEEDS]`
(~2.6 CPU h: ~2,650 imputations; per-stack results are kept in OUT/cases/ and reused; `--measure` fills
them for some stacks only, so that several processes can share the work). Writes
OUT/bench_advise.csv (one row per stack, budget, candidate), OUT/bench_advise.md and the
table between the `bench_advise` markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
HER2ST = ("C2", "C3", "C4")
BUDGETS = (1, 2, 3)
N_SYNTHETIC = 20
TOLERANCE = 0.01  # regret counted as "right"
MAX_SETS = 220  # a (stack, budget) with more candidate sets than this is left out (none of the 12-section stacks)
OLD_MODEL = ROOT / "benchmarks" / "advise_old_model.json"
CALIBRATION = ROOT / "src" / "stimpute" / "data" / "advise_calibration.json"
DEV = [f"synthetic {seed:02d}" for seed in range(0, 100, 2)]  # the development half: even seeds
MARKERS = ("<!-- bench_advise:start -->", "<!-- bench_advise:end -->")
SCORED = ("advisor", "z decay by median (round 2)", "pairs ¼ + z prior ¾", "pairs ¼ + z prior ¾, image-quality aware", "pairs ½ + z prior ½",
          "pairs alone", "first rehearsal", "first rehearsal, propagated part", "line, ties by interpolation",
          "line, ties by set rehearsal", "line, ties by cross-family ridge", "kriging over the line",
          "advisor, ruined images not set apart (round 3)", "soft facility ¼ over the line")
FLOOR = "second draw's best (noise floor)"
CEILING = "gene-space pairs (pair-level ceiling)"
RULES = (*SCORED, "old model", "middle section", "evenly spaced", FLOOR, CEILING)
BEYOND = (FLOOR, CEILING)  # rules that read the counts: reported beside the others, never in their tables
SECOND_DRAW = 1  # the count seed and stand-in seed of the second draw (`--draw`), read from OUT/draw1/
QUALITY_RATIO = 0.65  # the "image-quality aware" ablation's threshold (chosen on the even seeds)
FAMILIES = {"colour": slice(0, 18), "nuclei": slice(18, 44), "texture": slice(44, 67)}  # handcrafted descriptor blocks
RIDGE_ALPHA = 0.1  # ridge penalty per spot of the cross-family ablation (standardised descriptors)
# Set-level forms over the true single-section table (`--singles`: g, the targets' accuracies from each known
# section; dz, their z distances in z steps; bracketed, a known section on each side): what a set's actual is,
# given the pairs (fifth round; each parameter the best of a few on the even seeds' budgets 2-3).
ORACLE_FORMS = {
    "max (facility location: the pair-level ceiling)": lambda g, dz, bracketed: g.max(),
    "soft-max (τ 0.01)": lambda g, dz, bracketed: 0.01 * np.log(np.exp((g - g.max()) / 0.01).sum()) + g.max(),
    "max + 0.1 × second": lambda g, dz, bracketed: g.max() + (0.1 * np.sort(g)[-2] if len(g) > 1 else 0.0),
    "soft facility: max + ¼ × second × (1 − max)": lambda g, dz, bracketed: soft_facility(g, 0.25),
    "noisy-or: 1 − ∏(1 − g)": lambda g, dz, bracketed: 1 - np.prod(1 - np.clip(g, 0, 1)),
    "max + 0.005 if bracketed": lambda g, dz, bracketed: g.max() + 0.005 * bracketed,
    "kernel mix: mean weighted exp(−(dz / ½)²)": lambda g, dz, bracketed: kernel_mix(g, dz, 0.5),
    "¼ kernel mix (2 steps) + ¾ max": lambda g, dz, bracketed: 0.25 * kernel_mix(g, dz, 2.0) + 0.75 * g.max(),
}
ORACLE_SET_TERMS = {  # a whole-set term added to a form: the image model learns from every known spot
    "max + 0.0025 × log(known spots)": ("max (facility location: the pair-level ceiling)", 0.0025, "spots"),
    "soft facility ¼ + 0.005 × morphological coverage of the set": (
        "soft facility: max + ¼ × second × (1 − max)", 0.005, "coverage"),
}


def synthetic_case(seed: int) -> dict:
    """The generator settings of synthetic stack `seed` (drawn from the seed, nothing chosen by hand)."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(5, 13))
    damaged = sorted(int(i) for i in rng.choice(n, size=rng.integers(0, 3), replace=False))
    torn = rng.choice(n, size=rng.integers(0, min(4, n - 1)), replace=False)
    missing = {int(i): (float(rng.uniform(0, 360)), float(rng.uniform(0.15, 0.35))) for i in torn}
    return dict(n_sections=n, seed=seed, n_programmes=int(rng.integers(3, 7)),
                structure_um=float(rng.uniform(150, 400)), z_sigma_sections=float(rng.uniform(0.7, 4.0)),
                damaged=damaged, missing=missing, tissue_radius_um=500.0, image_size=1200)


def old_scores(description, sets) -> dict[tuple, float]:
    """The issue-19 model's expected PCC of each set (mean over its targets)."""
    model = json.loads(OLD_MODEL.read_text())
    out = {}
    for known in sets:
        q = description.quantities(known)
        value = sum(c * np.prod([q[name].to_numpy(float) for name in term.split("*")], axis=0)
                    for term, c in model["terms"].items())
        out[known] = float(np.mean(np.clip(value, -1, 1)))
    return out


def spaced(n: int, budget: int, middle: bool) -> tuple[int, ...]:
    """The rival picks: `budget` adjacent sections around the middle, or evenly spaced ones
    (section ⌊(i + ½)·n / budget⌋); with one section both are section ⌊n / 2⌋."""
    if middle:
        first = (n - budget + 1) // 2
        return tuple(range(first, first + budget))
    return tuple(int((i + 0.5) * n / budget) for i in range(budget))


def target_accuracies(prepared, known: tuple[int, ...], full: bool = False, seed: int = 0) -> dict[int, float]:
    """Per target (section index): mean per-gene PCC of the stand-in imputation (or the full
    pipeline), its random parts (held-out spots, subsets, programmes) drawn from `seed`."""
    from stimpute.metrics import pearson_columns
    from stimpute.models.asign import impute_stack
    from stimpute.prepare import with_known_panel

    split = with_known_panel(prepared, list(known))
    result = impute_stack(split, list(known), seed=seed,
                          members=("msagnet_3d", "kernel_ridge") if full else ("kernel_ridge",))
    return {t: float(np.nan_to_num(pearson_columns(result.fused[t], split.expression[t])).mean()) for t in result.fused}


def actual_accuracy(prepared, known: tuple[int, ...], full: bool = False, seed: int = 0) -> float:
    """Mean per-gene PCC over the targets (`target_accuracies`): what a candidate set is worth."""
    return float(np.mean(list(target_accuracies(prepared, known, full, seed).values())))


def measure_singles(stack, cache: Path, path: Path) -> None:
    """Every section alone as the known set (true registration, the stand-in, seed 0): each
    target's own accuracy, written to PATH (known, target, pcc): the gene-space pair table
    `gene_pairs` reads."""
    from stimpute.datasets import synthetic_registration
    from stimpute.files import write_text_atomic
    from stimpute.prepare import prepare_stack

    prepared = prepare_stack(stack, known=[stack.names[0]], registration=synthetic_registration(stack), cache_dir=cache)
    rows = [{"known": stack.names[k], "target": stack.names[t], "pcc": pcc}
            for k in range(len(stack)) for t, pcc in target_accuracies(prepared, (k,)).items()]
    write_text_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def source_order_agreement(truth: np.ndarray, table: np.ndarray) -> float:
    """Mean over targets (columns) of the Spearman rho between two pair tables' values of its sources."""
    off = ~np.eye(len(truth), dtype=bool)
    return float(np.nanmean([spearmanr(truth[off[:, t], t], table[off[:, t], t]).statistic for t in range(len(truth))]))


def gene_pairs(path: Path, names: list[str]) -> np.ndarray:
    """(n, n) G[k, t]: target t's accuracy with section k alone known (`measure_singles`), NaN on the diagonal."""
    index = {name: i for i, name in enumerate(names)}
    G = np.full((len(names), len(names)), np.nan)
    for row in pd.read_csv(path).itertuples():
        G[index[row.known], index[row.target]] = row.pcc
    return G


def soft_facility(g: np.ndarray, w: float) -> float:
    """A target's best source plus `w` × its second-best × what the best leaves (1 − best)."""
    top = np.sort(g)[::-1]
    return float(top[0] + w * max(top[1], 0.0) * (1 - top[0])) if len(g) > 1 else float(top[0])


def kernel_mix(g: np.ndarray, dz: np.ndarray, width: float) -> float:
    """The targets' accuracies from its known sections averaged with weights exp(−(dz / width)²), dz in z
    steps: the propagation mixes every known section, near ones most."""
    w = np.exp(-(dz / width) ** 2)
    return float(w @ g / w.sum())


def oracle_scores(G: np.ndarray, description, sets) -> dict[str, np.ndarray]:
    """Each set-level form (`ORACLE_FORMS`, `ORACLE_SET_TERMS`) of every set over the true single-section table
    G: the mean over the set's targets of the form, plus a whole-set term (log of the known spots; the share of
    the target spots whose nearest known spot in feature space is within `StackDescription.typical_feature_distance`)."""
    z = description.z_um
    step = float(np.median(np.diff(np.sort(z))))
    spots = np.array([len(xy) for xy in description.xy_um])
    feature_nn, n, typical = description._neighbours[1], len(z), description.typical_feature_distance
    out = {form: [] for form in ORACLE_FORMS}
    terms = {"spots": [], "coverage": []}
    for known in sets:
        K = list(known)
        targets = [t for t in range(n) if t not in known]
        for form, f in ORACLE_FORMS.items():
            out[form].append(np.mean([f(G[K, t], np.abs(z[K] - z[t]) / step, bool((z[K] < z[t]).any() and (z[K] > z[t]).any()))
                                      for t in targets]))
        terms["spots"].append(np.log(spots[K].sum()))
        terms["coverage"].append(np.mean(np.concatenate([np.min([feature_nn[t, k] for k in K], axis=0) <= typical
                                                         for t in targets])))
    out = {form: np.array(v) for form, v in out.items()}
    for name, (form, weight, term) in ORACLE_SET_TERMS.items():
        out[name] = out[form] + weight * np.array(terms[term])
    return out


def oracle_table(frame: pd.DataFrame) -> list[str]:
    """Mean regret / share ≤ 0.01 of each set-level form's pick (the set it scores highest), per budget and, on
    budgets 2-3 (where the forms differ), per half."""
    columns = [c for c in frame if c.startswith("oracle: ")]
    if not columns:
        return []
    rows = []
    for (stack, budget), g in frame.dropna(subset=columns).groupby(["stack", "budget"], sort=False):
        for c in columns:
            rows.append({"stack": stack, "budget": budget, "form": c[len("oracle: "):],
                         "regret": g["actual"].max() - g["actual"].iloc[int(np.argmax(g[c].to_numpy()))]})
    r = pd.DataFrame(rows)
    r["dev"] = r["stack"].isin(DEV)

    def cell(x: pd.Series) -> str:
        return f"{x.mean():.4f} / {np.mean(x <= TOLERANCE):.0%}"

    lines = [f"**Set-level forms over the true single-section table** ({r['stack'].nunique()} stacks, `--singles`; an "
             "oracle: it reads G, each target's actual accuracy with each single known section, and asks which function "
             "of G predicts the set's actual; each form's parameter the best of a few on the even seeds' budgets 2-3). "
             "Mean regret / share ≤ 0.01:", "",
             "| form | budget 1 | budget 2 | budget 3 | budgets 2-3, even seeds | budgets 2-3, odd seeds | budgets 2-3 |",
             "|---|---|---|---|---|---|---|"]
    for form, g in r.groupby("form", sort=False):
        multi = g[g["budget"] > 1]
        cells = [cell(g.loc[g["budget"] == b, "regret"]) for b in BUDGETS]
        cells += [cell(multi.loc[multi["dev"], "regret"]), cell(multi.loc[~multi["dev"], "regret"]), cell(multi["regret"])]
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return lines + [""]


def measure_stack(stack, cache: Path, path: Path, budgets, full_budgets=(), synthetic: bool = True,
                  seed: int = 0) -> None:
    """Register the stack (synthetic: the true registration) and compute its features
    (count-free, as `stimpute advise` does), then impute every candidate set of each budget
    (at most `MAX_SETS` sets) for its actual accuracy (the stand-in, seeded with `seed`; the
    full pipeline too for `full_budgets`). Writes PATH.npz (what the advisor reads: names, z,
    registered spots in µm, features) and PATH.csv (budget, known, actual, ...); budgets
    already in PATH.csv are kept, not measured again."""
    from stimpute.advise import count_free, description_of
    from stimpute.datasets import synthetic_registration
    from stimpute.files import write_text_atomic
    from stimpute.features.stored import stack_features
    from stimpute.prepare import prepare_stack
    from stimpute.register import register_stack

    start = time.perf_counter()
    registration = synthetic_registration(stack) if synthetic else register_stack(count_free(stack))
    features, _ = stack_features(count_free(stack), None, cache_dir=cache)
    described = time.perf_counter() - start
    d = description_of(stack, registration, features)
    np.savez(path.with_suffix(".npz"), names=np.array(d.names), z_um=d.z_um, pitch_um=d.pitch_um,
             seconds=described, **{f"xy{i}": xy for i, xy in enumerate(d.xy_um)},
             **{f"features{i}": np.asarray(f, np.float32) for i, f in enumerate(features)})
    prepared = prepare_stack(stack, known=[stack.names[0]], registration=registration, cache_dir=cache)
    rows = pd.read_csv(path.with_suffix(".csv")).to_dict("records") if path.with_suffix(".csv").is_file() else []
    done = {b for b, k in pd.Series([row["budget"] for row in rows], dtype=int).value_counts().items()
            if k == math.comb(len(stack), b)}
    rows = [row for row in rows if row["budget"] in done]
    for budget in (b for b in budgets if math.comb(len(stack), b) <= MAX_SETS and b not in done):
        for known in itertools.combinations(range(len(stack)), budget):
            row = {"budget": budget, "known": "+".join(stack.names[i] for i in known),
                   "actual": actual_accuracy(prepared, known, seed=seed)}
            if budget in full_budgets:
                row["actual_full"] = actual_accuracy(prepared, known, full=True)
            rows.append(row)
        write_text_atomic(path.with_suffix(".csv"), pd.DataFrame(rows).to_csv(index=False))  # kept if cut short


def load_description(path: Path):
    """The advisor's description of a measured stack (`measure_stack`'s PATH.npz) and the
    seconds its registration and features took."""
    from stimpute.advise import StackDescription, embed

    z = np.load(path.with_suffix(".npz"))
    n = len(z["names"])
    return (StackDescription([str(x) for x in z["names"]], z["z_um"], [z[f"xy{i}"] for i in range(n)],
                             embed([z[f"features{i}"] for i in range(n)]), float(z["pitch_um"])), float(z["seconds"]))


def untrustworthy(pairs: np.ndarray, ratio: float = QUALITY_RATIO) -> np.ndarray:
    """Sections whose image continuity with their neighbours breaks the stack's decay: the mean
    symmetric pair score with the adjacent sections below `ratio` × that of the pair across
    them (an end section: of its neighbour with the next one). The "image-quality aware"
    ablation's test for a ruined image."""
    P, n = 0.5 * (pairs + pairs.T), len(pairs)
    out = np.zeros(n, bool)
    for i in range(n) if n >= 3 else ():
        if 0 < i < n - 1:
            out[i] = 0.5 * (P[i - 1, i] + P[i, i + 1]) < ratio * P[i - 1, i + 1]
        else:
            j = 1 if i == 0 else n - 2
            out[i] = P[i, j] < ratio * P[j, 2 * j - i]
    return out


def lexicographic(*keys) -> np.ndarray:
    """Ranks of the sets by the first key, sets equal on it (to 9 decimals) ordered by the next ones."""
    order = np.lexsort([np.round(np.asarray(k, float), 9) for k in keys[::-1]])
    ranks = np.empty(len(order))
    ranks[order] = np.arange(len(order))
    return ranks


def far_side(description, sets) -> np.ndarray:
    """Minus the mean, over each set's targets, of the z distance to the nearer known section on
    the target's other side (a target known from one side only: twice the stack's depth). High
    when the targets lie between known sections (interpolated, not extrapolated)."""
    z = description.z_um
    out = []
    for known in sets:
        kz = z[list(known)]
        far = [max(np.min(np.abs(kz[kz < z[t]] - z[t]), initial=np.inf), np.min(np.abs(kz[kz > z[t]] - z[t]), initial=np.inf))
               for t in range(len(z)) if t not in known]
        out.append(-np.mean(np.minimum(far, 2 * np.ptp(z))))
    return np.array(out)


def kriging(continuity: np.ndarray, sets) -> np.ndarray:
    """The mean, over each set's targets, of the share of the target's variance that the best
    linear predictor from the known sections explains, the continuity as their covariance (1 on
    the diagonal): two known sections around a target count more than one, adjacent known
    sections are partly redundant."""
    C = np.clip(np.nan_to_num(continuity, nan=1.0), 1e-6, None)
    out = []
    for known in sets:
        targets = [t for t in range(len(C)) if t not in known]
        R, r = C[np.ix_(known, known)].copy(), C[np.ix_(known, targets)]
        np.fill_diagonal(R, 1.0)
        out.append(np.mean(np.clip(np.sum(r * np.linalg.lstsq(R, r, rcond=None)[0], axis=0), 0, 1)))
    return np.array(out)


def cross_family(features: list[np.ndarray], sets, n_components: int = 5) -> np.ndarray:
    """How well an image model trained on each set's spots carries to its targets: a ridge from
    the colour and texture descriptors to the nuclei descriptors' first `n_components` principal
    components, trained on the known sections' spots, its mean component PCC on each target,
    averaged over the targets (descriptors centred per section, standardised over the stack)."""
    from stimpute.combine import zscore

    def family(cut: slice) -> list[np.ndarray]:
        X = [f[:, :, cut].reshape(len(f), -1) - f[:, :, cut].reshape(len(f), -1).mean(0) for f in features]
        sd = np.concatenate(X).std(0)
        return [x / np.where(sd > 1e-12, sd, 1.0) for x in X]

    nuclei = family(FAMILIES["nuclei"])
    axes = np.linalg.svd(np.concatenate(nuclei), full_matrices=False)[2][:n_components].T
    Y = [x @ axes for x in nuclei]
    X = [np.c_[a, b] for a, b in zip(family(FAMILIES["colour"]), family(FAMILIES["texture"]))]
    out = []
    for known in sets:
        Xk, Yk = np.concatenate([X[k] for k in known]), np.concatenate([Y[k] for k in known])
        W = np.linalg.solve(Xk.T @ Xk + RIDGE_ALPHA * len(Xk) * np.eye(Xk.shape[1]), Xk.T @ Yk)
        out.append(np.mean([np.mean(zscore(X[t] @ W) * zscore(Y[t])) for t in range(len(X)) if t not in known]))
    return np.array(out)


def rule_scores(description, sets: list[tuple[int, ...]], features: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each scored rule's score of every set: the advisor and its ablations (facility location
    over symmetric pair scores blended with the z prior, with the issue's image-quality idea
    added, or over the pairs alone), the first rehearsal, and the fourth round's: the sets
    equal on the advisor's line ordered by interpolation (`far_side`), by the first rehearsal
    of the whole set or by an image model's reach (`cross_family`), and `kriging`."""
    from stimpute.advise import TIE_BREAK, decay_line, distance_prior, facility_values

    P = description.pair_scores
    sym = 0.5 * (P + P.T)
    prior = distance_prior(sym, description.z_um)
    quality = 0.25 * sym + 0.75 * prior
    bad = untrustworthy(P)
    quality[bad] = prior[bad]  # a ruined section's worth as a source: from its z distance alone
    matrices = {"pairs ¼ + z prior ¾": 0.25 * sym + 0.75 * prior, "pairs ¼ + z prior ¾, image-quality aware": quality,
                "pairs ½ + z prior ½": 0.5 * sym + 0.5 * prior, "pairs alone": sym}
    line = decay_line(P, description.z_um)
    on_line = np.nanmean(facility_values(line, sets), axis=1)
    out = {"advisor": description.scores(sets),
           "z decay by median (round 2)": np.nanmean(facility_values(distance_prior(P, description.z_um)
                                                                     + TIE_BREAK * P, sets), axis=1)}
    out.update({rule: np.nanmean(facility_values(m, sets), axis=1) for rule, m in matrices.items()})
    out["first rehearsal"] = np.nanmean(description.set_scores(sets), axis=1)
    out["first rehearsal, propagated part"] = np.nanmean(description.set_scores(sets, "propagated"), axis=1)
    out["line, ties by interpolation"] = lexicographic(on_line, far_side(description, sets), out["advisor"])
    out["line, ties by set rehearsal"] = lexicographic(on_line, out["first rehearsal"])
    out["line, ties by cross-family ridge"] = lexicographic(on_line, cross_family(features, sets))
    out["kriging over the line"] = kriging(line, sets) + TIE_BREAK * out["advisor"]
    out["advisor, ruined images not set apart (round 3)"] = out["advisor"]
    C = description.continuity
    out["soft facility ¼ over the line"] = np.array([np.mean([soft_facility(C[list(known), t], 0.25)
                                                              for t in range(len(C)) if t not in known]) for known in sets])
    out["advisor"] = lexicographic(description.with_usable_image(sets), out["advisor"])  # as `advise` orders them
    return out


def picks(description, budget: int, features: list[np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every rule's pick over all candidate sets of `budget` sections."""
    n = len(description.names)
    sets = list(itertools.combinations(range(n), budget))
    out = {rule: sets[int(np.argmax(v))] for rule, v in rule_scores(description, sets, features).items()}
    old = old_scores(description, sets)
    out["old model"] = max(sets, key=lambda k: (old[k], [-i for i in k]))
    out["middle section"], out["evenly spaced"] = spaced(n, budget, True), spaced(n, budget, False)
    return out


def score_stack(path: Path, label: str, second: Path | None = None, singles: Path | None = None) -> pd.DataFrame:
    """One row per (budget, candidate set): actual, every rule's score (NaN for the rules with one pick), the
    advisor's tie and gap, `pick_<rule>` (the set the rule picks over all candidates), and the
    advisor's seconds beyond registration and features. With `second` (the same stack's
    `--draw` csv), where it holds every set of a budget: `actual_second` and the noise floor's
    pick (`FLOOR`: the best set by the second draw). With `singles` (`measure_singles`): the
    pick of facility location over the gene-space pair table (`CEILING`: what the advisor's kind
    of score picks when its pair table is the true one)."""
    from stimpute.advise import StackDescription, advise, facility_values

    frame = pd.read_csv(path.with_suffix(".csv"))
    if second is not None and second.is_file():
        frame = frame.merge(pd.read_csv(second).rename(columns={"actual": "actual_second"})[
            ["budget", "known", "actual_second"]], on=["budget", "known"], how="left")
    description, described = load_description(path)
    stored = np.load(path.with_suffix(".npz"))
    features = [stored[f"features{i}"].astype(np.float64) for i in range(len(description.names))]
    index = {name: i for i, name in enumerate(description.names)}
    out = []
    for budget, group in frame.groupby("budget"):
        start = time.perf_counter()
        fresh = StackDescription(description.names, description.z_um, description.xy_um, description.embedding,
                                 description.pitch_um)  # the pair tables count in the advisor's time
        advice = advise(fresh, int(budget)).table.set_index("known")
        seconds = time.perf_counter() - start
        sets = [tuple(index[k] for k in known.split("+")) for known in group["known"]]
        old = old_scores(description, sets)
        group = group.assign(stack=label, n_sections=len(description.names),
                             tie=advice.loc[group["known"], "tie"].to_numpy(),
                             gap=advice.loc[group["known"], "gap"].to_numpy(),
                             advisor_score=advice.loc[group["known"], "score"].to_numpy(),
                             usable_image=advice.loc[group["known"], "usable_image"].to_numpy(),
                             seconds_advise=seconds, seconds_register_features=described)
        for rule, values in rule_scores(description, sets, features).items():
            group[rule] = values
        group["old model"] = [old[k] for k in sets]
        for rule, known in picks(description, int(budget), features).items():
            group[f"pick_{rule}"] = "+".join(description.names[i] for i in known)
        group["pick_advisor"] = advice.index[0]  # `advise`'s own first (its order on exact ties)
        if "actual_second" in group and group["actual_second"].notna().all():
            group[f"pick_{FLOOR}"] = group.loc[group["actual_second"].idxmax(), "known"]
        if singles is not None and singles.is_file():
            G = gene_pairs(singles, description.names)
            group[CEILING] = np.nanmean(facility_values(G, sets), axis=1)
            group[f"pick_{CEILING}"] = group.loc[group[CEILING].idxmax(), "known"]
            group["order_by_z"] = source_order_agreement(G, -np.abs(np.subtract.outer(description.z_um, description.z_um)))
            group["order_by_pairs"] = source_order_agreement(G, description.pair_scores)
            for form, values in oracle_scores(G, description, sets).items():
                group[f"oracle: {form}"] = values
        out.append(group)
    return pd.concat(out, ignore_index=True)


def cases(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (stack, budget) and rule: rho with the actual over the candidate sets, the pick, its
    regret against the best set."""
    out = []
    for (stack, budget), group in frame.groupby(["stack", "budget"], sort=False):
        group = group.reset_index(drop=True)
        actual = group.set_index("known")["actual"]
        for rule in (r for r in RULES if f"pick_{r}" in group and group[f"pick_{r}"].notna().all()):
            pick = group[f"pick_{rule}"].iloc[0]
            scores = group["actual_second"] if rule == FLOOR else group.get(rule)
            rho = (spearmanr(scores, group["actual"]).statistic
                   if scores is not None and scores.notna().all() and len(group) > 2 else np.nan)
            out.append({"stack": stack, "budget": budget, "n_sets": len(group),
                        "rule": rule, "pick": pick, "rho": rho, "regret": actual.max() - actual[pick]})
    return pd.DataFrame(out)


def calibration_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (stack, budget) and candidate other than the advisor's top: its score gap to the
    top and its actual loss against the top (mean per-gene PCC; negative: it did better);
    the sets `advise` ranks last for their ruined images (no loss estimated) left out."""
    rows = []
    for (stack, budget), case in frame.groupby(["stack", "budget"], sort=False):
        top = case.loc[(case["known"] == case["pick_advisor"]).idxmax()]
        rest = case.drop(index=top.name)
        rest = rest[rest["usable_image"] | ~top["usable_image"]]
        rows.append(pd.DataFrame({"stack": stack, "budget": budget, "gap": top["advisor_score"] - rest["advisor_score"],
                                  "loss": top["actual"] - rest["actual"]}))
    return pd.concat(rows, ignore_index=True)


def fit_calibration(pairs: pd.DataFrame, source: str, level: float = 0.9) -> dict:
    """loss ≈ slope × gap (least squares through 0 over all pairs), the central `level` range of
    the slopes fitted per (stack, budget) (a stack's images can decay faster or slower than its
    genes: the slope does not carry from one stack to the next) and the central `level`
    interval of the residuals around the pooled line: the relative calibration `stimpute.advise` ships."""
    def through_zero(p: pd.DataFrame) -> float:
        return float((p["gap"] * p["loss"]).sum() / max((p["gap"] ** 2).sum(), 1e-12))

    slope = through_zero(pairs)
    per_case = pairs.groupby(["stack", "budget"]).apply(through_zero, include_groups=False)
    residual = pairs["loss"] - slope * pairs["gap"]
    low, high = np.quantile(residual, [(1 - level) / 2, (1 + level) / 2])
    slope_low, slope_high = np.quantile(per_case, [(1 - level) / 2, (1 + level) / 2])
    return {"slope": round(slope, 4), "slope_low": round(float(slope_low), 4), "slope_high": round(float(slope_high), 4),
            "low": round(float(low), 4), "high": round(float(high), 4), "level": level, "source": source,
            "n_pairs": len(pairs), "n_cases": len(per_case)}


def calibration_check(pairs: pd.DataFrame, calibration: dict) -> str:
    """Share of (candidate, top) pairs whose actual loss lies in the interval, and how often
    a candidate called a tie really is within 0.01 of the top or better."""
    from stimpute.advise import expected_loss

    expected = expected_loss(pairs["gap"], calibration)
    inside = (pairs["loss"] >= expected["loss_low"]) & (pairs["loss"] <= expected["loss_high"])
    tie = expected["tie"]
    return (f"{len(pairs)} pairs, actual loss inside the {calibration['level']:.0%} interval: {inside.mean():.0%}; "
            f"called a tie: {tie.sum()}, of which within 0.01 of the top (or better): "
            f"{(pairs['loss'][tie] <= TOLERANCE).mean() if tie.any() else float('nan'):.0%}; not a tie: {(~tie).sum()}, "
            f"of which actually worse than the top by more than 0.01: "
            f"{(pairs['loss'][~tie] > TOLERANCE).mean() if (~tie).any() else float('nan'):.0%}")


def summary(per_case: pd.DataFrame) -> pd.DataFrame:
    return (per_case.groupby("rule", sort=False)
            .agg(cases=("regret", "size"), rho=("rho", "mean"), mean_regret=("regret", "mean"),
                 max_regret=("regret", "max"), share_right=("regret", lambda r: float(np.mean(r <= TOLERANCE))))
            .reset_index())


def markdown_table(table: pd.DataFrame) -> list[str]:
    lines = ["| rule | cases | mean Spearman ρ | mean regret | max regret | regret ≤ 0.01 |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        rho = "—" if np.isnan(r.rho) else f"{r.rho:.2f}"
        lines.append(f"| {r.rule} | {r.cases} | {rho} | {r.mean_regret:.4f} | {r.max_regret:.4f} | {r.share_right:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "her2st")
    parser.add_argument("--out", type=Path, default=Path("bench-advise"))
    parser.add_argument("--synthetic", type=int, default=N_SYNTHETIC, help="number of synthetic stacks (seeds 0..N-1)")
    parser.add_argument("--measure", help="measure only these seeds (comma list; 'her2st' for HER2-ST), report nothing")
    parser.add_argument("--draw", type=int, default=0,
                        help="measure a second independent draw into OUT/draw<N>/: the synthetic counts drawn again "
                             "(count_seed N) and the stand-in seeded with N (HER2-ST: the seed only)")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="synthetic budgets to measure (comma list)")
    parser.add_argument("--check-full", default="", help="synthetic seeds whose budget-1 sets also get the full pipeline")
    parser.add_argument("--singles", default="", help="synthetic seeds whose single sections are imputed one by one, each "
                                                      "target's accuracy kept (OUT/singles/): the pair-level ceiling")
    parser.add_argument("--no-readme", action="store_true", help="do not write the table into benchmarks/README.md")
    parser.add_argument("--measured-only", action="store_true", help="report the stacks measured so far, measure nothing")
    parser.add_argument("--write-calibration", action="store_true",
                        help="refit the relative calibration on the even seeds into src/stimpute/data/advise_calibration.json")
    args = parser.parse_args()

    from stimpute.advise import expected_loss
    from stimpute.datasets import synthetic_stack
    from stimpute.io import read_stack

    cases_dir = args.out / ("cases" if args.draw == 0 else f"draw{args.draw}")
    cases_dir.mkdir(parents=True, exist_ok=True)
    synthetic_budgets = tuple(int(b) for b in args.budgets.split(","))
    jobs = [(f"synthetic {seed:02d}", lambda seed=seed: synthetic_stack(**synthetic_case(seed), count_seed=args.draw or None),
             synthetic_budgets, (1,) if str(seed) in args.check_full.split(",") else ()) for seed in range(args.synthetic)]
    if args.data.is_dir():
        jobs.append(("HER2-ST", lambda: read_stack([args.data / name for name in HER2ST]), (1, 2), ()))
    frames = []
    measure = None if args.measure is None else {f"synthetic {int(s):02d}" if s.isdigit() else "HER2-ST"
                                                 for s in args.measure.split(",")}
    for label, make, budgets, full in jobs:
        path = cases_dir / label.replace(" ", "_")
        if not path.with_suffix(".csv").is_file() and args.measured_only:
            continue
        singles = args.out / "singles" / path.with_suffix(".csv").name
        if args.draw == 0 and label.split()[-1] in {f"{int(s):02d}" for s in args.singles.split(",") if s} \
                and not singles.is_file():
            singles.parent.mkdir(parents=True, exist_ok=True)
            measure_singles(make(), args.out / "cache" / path.name, singles)
        if measure is not None and label in measure or measure is None and not path.with_suffix(".csv").is_file():
            start = time.perf_counter()
            measure_stack(make(), args.out / "cache" / path.name, path, budgets, full, synthetic=label != "HER2-ST",
                          seed=args.draw)
            print(f"{label}: measured in {time.perf_counter() - start:.0f} s", flush=True)
        if measure is None:
            frames.append(score_stack(path, label, args.out / f"draw{SECOND_DRAW}" / path.with_suffix(".csv").name, singles))
    if measure is not None:
        return
    frame = pd.concat(frames, ignore_index=True)
    if args.write_calibration:
        dev = frame[frame["stack"].isin(DEV)]
        calibration = fit_calibration(calibration_pairs(dev), f"{dev['stack'].nunique()} synthetic stacks "
                                      f"(even seeds 0-{args.synthetic - 2}, `benchmarks/bench_advise.py`)")
        CALIBRATION.write_text(json.dumps(calibration, indent=2) + "\n")
        frame["tie"] = expected_loss(frame["gap"], calibration)["tie"]  # as `advise` now calls them
    frame.to_csv(args.out / "bench_advise.csv", index=False)
    lines = report(frame, args.out / "cases")
    (args.out / "bench_advise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.no_readme:
        readme = ROOT / "benchmarks" / "README.md"
        text = readme.read_text()
        a, b = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
        readme.write_text(text[:a] + "\n" + "\n".join(lines) + "\n" + text[b:])


def speed(cases_dir: Path) -> str:
    """Wall and CPU seconds of `advise` (pair tables and every set of 3) on the measured
    twelve-section stacks, with the machine's load average."""
    from stimpute.advise import StackDescription, advise

    seconds, cpu, spots, described = [], [], [], []
    for path in sorted(cases_dir.glob("synthetic_*.npz")):
        d, registration_features = load_description(path.with_suffix(""))
        if len(d.names) != 12:
            continue
        start, start_cpu = time.perf_counter(), time.process_time()
        advise(StackDescription(d.names, d.z_um, d.xy_um, d.embedding, d.pitch_um), 3)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        spots.append(sum(len(xy) for xy in d.xy_um))
        described.append(registration_features)
    if not seconds:
        return ""
    return (f"Speed (item 5): `advise` with budget 3 over 12 sections (pair tables + all 220 sets) took "
            f"{min(seconds):.2f}-{max(seconds):.2f} s ({min(cpu):.2f}-{max(cpu):.2f} CPU s) on {len(seconds)} "
            f"twelve-section stacks ({min(spots)}-{max(spots)} spots in all), on {os.cpu_count()} CPUs with load "
            f"average {os.getloadavg()[0]:.1f}, one BLAS thread; registration (true, synthetic) + features took "
            f"{min(described):.0f}-{max(described):.0f} s.")


def noise_floor(synthetic: pd.DataFrame, per_case: pd.DataFrame) -> list[str]:
    """How attainable "within 0.01 of the best" is: on the (stack, budget) cases measured twice,
    every rule beside the best set by the second draw (its regret on the first), the ties of
    the first draw, and each rule's regret beyond the floor's."""
    measured = per_case.loc[per_case["rule"] == FLOOR, ["stack", "budget"]]
    if measured.empty:
        return []
    on = per_case.merge(measured, on=["stack", "budget"])
    on = on[on["rule"] != CEILING]
    dev = on["stack"].isin(DEV)
    within = (synthetic.merge(measured, on=["stack", "budget"]).groupby(["stack", "budget"])
              .apply(lambda g: int((g["actual"] >= g["actual"].max() - TOLERANCE).sum()), include_groups=False))
    floor = on[on["rule"] == FLOOR].set_index(["stack", "budget"])["regret"]
    excess = on.assign(excess=on["regret"].to_numpy() - floor.loc[list(zip(on["stack"], on["budget"]))].to_numpy())
    beyond = excess.groupby("rule", sort=False)["excess"].agg(["mean", lambda e: float(np.mean(e <= TOLERANCE))])
    budgets = ", ".join(f"{n} with budget {b}" for b, n in measured.groupby("budget").size().items())
    return [f"**Noise floor** ({len(measured)} synthetic cases measured twice: {budgets}). The second draw is the "
            f"same stack (tissue, images, spots) with its counts drawn again (`synthetic_stack(count_seed="
            f"{SECOND_DRAW})`) and the stand-in's random parts seeded with {SECOND_DRAW}; its best set is picked "
            "and scored on the first draw. Its Spearman ρ is that of the two draws' actuals.", "",
            *markdown_table(summary(on)), "", "Development half of these cases:", "", *markdown_table(summary(on[dev])),
            "", "Held-out half of these cases:", "", *markdown_table(summary(on[~dev])), "",
            f"Ties on the first draw: in {np.mean(within > 1):.0%} of these cases more than one candidate set lies "
            f"within {TOLERANCE} of the best (median {np.median(within):.0f} sets, up to {within.max()}; "
            f"{np.median(within / synthetic.groupby(['stack', 'budget']).size().loc[within.index]):.0%} of the "
            "candidates at the median).", "",
            "Regret beyond the floor's (the rule's regret minus that of the second draw's best, per case):", "",
            "| rule | mean | ≤ 0.01 |", "|---|---|---|",
            *[f"| {rule} | {r['mean']:+.4f} | {r['<lambda_0>']:.0%} |" for rule, r in beyond.iterrows() if rule != FLOOR],
            ""]


def pair_ceiling(per_case: pd.DataFrame, stacks: pd.DataFrame) -> list[str]:
    """Mean regret and share within 0.01 per budget of the advisor, evenly spaced, the pair-level
    ceiling (`CEILING`) and the noise floor, on the cases where the ceiling was measured; how the
    true table orders each target's sources beside z distance and the image pair table (`stacks`:
    one row per stack with `order_by_z`, `order_by_pairs`)."""
    measured = per_case.loc[per_case["rule"] == CEILING, ["stack", "budget"]]
    if measured.empty:
        return []
    on = per_case.merge(measured, on=["stack", "budget"])
    rules = [r for r in ("advisor", "evenly spaced", CEILING, FLOOR) if r in set(on["rule"])]
    budgets = sorted(on["budget"].unique())

    def cell(r: pd.Series) -> str:
        return f"{r.mean():.4f} / {np.mean(r <= TOLERANCE):.0%}" if len(r) else "—"

    lines = [f"**Pair-level ceiling** ({len(measured)} synthetic cases: {measured['stack'].nunique()} stacks whose single "
             "sections were imputed one by one, each target's accuracy kept: `--singles`). "
             f"\"{CEILING}\" is the advisor's kind of score, facility location over a pair table, given the true "
             "pair table in gene space: G[k, t], target t's actual accuracy with section k alone known (read from the counts). "
             "Mean regret / share ≤ 0.01:", "",
             "| rule | " + " | ".join(f"budget {b}" for b in budgets) + " | all | even seeds | odd seeds |",
             "|---|" + "---|" * (len(budgets) + 3)]
    for rule in rules:
        r = on[on["rule"] == rule]
        cells = [cell(r.loc[r["budget"] == b, "regret"]) for b in budgets]
        cells += [cell(r["regret"]), cell(r.loc[r["stack"].isin(DEV), "regret"]), cell(r.loc[~r["stack"].isin(DEV), "regret"])]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    halves = stacks.groupby(stacks["stack"].isin(DEV))[["order_by_z", "order_by_pairs"]].mean().reindex([True, False])
    return lines + ["", "How each target's sources are ordered by the true table and by what the advisor reads (mean "
                    "over targets and stacks of Spearman ρ, even / odd seeds): by z distance "
                    f"{halves.loc[True, 'order_by_z']:.2f} / {halves.loc[False, 'order_by_z']:.2f}, by the image pair "
                    f"table {halves.loc[True, 'order_by_pairs']:.2f} / {halves.loc[False, 'order_by_pairs']:.2f}.", ""]


def held_out_cases(per_case: pd.DataFrame, rules=("advisor", "z decay by median (round 2)", "evenly spaced", CEILING, FLOOR)) -> list[str]:
    """Per held-out (odd seed) case: what the generator put in the stack and each rule's regret."""
    held = per_case[~per_case["stack"].isin(DEV)]
    regret = held.pivot_table(index=["stack", "budget"], columns="rule", values="regret")
    rules = [r for r in rules if r in regret]
    lines = ["Held-out cases one by one (drift: programmes alike over that many sections; damaged: ruined "
             "images; torn: sections missing part of their tissue):", "",
             "| stack | sections | budget | drift | damaged | torn | " + " | ".join(rules) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(rules)]
    for (stack, budget), r in regret.iterrows():
        case = synthetic_case(int(stack.split()[-1]))
        cells = [f"{r[rule]:.4f}" if np.isfinite(r[rule]) else "—" for rule in rules]
        lines.append(f"| {stack} | {case['n_sections']} | {budget} | {case['z_sigma_sections']:.1f} | "
                     f"{','.join(f'S{i}' for i in case['damaged']) or '—'} | "
                     f"{','.join(f'S{i}' for i in sorted(case['missing'])) or '—'} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(frame: pd.DataFrame, cases_dir: Path) -> list[str]:
    """The tables of benchmarks/README.md's advisor section."""
    from stimpute.advise import load_calibration

    synthetic = frame[frame["stack"] != "HER2-ST"]
    per_case = cases(frame)
    floor_cases = per_case[per_case["stack"] != "HER2-ST"]
    syn_cases = floor_cases[~floor_cases["rule"].isin(BEYOND)]
    sizes = synthetic.groupby("stack")["n_sections"].first()
    counts = syn_cases[syn_cases["rule"] == "advisor"].groupby("budget").size()
    lines = [f"Synthetic stacks: {len(sizes)} ({sizes.min()}-{sizes.max()} sections); (stack, budget) cases: "
             + ", ".join(f"{n} with budget {b}" for b, n in counts.items())
             + f" (a budget with more than {MAX_SETS} candidate sets is left out); {len(synthetic)} candidate sets "
             "imputed. Actual = the stand-in (the pipeline without MSAGNet: kernel ridge, residual transfer, copy, "
             "programs, fixed fusion), mean per-gene PCC over the targets; true registration.", "",
             *markdown_table(summary(syn_cases)), ""]
    dev = syn_cases["stack"].isin(DEV)
    lines += ["Development half (even seeds; the score's variants were chosen here):", "",
              *markdown_table(summary(syn_cases[dev])), "", "Held-out half (odd seeds):", "",
              *markdown_table(summary(syn_cases[~dev])), ""]
    for budget, group in syn_cases.groupby("budget"):
        lines += [f"Budget {budget} (all synthetic stacks):", "", *markdown_table(summary(group)), ""]
    lines += noise_floor(synthetic, floor_cases)
    if "order_by_z" in synthetic:
        lines += pair_ceiling(floor_cases, synthetic.dropna(subset=["order_by_z"]).groupby("stack", as_index=False).first())
        lines += oracle_table(synthetic)
    lines += held_out_cases(floor_cases)
    calibration = load_calibration()
    held = synthetic[~synthetic["stack"].isin(DEV)]
    lines += [f"Relative calibration (`src/stimpute/data/advise_calibration.json`, fitted on {calibration['source']}): "
              f"loss = {calibration['slope']:.3f} × score gap g, {calibration['level']:.0%} interval "
              f"[{calibration['slope_low']:.3f} × g {calibration['low']:+.4f}, {calibration['slope_high']:.3f} × g "
              f"{calibration['high']:+.4f}] (slopes per (stack, budget), spread around the pooled line). "
              "On the odd seeds (not fitted on): "
              f"{calibration_check(calibration_pairs(held), calibration)}.", ""]
    her2 = per_case[per_case["stack"] == "HER2-ST"]
    if not her2.empty:
        h = frame[frame["stack"] == "HER2-ST"]
        lines += [f"On HER2-ST: {calibration_check(calibration_pairs(h), calibration)}.", "",
                  "HER2-ST C2/C3/C4 (3 candidate sets per budget; actual = stand-in, real registration):", "",
                  "| rule | budget 1: pick / regret | budget 2: pick / regret |", "|---|---|---|"]
        for rule, group in her2.groupby("rule", sort=False):
            cells = [f"{r.pick} / {r.regret:.4f}" for r in group.sort_values("budget").itertuples()]
            lines.append(f"| {rule} | {' | '.join(cells)} |")
        lines += ["", "| known | actual (stand-in) | advisor score | tie | old model |", "|---|---|---|---|---|",
                  *[f"| {r['known']} | {r['actual']:.4f} | {r['advisor_score']:.4f} | {'yes' if r['tie'] else 'no'} | "
                    f"{r['old model']:.4f} |" for _, r in h.iterrows()], ""]
    if "actual_full" in frame and frame["actual_full"].notna().any():
        rows = []
        for stack, group in frame.dropna(subset=["actual_full"]).groupby("stack"):
            rho = spearmanr(group["actual"], group["actual_full"]).statistic
            rows.append(f"| {stack} | {len(group)} | {rho:.2f} | {group.loc[group['actual'].idxmax(), 'known']} | "
                        f"{group.loc[group['actual_full'].idxmax(), 'known']} | "
                        f"{(group['actual_full'] - group['actual']).mean():+.4f} |")
        lines += ["Stand-in against the full pipeline (MSAGNet + kernel ridge), budget 1:", "",
                  "| stack | sets | Spearman ρ | best (stand-in) | best (full) | full − stand-in |", "|---|---|---|---|---|---|",
                  *rows, ""]
    lines.append(speed(cases_dir))
    return lines


if __name__ == "__main__":
    main()
