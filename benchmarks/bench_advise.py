"""Does `stimpute advise` pick the right sections? Its expectation beside the actual
imputation accuracy on the shared HER2-ST C2/C3/C4 (issue 19).

For every known set of size 1 and 2, each other section (target) gets the advisor's
count-free quantities (coverage, z distance, morphological coverage;
`stimpute.advise`) and its actual accuracy: the mean per-gene PCC over the panel (top
250 HVGs of the known sections) of the imputed target against its measured counts, from

- `--actual FILE`: a `bench_impute.csv` of `benchmarks/bench_impute.py` (columns
  variant, known, target, gene, pcc, ...; `--variant asign` is `stimpute impute`'s output);
- `--impute`: runs ASIGN (`stimpute impute`'s fused output, `impute_stack`) for every
  known set here (minutes per split; the feature cache in OUT/cache is reused);
- otherwise the `transfer` baseline (register, then copy the Gaussian-weighted nearest
  measured spots of every known section): a cheap stand-in, seconds instead of an hour.

The expected-PCC model (`stimpute.advise.MODEL_TERMS`, least squares over the (known set,
target) rows) is fitted on all rows and, leave-one-section-out, on the rows whose target
is not section s, predicting those whose target is s. Reported per known set size: the
actual mean PCC over targets beside the expectation, Spearman's rho of expected vs
actual, and the regret of the advisor's pick (actual of the pick minus the best set's).

Run: `python benchmarks/bench_advise.py [--data ../shared/data/her2st] [--out bench-advise]
[--actual bench_impute.csv] [--write-model]` (`--write-model` stores the fitted
coefficients in src/stimpute/data/advise_model.json, the advisor's packaged model).
Writes OUT/bench_advise.csv (one row per known set and target), OUT/bench_advise.md
(and with `--impute` OUT/actual_asign.csv, reusable as `--actual`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

SECTIONS = ("C2", "C3", "C4")
ROOT = Path(__file__).resolve().parents[1]


def actual_from_csv(path: Path, variant: str) -> dict[tuple[str, str], float]:
    """{(known label, target): mean per-gene PCC (undefined as 0)} of one variant."""
    frame = pd.read_csv(path)
    frame = frame[frame["variant"] == variant]
    if frame.empty:
        raise SystemExit(f"{path}: no rows of variant {variant!r}")
    frame = frame.assign(known=frame["known"].astype(str).str.replace(",", "+"), pcc=frame["pcc"].fillna(0.0))
    return frame.groupby(["known", "target"])["pcc"].mean().to_dict()


def actual_transfer(stack, description, known_sets) -> dict[tuple[str, str], float]:
    """The stand-in: the `transfer` baseline's mean per-gene PCC per (known set, target)."""
    from stimpute.metrics import pearson_columns
    from stimpute.expression import panel_expression, select_panel
    from stimpute.models import get_method, load_methods
    from stimpute.prepare import PreparedStack

    load_methods()
    coords = [xy / stack[0].um_per_px for xy in description.xy_um]
    out = {}
    for known in known_sets:
        genes = select_panel([stack[i].adata for i in known])
        expression = [panel_expression(s, genes) for s in stack]
        prepared = PreparedStack(stack, genes, expression, [None] * len(stack), coords)
        targets = [i for i in range(len(stack)) if i not in known]
        predicted = get_method("transfer").fit_predict(prepared, list(known), targets)
        label = "+".join(stack.names[i] for i in known)
        for t in targets:
            out[(label, stack.names[t])] = float(np.nan_to_num(pearson_columns(predicted[t], expression[t])).mean())
    return out


