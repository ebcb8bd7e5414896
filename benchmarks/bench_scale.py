"""Scale benchmark (issue 16): cost of `stimpute impute` per stage on Visium-size synthetic blocks.

One run: `python benchmarks/bench_scale.py --sections N --spots M --out DIR`
  generates (or reuses) a synthetic Visium block of N sections × ~M spots in `DIR/data/`
  (HEST-1k layout with pyramidal TIFFs, `stimpute.datasets.write_visium_block`), runs
  `stimpute impute` on it as a subprocess with the first section known, and writes
  - `DIR/scale.csv`: `stage,sections,spots,seconds,peak_mib`, one row per stage (read,
    features, registration, graph, training, propagation, fusion, writing; from the run's
    `timings.json`) and `total` (the whole subprocess: wall seconds, peak RSS from wait4);
  - `DIR/accuracy.csv`: imputation accuracy on the targets, mean per-gene PCC against the
    measured (noisy) counts and against the noise-free ground truth of the generator;
  - `DIR/scale.md`: both tables.

Sweep: `python benchmarks/bench_scale.py --sweep [--spots 250] --out DIR`
  runs 3 sections × 1, 4, 16 × M spots and 3, 6, 12 sections × M spots, and writes
  `DIR/sweep.csv` (same columns), `DIR/sweep_accuracy.csv`, `DIR/exponents.csv` (fitted
  growth exponent of each stage's seconds and peak MiB in spots and in sections: slope of
  log cost on log size), `DIR/sweep.md` and the log-log plot `DIR/sweep.png`; `--report`
  only summarises the rows a (cut-short) sweep left in DIR; `--runs 3x1000,12x250` runs
  only those, merging their rows into `DIR/sweep.csv`.

Sections of one spot count come from one block (the first N of the largest N needed).
`--epochs` is passed to `stimpute impute` (default: its own). The subprocess runs with
this checkout's `src/` first on `PYTHONPATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stimpute.timing import STAGES, TIMINGS_FILE  # noqa: E402

COLUMNS = ["stage", "sections", "spots", "seconds", "peak_mib"]
SPOT_FACTORS = (1, 4, 16)
SECTION_COUNTS = (3, 6, 12)


def block(data: Path, n_sections: int, spots: int, seed: int):
    """The synthetic block in `data` (reused when it has ≥ n_sections of `spots` with `seed`)."""
    from stimpute.datasets import TRUTH_FILE, BlockFiles, write_visium_block

    truth = data / TRUTH_FILE
    if truth.is_file():
        written = json.loads(truth.read_text())
        made = written["generator"]
        if (made["spots_per_section"], made["seed"]) == (spots, seed) and made["n_sections"] >= n_sections:
            ids = [s["id"] for s in written["sections"]]
            return BlockFiles(data, [data / "st" / f"{i}.h5ad" for i in ids], truth)
    t = time.perf_counter()
    files = write_visium_block(data, n_sections=n_sections, spots_per_section=spots, seed=seed, progress=True)
    print(f"wrote {n_sections} × ~{spots}-spot synthetic Visium block to {data} in {time.perf_counter() - t:.0f} s", flush=True)
    return files


def impute(files, n_sections: int, out: Path, epochs: int | None) -> tuple[float, float]:
    """Run `stimpute impute` on the first `n_sections` (first known) into a fresh `out`:
    (wall seconds, peak RSS MiB) of the subprocess."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sections = [str(p) for p in files.sections[:n_sections]]
    cmd = [sys.executable, "-m", "stimpute", "impute", *sections, "--known", files.ids[0], "--out", str(out)]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stimpute impute failed (exit {os.waitstatus_to_exitcode(status)}); see {log.name}")
    return seconds, usage.ru_maxrss / 1024


def stage_rows(out: Path, n_sections: int, spots: int, seconds: float, peak_mib: float) -> list[dict]:
    stages = json.loads((out / TIMINGS_FILE).read_text())["stages"]
    rows = [{"stage": s, "sections": n_sections, "spots": spots, "seconds": round(stages.get(s, {}).get("seconds", 0.0), 3),
             "peak_mib": round(stages.get(s, {}).get("peak_mib", 0.0), 1)} for s in STAGES]
    # the per-stage peak resets (clear_refs) also reset what wait4 reports: take the larger
    peak_mib = max(peak_mib, stages.get("total", {}).get("peak_mib", 0.0))
    return rows + [{"stage": "total", "sections": n_sections, "spots": spots, "seconds": round(seconds, 3),
                    "peak_mib": round(peak_mib, 1)}]


