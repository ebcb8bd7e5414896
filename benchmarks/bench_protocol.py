"""The validation protocol that decides defaults (issue 25): accuracy on sections nobody tuned on.

Rows: every ordered pair (known → target) of the shared HER2-ST sections C2/C3/C4, plus
C2+C4 → C3, each on the target sections as they are and on every copy of the shift suite
(`shifts.py`: stain, blur, jpeg, tone, scale; the known section is never shifted).
7 pairs × 6 versions = 42 rows. Each split's panel (top 250 HVGs) and top-50 genes come
from its known section(s) only.

Methods per row (mean per-gene PCC over the panel; per-spot PCC across the panel):
- `asign`: X of `stimpute impute` (the default), and its two parts `model`, `propagated`;
- the simple rivals: `ridge` (the linear probe on the encoder's features, standardised on
  the known spots), `transfer` (register + Gaussian kNN copy, k = 4, σ = one pitch) and
  `composite` = ½ z(ridge) + ½ z(transfer), z-scored per gene within the target section
  (given the mean and spread of the raw average, for the per-spot PCC); `ridge·section`
  and `composite·section`: the same on features standardised per section, as stimpute's
  models see them;
- `kernel ridge`, `msagnet`: the model part's members alone;
- `mean profile`: the known sections' constant mean (per-spot PCC only: a flat map).

A change is adopted only if it raises the worst row without lowering the mean. The
summary gives per method: mean and worst over rows, and the Wilcoxon signed-rank p
against the composite, paired over (row, gene).

Stage 1 (expensive, resumable): one `stimpute` imputation per (shift, known split), its
parts and the rivals pickled under OUT/parts/. Stage 2 (seconds): the table.

Run: `python benchmarks/bench_protocol.py [--data ../shared/data/her2st] [--out DIR]
[--shifts none,stain,blur,jpeg,tone,scale] [--splits C2,C3,C4,C2+C4]`
Writes OUT/protocol.md (the tables in benchmarks/README.md), OUT/protocol_genes.csv,
OUT/protocol_rows.csv.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shifts import SHIFTS, apply_scale, write_shifted  # noqa: E402

SECTIONS = ("C2", "C3", "C4")
SPLITS = [("C2",), ("C3",), ("C4",), ("C2", "C4")]
VERSIONS = ("none", *SHIFTS)
METHODS = ["asign", "model", "propagated", "composite", "composite·section", "ridge", "ridge·section", "transfer",
           "kernel ridge", "msagnet"]


def z(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return (values - values.mean(0)) / (values.std(0) + 1e-9)


def run_parts(data: Path, out: Path, shift: str, known: tuple[str, ...], epochs: int) -> Path:
    """Impute one (shift, known) split and pickle its parts and rivals (skipped when done)."""
    path = out / "parts" / f"{shift}__{'+'.join(known)}.pkl"
    if path.is_file():
        return path
    from stimpute.expression import top_variable
    from stimpute.impute import impute_stack
    from stimpute.io import read_stack
    from stimpute.models import get_method, load_methods
    from stimpute.prepare import known_indices, prepare_stack
    from stimpute.models.msagnet_training import TrainConfig

    load_methods()
    image_shift = shift not in ("none", "scale")
    folders = [data / s if s in known or not image_shift else write_shifted(data / s, out / "shifted" / shift / s, shift)
               for s in SECTIONS]
    stack = read_stack(folders)
    if shift == "scale":
        for section in stack:
            if section.name not in known:
                apply_scale(section)
    prepared = prepare_stack(stack, known=list(known), cache_dir=out / "cache" / shift / "+".join(known))
    k = known_indices(stack, list(known))
    targets = [i for i in range(len(stack)) if i not in k]
    result = impute_stack(prepared, k, config=TrainConfig(max_epochs=epochs))
    known_expression = np.concatenate([prepared.known_expression(i) for i in k])
    parts = {
        "result": result, "targets": {t: stack[t].name for t in targets},
        "ridge": raw_ridge(stack, k, targets, known_expression, out / "cache" / shift / "+".join(known)),
        "ridge·section": get_method("ridge").fit_predict(prepared, k, targets),
        "transfer": get_method("transfer").fit_predict(prepared, k, targets),
        "truth": {t: prepared.expression[t] for t in targets},
        "known_mean": known_expression.mean(0), "features": prepared.features, "known": k,
        "known_expression": {i: prepared.known_expression(i) for i in k}, "top": top_variable(known_expression, 50), "panel": prepared.panel,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        pickle.dump(parts, f)
    os.replace(tmp, path)
    return path


def raw_ridge(stack, known: list[int], targets: list[int], y: np.ndarray, cache: Path) -> dict:
    """The rival's linear ridge as the issue defines it: on the encoder's cached features,
    standardised with the known spots' statistics (not per section)."""
    from stimpute.features.stored import stack_features
    from stimpute.models.baselines import Ridge

    raw, _ = stack_features(stack, cache_dir=cache)
    flat = [f.reshape(len(f), -1) for f in raw]
    model = Ridge().model(sum(len(flat[i]) for i in known), flat[0].shape[1], 0)
    model.fit(np.concatenate([flat[i] for i in known]), y)
    return {t: model.predict(flat[t]).astype(np.float32) for t in targets}


