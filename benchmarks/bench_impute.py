"""ASIGN acceptance benchmark on the shared HER2-ST sections C2, C3, C4.

1. Cost: wall time and peak RSS of `stimpute impute C2 C3 C4 --known C3` from scratch
   (fresh output folder, no feature cache), pinned to 2 CPU cores. Target: < 10 min, < 6 GB.
2. Accuracy, each section known in turn, the others targets, 250-HVG panel of the known
   section: mean per-gene PCC over the panel and its top-50 HVGs (of the known section)
   for (a) asign (fused), (b) msagnet alone, (c) propagation alone, (d) ridge on the same
   features, (e) per-gene mean of the known section; Welch t-tests of (a) against each,
   over the top-50 genes of both targets pooled; the paper's per-spot PCC for reference.

Run: `python benchmarks/bench_impute.py [--data ../shared/data/her2st] [--out bench-impute]`
Writes `OUT/bench_impute.md` and prints it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SECTIONS = ("C2", "C3", "C4")
METHODS = {"asign": "(a) asign fused", "msagnet": "(b) model alone", "propagation": "(c) propagation alone",
           "ridge": "(d) ridge, same features", "mean": "(e) mean of known"}


def cost(data: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of the impute command on 2 cores."""
    target = out / "impute_C3"
    shutil.rmtree(target, ignore_errors=True)
    pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") else []
    cmd = [*pin, shutil.which("stimpute") or "stimpute", "impute", *[str(data / s) for s in SECTIONS],
           "--known", "C3", "--out", str(target)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2


def accuracy(data: Path, out: Path) -> list[str]:
    """Markdown rows: per known section and method, panel/top-50 PCC and Welch vs asign."""
    from stimpute.evaluate import gene_metrics, spot_pcc, summarise_pcc, welch_test
    from stimpute.expression import top_variable
    from stimpute.io import read_stack
    from stimpute.models import get_method, load_methods
    from stimpute.prepare import prepare_stack

    load_methods()
    stack = read_stack([data / s for s in SECTIONS])
    rows = []
    for known in SECTIONS:
        prepared = prepare_stack(stack, known=known, cache_dir=out / "features")
        k = stack.index(known)
        targets = [i for i in range(len(stack)) if i != k]
        top = top_variable(prepared.expression[k], 50)
        pcc, spot = {}, {}
        for name in METHODS:
            pred = get_method(name).fit_predict(prepared, [k], targets, seed=0)
            per = [gene_metrics(pred[t], prepared.expression[t], prepared.panel).pcc.to_numpy() for t in targets]
            pcc[name] = (np.concatenate(per), np.concatenate([p[top] for p in per]))
            spot[name] = np.nanmean(np.concatenate([spot_pcc(pred[t], prepared.expression[t]) for t in targets]))
        for name, label in METHODS.items():
            panel, top50 = summarise_pcc(pcc[name][0]), summarise_pcc(pcc[name][1])
            welch = "" if name == "asign" else "t = {:.2f}, p = {:.2g}".format(*welch_test(pcc["asign"][1], pcc[name][1]))
            rows.append(f"| {known} | {label} | {panel.mean:.3f} | {panel.median:.3f} | {top50.mean:.3f} | "
                        f"{top50.median:.3f} | {welch} | {spot[name]:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st")
    parser.add_argument("--out", type=Path, default=Path("bench-impute"))
    parser.add_argument("--skip-cost", action="store_true", help="Only the accuracy table.")
    args = parser.parse_args()
    if not (args.data / "C3").is_dir():
        sys.exit(f"HER2-ST sections not found in {args.data}")
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# stimpute impute on HER2-ST C2/C3/C4", ""]
    if not args.skip_cost:
        seconds, rss = cost(args.data, args.out)
        lines += ["| command | wall time | peak RSS |", "|---|---|---|",
                  f"| `stimpute impute C2 C3 C4 --known C3` (2 cores, no cache) | {seconds / 60:.1f} min | {rss:.2f} GB |", ""]
    lines += ["Per-gene PCC across spots over both targets pooled (250-HVG panel; top-50 = HVGs of the known "
              "section); Welch t-test of asign vs each method over the top-50 genes; last column: the ASIGN "
              "paper's metric (PCC per spot across genes).", "",
              "| known | method | panel mean | panel median | top-50 mean | top-50 median | Welch vs asign (top-50) | per-spot PCC |",
              "|---|---|---|---|---|---|---|---|", *accuracy(args.data, args.out)]
    text = "\n".join(lines) + "\n"
    (args.out / "bench_impute.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