def accuracy(files, out: Path, n_sections: int, spots: int) -> dict:
    """Mean per-gene PCC of the imputed targets vs measured counts (metrics.csv) and vs the
    generator's noise-free expression; also the number of spots imputed."""
    import anndata as ad

    from stimpute.datasets import PROGRAMMES_KEY, block_expected_expression
    from stimpute.metrics import pearson_columns

    truth_pcc, n_spots = [], 0
    for path in files.sections[1:n_sections]:
        pred = ad.read_h5ad(out / f"{path.stem}.h5ad")
        source = ad.read_h5ad(path)
        expected = block_expected_expression(files.truth, source[pred.obs_names].obsm[PROGRAMMES_KEY], pred.var_names)
        truth_pcc.append(np.nan_to_num(pearson_columns(np.asarray(pred.X), expected)))
        n_spots += source.n_obs
    measured = pd.read_csv(out / "metrics.csv")
    all_spots = n_spots + ad.read_h5ad(files.sections[0], backed="r").n_obs
    return {"sections": n_sections, "spots": spots, "total_spots": all_spots,
            "pcc_measured": round(float(measured["pcc"].fillna(0).mean()), 4),
            "pcc_truth": round(float(np.mean(np.concatenate(truth_pcc))), 4)}


def run_one(data: Path, work: Path, n_sections: int, spots: int, seed: int, epochs: int | None, build: int | None = None):
    files = block(data, build or n_sections, spots, seed)
    out = work / f"impute_{n_sections}x{spots}"
    print(f"stimpute impute: {n_sections} sections × ~{spots} spots → {out}", flush=True)
    seconds, peak = impute(files, n_sections, out, epochs)
    rows = stage_rows(out, n_sections, spots, seconds, peak)
    acc = accuracy(files, out, n_sections, spots)
    print(f"  {seconds:.0f} s, peak {peak:.0f} MiB, per-gene PCC vs truth {acc['pcc_truth']:.3f}, "
          f"vs counts {acc['pcc_measured']:.3f}", flush=True)
    return rows, acc