def methods(parts: dict, t: int) -> dict[str, np.ndarray]:
    """Every method's prediction of target t from one split's parts."""
    from stimpute.combine import zmix

    res = parts["result"]
    return {
        "asign": res.fused[t], "model": res.model[t], "propagated": res.propagated[t],
        "composite": zmix(parts["ridge"][t], parts["transfer"][t], 0.5),
        "composite·section": zmix(parts["ridge·section"][t], parts["transfer"][t], 0.5),
        "ridge": parts["ridge"][t], "ridge·section": parts["ridge·section"][t], "transfer": parts["transfer"][t],
        "kernel ridge": res.members["kernel_ridge"][t], "msagnet": res.members["msagnet_3d"][t],
    }


def score(out: Path, variants=methods) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-gene PCC (row, method, gene) and per-row summaries (mean per-gene and per-spot PCC)."""
    from stimpute.metrics import pearson_columns, spot_pcc

    genes, rows = [], []
    for path in sorted((out / "parts").glob("*.pkl")):
        shift, known = path.stem.split("__")
        with open(path, "rb") as f:
            parts = pickle.load(f)
        for t, name in parts["targets"].items():
            truth = parts["truth"][t]
            top = np.isin(np.arange(truth.shape[1]), parts["top"])
            row = f"{known}→{name}" + ("" if shift == "none" else f" [{shift}]")
            flat = np.tile(parts["known_mean"], (len(truth), 1))
            rows.append({"row": row, "shift": shift, "method": "mean profile", "pcc": np.nan, "top50": np.nan,
                         "spot_pcc": float(np.nanmean(spot_pcc(flat, truth)))})
            for method, pred in variants(parts, t).items():
                pcc = np.nan_to_num(pearson_columns(np.asarray(pred, np.float64), truth))
                genes.append(pd.DataFrame({"row": row, "shift": shift, "method": method, "gene": np.arange(len(pcc)),
                                           "top50": top, "pcc": pcc}))
                rows.append({"row": row, "shift": shift, "method": method, "pcc": pcc.mean(), "top50": pcc[top].mean(),
                             "spot_pcc": float(np.nanmean(spot_pcc(np.asarray(pred, np.float64), truth)))})
    return pd.concat(genes, ignore_index=True), pd.DataFrame(rows)


def summary(genes: pd.DataFrame, rows: pd.DataFrame, against: str = "composite") -> str:
    """Markdown: per method, mean and worst row of mean per-gene PCC (panel and top-50),
    worst per-spot PCC margin over the mean profile, Wilcoxon p against `against`."""
    order = list(dict.fromkeys(rows.method[rows.method != "mean profile"]))
    ref = genes[genes.method == against].sort_values(["row", "gene"]).pcc.to_numpy()
    flat = rows[rows.method == "mean profile"].set_index("row").spot_pcc
    lines = ["| method | mean | worst row | mean top-50 | worst top-50 | worst per-spot − mean profile | "
             f"− {against} (mean) | − {against} (worst row) | Wilcoxon p vs {against} |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = rows[rows.method == against].set_index("row")
    for m in order:
        r = rows[rows.method == m].set_index("row")
        own = genes[genes.method == m].sort_values(["row", "gene"]).pcc.to_numpy()
        p = wilcoxon(own, ref).pvalue if m != against and np.any(own != ref) else 1.0
        diff = r.pcc - base.pcc.reindex(r.index)
        lines.append(f"| {m} | {r.pcc.mean():.3f} | {r.pcc.min():.3f} | {r.top50.mean():.3f} | {r.top50.min():.3f} | "
                     f"{(r.spot_pcc - flat.reindex(r.index)).min():+.3f} | {diff.mean():+.3f} | {diff.min():+.3f} | {p:.1g} |")
    return "\n".join(lines)


def row_table(rows: pd.DataFrame, methods_shown: list[str]) -> str:
    """Markdown: every row × method, mean per-gene PCC (per-spot PCC in the last columns)."""
    wide = rows.pivot(index="row", columns="method", values="pcc")
    spot = rows.pivot(index="row", columns="method", values="spot_pcc")
    order = list(dict.fromkeys(rows.row))
    lines = ["| row | " + " | ".join(methods_shown) + " | per-spot: asign / mean profile |",
             "|---|" + "---|" * (len(methods_shown) + 1)]
    for row in order:
        cells = [f"{wide.loc[row, m]:.3f}" for m in methods_shown]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {spot.loc[row, 'asign']:.3f} / {spot.loc[row, 'mean profile']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("STIMPUTE_HER2ST", root.parent / "shared/data/her2st")))
    parser.add_argument("--out", type=Path, default=root / "benchmarks/results/protocol")
    parser.add_argument("--shifts", default=",".join(VERSIONS))
    parser.add_argument("--splits", default=",".join("+".join(k) for k in SPLITS))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--score-only", action="store_true", help="only stage 2: the table from the pickled parts")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.score_only:
        for shift in args.shifts.split(","):
            for known in [tuple(k.split("+")) for k in args.splits.split(",")]:
                start = time.perf_counter()
                run_parts(args.data, args.out, shift, known, args.epochs)
                print(f"{shift} known {'+'.join(known)}: {time.perf_counter() - start:.0f} s", flush=True)
    genes, rows = score(args.out)
    genes.to_csv(args.out / "protocol_genes.csv", index=False)
    rows.to_csv(args.out / "protocol_rows.csv", index=False)
    report = "\n\n".join([
        "### Summary over every row (mean per-gene PCC; 250-gene panel of the known section(s))\n\n" + summary(genes, rows),
        "### Every row\n\n" + row_table(rows, METHODS),
    ])
    (args.out / "protocol.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