def actual_impute(stack, known_sets, cache: Path, epochs: int) -> dict[tuple[str, str], float]:
    """ASIGN's fused output per split (`impute_stack`, default settings): mean per-gene PCC
    per (known set, target). One preparation (registration, features, graph) serves every
    split; each split's panel comes from its known sections only (`with_known_panel`)."""
    from stimpute.metrics import pearson_columns
    from stimpute.impute import impute_stack
    from stimpute.prepare import prepare_stack, with_known_panel
    from stimpute.models.msagnet_training import TrainConfig

    prepared = prepare_stack(stack, cache_dir=cache)
    out = {}
    for known in known_sets:
        split = with_known_panel(prepared, list(known))
        result = impute_stack(split, list(known), config=TrainConfig(max_epochs=epochs))
        label = "+".join(stack.names[i] for i in known)
        for t in result.fused:
            if t not in known:
                out[(label, stack.names[t])] = float(np.nan_to_num(pearson_columns(result.fused[t], split.expression[t])).mean())
        print(f"known {label}: " + ", ".join(f"{t} {v:.3f}" for (k, t), v in out.items() if k == label), flush=True)
    return out


def design(rows: pd.DataFrame, terms: list[str]) -> np.ndarray:
    from stimpute.advise import term_values

    return np.column_stack([term_values(rows, t) for t in terms])


def fit(rows: pd.DataFrame, terms: list[str]) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(design(rows, terms), rows["actual"].to_numpy(float), rcond=None)
    return coef