def exponents(table: pd.DataFrame, by: str, fixed: dict) -> pd.DataFrame:
    """Per stage, the slope of log(seconds) and log(peak MiB) on log(`by`) with `fixed` held."""
    sub = table[np.logical_and.reduce([table[k] == v for k, v in fixed.items()])]
    rows = []
    for stage, g in sub.groupby("stage", sort=False):
        g = g[g["seconds"] > 0]
        if g[by].nunique() < 2:
            continue
        x = np.log(g[by].to_numpy(float))
        rows.append({"stage": stage, "in": by, "time_exponent": round(float(np.polyfit(x, np.log(g["seconds"]), 1)[0]), 3),
                     "memory_exponent": round(float(np.polyfit(x, np.log(g["peak_mib"]), 1)[0]), 3)})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, base_spots: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, by, fixed in ((axes[0], "spots", {"sections": SECTION_COUNTS[0]}), (axes[1], "sections", {"spots": base_spots})):
        sub = table[np.logical_and.reduce([table[k] == v for k, v in fixed.items()])]
        for stage, g in sub.groupby("stage", sort=False):
            g = g[g["seconds"] > 0].sort_values(by)
            ax.plot(g[by], g["seconds"], "o-", label=stage, lw=2.5 if stage == "total" else 1.2)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel(f"{by} ({', '.join(f'{k} = {v}' for k, v in fixed.items())})")
        ax.set_ylabel("seconds")
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle("stimpute impute cost per stage (log-log)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def markdown(title: str, frames: dict[str, pd.DataFrame]) -> str:
    lines = [f"# {title}", "", f"{os.cpu_count()} CPU cores visible; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    for name, frame in frames.items():
        lines += [f"## {name}", "", "| " + " | ".join(map(str, frame.columns)) + " |",
                  "|" + "---|" * len(frame.columns)]
        lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
                  for row in frame.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=10, help="sections in the block (first one known)")
    ap.add_argument("--spots", type=int, default=None, help="spots per section (default 4000; sweep base 250)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="MSAGNet epochs passed to stimpute impute")
    ap.add_argument("--sweep", action="store_true", help="3 sections × 1/4/16 × spots, and 3/6/12 sections")
    ap.add_argument("--report", action="store_true", help="with --sweep: only summarise the rows already in OUT")
    ap.add_argument("--runs", default=None, help="with --sweep: only these runs, e.g. 3x1000,3x4000 (rows merge into sweep.csv)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.sweep:
        spots = args.spots or 4000
        rows, acc = run_one(args.out / "data", args.out, args.sections, spots, args.seed, args.epochs)
        table, acc = pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame([acc])
        table.to_csv(args.out / "scale.csv", index=False)
        acc.to_csv(args.out / "accuracy.csv", index=False)
        (args.out / "scale.md").write_text(markdown("stimpute impute scale run", {"cost per stage": table, "accuracy": acc}))
        print(table.to_string(index=False))
        return
    base = args.spots or 250
    runs = sorted({(SECTION_COUNTS[0], base * f) for f in SPOT_FACTORS} | {(n, base) for n in SECTION_COUNTS},
                  key=lambda r: r[0] * r[1])  # cheapest first
    if args.runs:
        runs = [tuple(int(v) for v in run.split("x")) for run in args.runs.split(",")]
    if not args.report:
        sweep(args.out, base, runs, args.seed, args.epochs)
    report(args.out, base, args.seed)


def sweep(out: Path, base: int, runs: list[tuple[int, int]], seed: int, epochs: int | None) -> None:
    """Each (sections, spots) run in turn; `sweep.csv` is rewritten after each run (rows of
    runs not repeated here are kept), so a sweep cut short still leaves its rows."""
    table = out / "sweep.csv"
    rows = pd.read_csv(table).to_dict("records") if table.is_file() else []
    for n_sections, spots in runs:
        build = SECTION_COUNTS[-1] if spots == base else n_sections
        new = run_one(out / f"data_{spots}", out, n_sections, spots, seed, epochs, build)[0]
        rows = [r for r in rows if (r["sections"], r["spots"]) != (n_sections, spots)] + new
        pd.DataFrame(rows, columns=COLUMNS).to_csv(table, index=False)


def report(out: Path, base: int, seed: int) -> None:
    """Growth exponents, throughput, accuracy, the log-log plot and `sweep.md` from the runs
    in `sweep.csv` and their output folders."""
    table = pd.read_csv(out / "sweep.csv")
    runs = table[["sections", "spots"]].drop_duplicates().itertuples(index=False)
    acc = pd.DataFrame([accuracy(block(out / f"data_{m}", n, m, seed), out / f"impute_{n}x{m}", n, m) for n, m in runs])
    acc.to_csv(out / "sweep_accuracy.csv", index=False)
    fits = pd.concat([exponents(table, "spots", {"sections": SECTION_COUNTS[0]}),
                      exponents(table, "sections", {"spots": base})], ignore_index=True)
    fits.to_csv(out / "exponents.csv", index=False)
    plot(table, base, out / "sweep.png")
    wide = table.pivot_table(index=["sections", "spots"], columns="stage", values="seconds", sort=False).reset_index()
    wide["dominant"] = wide[list(STAGES)].idxmax(axis=1)
    features = table[table["stage"] == "features"].merge(acc, on=["sections", "spots"])
    speed = features.assign(patches=3 * features["total_spots"])[["sections", "spots", "patches", "seconds"]]
    speed = speed.assign(patches_per_s=(speed["patches"] / speed["seconds"]).round(1))
    (out / "sweep.md").write_text(markdown("stimpute impute scale sweep", {
        "seconds per stage": wide, "all rows (seconds, peak MiB)": table, "growth exponents": fits,
        "feature extraction (3 scales per spot)": speed, "accuracy": acc}))
    print(wide.to_string(index=False))
    print(fits.to_string(index=False))

if __name__ == "__main__":
    main()
