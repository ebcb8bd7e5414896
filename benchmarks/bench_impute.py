"""Imputation accuracy on the shared HER2-ST sections C2, C3, C4: stimpute's ASIGN against
its simplest rivals, and what each of its parts adds (issue 14).

For every split (one known section, the other two imputed; and C2+C4 known → C3) the gene
panel (top 250 HVGs) and the top-50 genes come from the known section(s) only. Methods:

- `asign` (X of `stimpute impute`), its parts `model` and `propagated`;
- `transfer` (register, then Gaussian-weighted copy of the nearest measured spots),
  `ridge` (the linear probe on the same features), and their composite
  (½ · z(ridge) + ½ · z(transfer), z-scored per gene within the section);
- ablations, each one change against the default: MSAGNet with the reference's spot loss,
  the model part without ridge / without MSAGNet, propagation without the morphology
  term (distance kernel only), even fusion, fusion without the reach factor. Ablations
  that swap a member reuse the default's fitted fusion shares.

Statistics: mean per-gene PCC over the panel and over its top-50 genes; a Wilcoxon
signed-rank test of asign against each rival, paired over (gene, target) of the split.
Default settings were chosen on the development split, known C4 → target C3, only.

Cost: `--cost` times `stimpute impute` of a five-section stack from scratch (C2, C3, C4
and copies of C2 and C4 renamed C5, C6; C3 known), pinned to two cores: wall seconds and
peak RSS (target: under 5 minutes and 4 GB).

Run: `python benchmarks/bench_impute.py [--data ../shared/data/her2st] [--out bench-impute] [--epochs 200] [--cost]`
Writes `OUT/bench_impute.md` (the tables in benchmarks/README.md) and `OUT/bench_impute.csv`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

SECTIONS = ("C2", "C3", "C4")
DEV_SPLIT = ("C4", "C3")
SPLITS = [("C2",), ("C3",), ("C4",), ("C2", "C4")]
MAIN = ["asign", "model", "propagated", "transfer", "ridge", "kernel ridge", "½ ridge + ½ transfer"]
ABLATIONS = {
    "asign": "default: model (MSAGNet with gene-PCC loss + kernel ridge) ⊕ propagated (distance × morphology), "
             "propagated = kernel ridge + its transferred residuals; both projected on the cross-validated gene "
             "programs, calibrated fusion × reach",
    "msagnet spot loss": "MSAGNet trained with the reference's per-spot loss (in the model part)",
    "model w/o kernel ridge": "model part = MSAGNet alone",
    "model w/o msagnet": "model part = kernel ridge alone",
    "linear ridge member": "model part = MSAGNet + linear ridge (instead of kernel ridge)",
    "propagation w/o morphology": "propagated with the distance kernel only",
    "even fusion": "per-gene share ½ instead of calibrated shares",
    "fusion w/o reach": "w = the calibrated share everywhere (no distance awareness)",
    "propagation of expression": "the measured expression is transferred (not the kernel ridge residuals added to its prediction)",
    "w/o gene programs": "model and propagated parts fused as predicted, without the low-rank projection",
}


def z(values: np.ndarray) -> np.ndarray:
    return (values - values.mean(0)) / (values.std(0) + 1e-9)


def split_predictions(stack, known: tuple[str, ...], cache: Path, epochs: int) -> tuple[dict, dict, list, np.ndarray]:
    """{variant: {target: prediction}}, {target: truth}, the panel and its top-50 columns."""
    from stimpute.evidence import transfer
    from stimpute.expression import top_variable
    from stimpute.impute import FusionWeights, impute_stack
    from stimpute.models import get_method, load_methods
    from stimpute.prepare import known_indices, prepare_stack
    from stimpute.models.msagnet_training import TrainConfig

    load_methods()
    prepared = prepare_stack(stack, known=list(known), cache_dir=cache)
    k = known_indices(stack, list(known))
    targets = [i for i in range(len(stack)) if i not in k]
    top = top_variable(np.concatenate([prepared.known_expression(i) for i in k]), 50)
    runs = {loss: impute_stack(prepared, k, config=TrainConfig(max_epochs=epochs, loss=loss)) for loss in ("gene_pcc", "spot_pcc")}
    res, old = runs["gene_pcc"], runs["spot_pcc"]
    probe = res.members["kernel_ridge"]
    residuals = [res.residual[i] for i in k]
    plain = {t: p + probe[t] for t, p in transfer(prepared, k, targets, residuals, features=False)[0].items()}
    unprojected = {t: p + probe[t] for t, p in transfer(prepared, k, targets, residuals)[0].items()}
    expression_transfer, _ = transfer(prepared, k, targets)
    ridge = get_method("ridge").fit_predict(prepared, k, targets)
    rival = get_method("transfer").fit_predict(prepared, k, targets)
    shares = res.fusion
    even = FusionWeights(np.full(len(prepared.panel), 0.5))

    def fuse(t, prop=None, model=None, shares=shares, reach=None, project=res.programs.project):
        prop = res.propagated[t] if prop is None else project(prop)
        model = res.model[t] if model is None else project(model)
        w = shares.weights(res.reach[t] if reach is None else reach)
        return w * prop + (1 - w) * model

    old_model = {t: (old.members["msagnet_3d"][t] + res.members["kernel_ridge"][t]) / 2 for t in targets}
    out = {
        "asign": res.fused, "model": res.model, "propagated": res.propagated, "transfer": rival, "ridge": ridge,
        "½ ridge + ½ transfer": {t: 0.5 * z(ridge[t]) + 0.5 * z(rival[t]) for t in targets},
        "kernel ridge": res.members["kernel_ridge"],
        "msagnet (alone)": res.members["msagnet_3d"],
        "msagnet spot loss": {t: fuse(t, model=old_model[t]) for t in targets},
        "model w/o kernel ridge": {t: fuse(t, model=res.members["msagnet_3d"][t]) for t in targets},
        "model w/o msagnet": {t: fuse(t, model=res.members["kernel_ridge"][t]) for t in targets},
        "linear ridge member": {t: fuse(t, model=(res.members["msagnet_3d"][t] + ridge[t]) / 2) for t in targets},
        "propagation w/o morphology": {t: fuse(t, prop=plain[t]) for t in targets},
        "even fusion": {t: fuse(t, shares=even) for t in targets},
        "fusion w/o reach": {t: fuse(t, reach=np.ones_like(res.reach[t])) for t in targets},
        "propagation of expression": {t: fuse(t, prop=expression_transfer[t]) for t in targets},
        "w/o gene programs": {t: fuse(t, prop=unprojected[t], model=np.mean([m[t] for m in res.members.values()], axis=0),
                                      project=lambda a: a) for t in targets},
    }
    truth = {t: prepared.expression[t] for t in targets}
    return out, truth, prepared.panel, top


def score(stack, out: dict, truth: dict, known: tuple[str, ...], top: np.ndarray, seconds: float) -> pd.DataFrame:
    """One row per variant, target and gene: per-gene PCC (undefined → 0)."""
    from stimpute.metrics import pearson_columns

    rows = []
    for variant, preds in out.items():
        for t, pred in preds.items():
            pcc = np.nan_to_num(pearson_columns(pred, truth[t]))
            rows.append(pd.DataFrame({"variant": variant, "known": "+".join(known), "target": stack[t].name,
                                      "gene": np.arange(len(pcc)), "top50": np.isin(np.arange(len(pcc)), top), "pcc": pcc}))
    return pd.concat(rows, ignore_index=True).assign(split_seconds=seconds)


def table(scores: pd.DataFrame, variants: list[str], against: str = "asign") -> str:
    """Markdown: per split and target, mean per-gene PCC (panel / top-50) of each variant,
    and per split the Wilcoxon p of `against` vs each variant, paired over (gene, target)."""
    lines = ["| known | target | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for (known, target), part in scores.groupby(["known", "target"], sort=False):
        cells = []
        for v in variants:
            s = part[part.variant == v]
            cells.append(f"{s.pcc.mean():.3f} / {s[s.top50].pcc.mean():.3f}")
        lines.append(f"| {known} | {target} | " + " | ".join(cells) + " |")
    for known, part in scores.groupby("known", sort=False):
        ref = part[part.variant == against].sort_values(["target", "gene"]).pcc.to_numpy()
        cells = []
        for v in variants:
            other = part[part.variant == v].sort_values(["target", "gene"]).pcc.to_numpy()
            if v == against:
                cells.append("–")
                continue
            diff = ref - other
            p = wilcoxon(ref, other).pvalue if np.any(diff != 0) else 1.0
            cells.append(f"{diff.mean():+.3f} (p={p:.1g})")
        lines.append(f"| {known} | {against} − it, Wilcoxon | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def five_sections(data: Path, folder: Path) -> list[Path]:
    """C2, C3, C4 and renamed copies of C2 and C4 (C5, C6) as HER2-ST raw folders."""
    folders = []
    for name, source in (("C2", "C2"), ("C3", "C3"), ("C4", "C4"), ("C5", "C2"), ("C6", "C4")):
        target = folder / name
        if not target.is_dir():
            target.mkdir(parents=True)
            for f in (data / source).iterdir():
                shutil.copy(f, target / f.name.replace(source, name))
        folders.append(target)
    return folders


def cost(data: Path, out: Path) -> str:
    """`stimpute impute` of five sections from scratch on two cores: a markdown line."""
    sections = five_sections(data, out / "five")
    target = out / "impute_five"
    shutil.rmtree(target, ignore_errors=True)
    pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") else []
    cmd = [*pin, shutil.which("stimpute") or "stimpute", "impute", *map(str, sections), "--known", "C3", "--out", str(target)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return f"`stimpute impute` of five sections (C3 known, from scratch, 2 cores): {seconds:.0f} s, peak RSS {peak_gb:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("STIMPUTE_HER2ST", root.parent / "shared/data/her2st")))
    parser.add_argument("--out", type=Path, default=root / "benchmarks/results/impute")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--cost", action="store_true", help="only time `stimpute impute` of five sections")
    parser.add_argument("--splits", default=",".join("+".join(k) for k in SPLITS),
                        help="known sections of each split, e.g. 'C4' (the development split) or 'C2,C3,C4,C2+C4'")
    args = parser.parse_args()
    from stimpute.io import read_stack

    args.out.mkdir(parents=True, exist_ok=True)
    if args.cost:
        line = cost(args.data, args.out)
        (args.out / "bench_impute_cost.md").write_text(line + "\n")
        print(line)
        return
    stack = read_stack([args.data / s for s in SECTIONS])
    parts = []
    for known in [tuple(k.split("+")) for k in args.splits.split(",")]:
        start = time.perf_counter()
        out, truth, panel, top = split_predictions(stack, known, args.out / "cache", args.epochs)
        parts.append(score(stack, out, truth, known, top, time.perf_counter() - start))
        print(f"known {'+'.join(known)}: {time.perf_counter() - start:.0f} s", flush=True)
        scores = pd.concat(parts, ignore_index=True)
        scores.to_csv(args.out / "bench_impute.csv", index=False)
        report = "\n\n".join([
            f"Development split (defaults chosen here only): known {DEV_SPLIT[0]} → target {DEV_SPLIT[1]}. "
            "Cells: mean per-gene PCC over the 250-gene panel / its top-50 HVGs (both from the known section).",
            "### Against the rivals\n\n" + table(scores, MAIN),
            "### Ablations (one change each)\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in ABLATIONS.items())
            + "\n\n" + table(scores, ["asign", "msagnet (alone)", *list(ABLATIONS)[1:]]),
            "Seconds per split (everything: preparation, two MSAGNet trainings, all variants): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in scores.groupby("known", sort=False).split_seconds.first().items()),
        ])
        (args.out / "bench_impute.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