def set_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per known set: actual and expected (in-sample, leave-one-section-out) mean over targets."""
    return (rows.groupby(["size", "known"], sort=False)[["actual", "expected", "expected_loso"]].mean()
            .reset_index())


def rank_stats(sets: pd.DataFrame, column: str) -> dict:
    """Spearman rho of `column` vs actual and the regret of the argmax of `column`."""
    rho = spearmanr(sets[column], sets["actual"]).statistic if len(sets) > 2 else float("nan")
    pick = sets.loc[sets[column].idxmax()]
    return {"rho": float(rho), "pick": pick["known"], "regret": float(pick["actual"] - sets["actual"].max())}


def advisor_seconds(description) -> float:
    """Seconds of the advisor's own work (neighbour tables, every budget's ranking), with
    registration and features already done (they are cached and shared with `impute`)."""
    from stimpute.advise import StackDescription, advise

    start = time.perf_counter()
    d = StackDescription(description.names, description.z_um, description.xy_um, description.embedding, description.pitch_um)
    for budget in range(1, len(d.names)):
        advise(d, budget)
    return time.perf_counter() - start


def speed_row(out: Path) -> str:
    """The acceptance case: five synthetic sections of ~180 spots, counts stripped."""
    from stimpute.advise import count_free, describe_stack
    from stimpute.datasets import synthetic_stack

    stack = count_free(synthetic_stack(5, seed=0))
    start = time.perf_counter()
    description = describe_stack(stack, cache_dir=out / "cache-synthetic")
    described = time.perf_counter() - start
    spots = [len(xy) for xy in description.xy_um]
    return (f"Five synthetic sections ({min(spots)}-{max(spots)} spots): registration + features {described:.1f} s, "
            f"the advisor itself (every budget 1-4) {advisor_seconds(description):.2f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "her2st")
    parser.add_argument("--out", type=Path, default=Path("bench-advise"))
    parser.add_argument("--actual", type=Path, help="bench_impute.csv with per-gene PCCs (default: the transfer stand-in)")
    parser.add_argument("--variant", default="asign")
    parser.add_argument("--impute", action="store_true", help="actual = ASIGN run here for every known set (slow)")
    parser.add_argument("--epochs", type=int, default=200, help="MSAGNet epochs of --impute")
    parser.add_argument("--write-model", action="store_true")
    parser.add_argument("--speed", action="store_true", help="also time the advisor on five synthetic ~180-spot sections")
    args = parser.parse_args()

    from stimpute.advise import MODEL_TERMS, describe_stack
    from stimpute.io import read_stack

    args.out.mkdir(parents=True, exist_ok=True)
    stack = read_stack([args.data / name for name in SECTIONS])
    start = time.perf_counter()
    description = describe_stack(stack, cache_dir=args.out / "cache")
    described = time.perf_counter() - start
    known_sets = [k for size in (1, 2) for k in itertools.combinations(range(len(stack)), size)]
    if args.actual:
        actual, source = actual_from_csv(args.actual, args.variant), f"{args.actual.name}, variant {args.variant}"
    elif args.impute:
        actual, source = actual_impute(stack, known_sets, args.out / "cache", args.epochs), "ASIGN (`impute_stack`, fused)"
        pd.DataFrame([{"variant": "asign", "known": k, "target": t, "pcc": v} for (k, t), v in actual.items()]).to_csv(
            args.out / "actual_asign.csv", index=False)  # reusable as --actual
    else:
        actual, source = actual_transfer(stack, description, known_sets), "transfer baseline (stand-in)"

    frames = []
    for known in known_sets:
        label = "+".join(stack.names[i] for i in known)
        q = description.quantities(known)
        q.insert(0, "known", label)
        q.insert(0, "size", len(known))
        q["actual"] = [actual.get((label, t), np.nan) for t in q["section"]]
        frames.append(q)
    rows = pd.concat(frames, ignore_index=True).rename(columns={"section": "target"})
    missing = sorted(set(rows.loc[rows["actual"].isna(), "known"]))
    rows = rows.dropna(subset=["actual"]).reset_index(drop=True)  # splits the --actual file does not hold
    terms = list(MODEL_TERMS)
    coef = fit(rows, terms)
    rows["expected"] = design(rows, terms) @ coef
    rows["expected_loso"] = np.nan
    for s in stack.names:
        held = rows["target"] == s
        rows.loc[held, "expected_loso"] = design(rows[held], terms) @ fit(rows[~held], terms)
    rmse = float(np.sqrt(np.mean((rows["expected"] - rows["actual"]) ** 2)))
    loso_rmse = float(np.sqrt(np.mean((rows["expected_loso"] - rows["actual"]) ** 2)))
    rows.to_csv(args.out / "bench_advise.csv", index=False)

    sets = set_table(rows)
    lines = [f"# stimpute advise on HER2-ST {'/'.join(SECTIONS)}", "",
             f"Actual accuracy: {source}. Model: per-target PCC = "
             + " + ".join(f"{c:+.4f}·{t}" for c, t in zip(coef, terms)),
             f"(least squares over {len(rows)} (known set, target) rows; RMSE {rmse:.4f} in sample, "
             f"{loso_rmse:.4f} leave-one-section-out)."
             + (f" Known sets without actual numbers in that file (left out): {', '.join(missing)}." if missing else ""), "",
             f"Time on {os.cpu_count()} CPUs: registration + features {described:.1f} s, the advisor itself (budgets 1-2) "
             f"{advisor_seconds(description):.2f} s.", *([speed_row(args.out)] if args.speed else []), ""]
    lines += ["| known | targets: coverage / z µm / morphology | actual PCC | expected | expected (LOSO) |", "|---|---|---|---|---|"]
    for row in sets.itertuples():
        part = rows[rows["known"] == row.known]
        why = "; ".join(f"{r.target}: {r.coverage:.2f} / {r.z_distance_um:.0f} / {r.morphology:.2f}" for r in part.itertuples())
        lines.append(f"| {row.known} | {why} | {row.actual:.4f} | {row.expected:.4f} | {row.expected_loso:.4f} |")
    lines += ["", "| known sets | Spearman ρ (in sample) | pick / regret | Spearman ρ (LOSO) | pick / regret (LOSO) |",
              "|---|---|---|---|---|"]
    for size, group in [*sets.groupby("size"), ("1 and 2", sets)]:
        a, b = rank_stats(group, "expected"), rank_stats(group, "expected_loso")
        lines.append(f"| size {size} | {a['rho']:.2f} | {a['pick']} / {a['regret']:+.4f} | {b['rho']:.2f} | "
                     f"{b['pick']} / {b['regret']:+.4f} |")
    (args.out / "bench_advise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_model:
        model = {"terms": dict(zip(terms, [round(float(c), 5) for c in coef])),
                 "source": f"benchmarks/bench_advise.py on HER2-ST {'/'.join(SECTIONS)}; actual: {source}",
                 "rmse": round(rmse, 4), "loso_rmse": round(loso_rmse, 4), "n_rows": len(rows)}
        path = ROOT / "src" / "stimpute" / "data" / "advise_model.json"
        path.write_text(json.dumps(model, indent=2) + "\n")
        print(f"model written to {path}")


if __name__ == "__main__":
    main()
