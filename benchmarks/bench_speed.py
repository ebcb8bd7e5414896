"""Speed against a git ref (issue 28): the same `stimpute impute` runs on this tree and on REF,
interleaved, so that a busy machine slows both alike and the ratio decides, not the clock.

Run: `python benchmarks/bench_speed.py --baseline 9be9671 [--reps 3] [--skip-block] [--out DIR]`

Workloads, each run from scratch (a fresh --out, so features are computed) as a subprocess
with the tree's `src/` on PYTHONPATH:
- `five`: the five-section HER2-ST stack, C2, C3, C4 and renamed copies of C2 and C4 (C5,
  C6) as `bench_impute.py --cost` makes them, C4 known;
- `block`: the synthetic 10 × 4,000-spot Visium block of `bench_scale.py`, first section
  known (many minutes a run; `--skip-block` leaves it out).

REF is checked out as a detached `git worktree` under DIR/ref-tree (kept for reruns). Each
repetition runs every workload on both trees, the order of the trees swapped from one
repetition to the next. Per workload and tree: wall seconds, CPU seconds (user + system of
the process and its workers) and peak RSS from `wait4`, and the stage seconds of the run's
`timings.json`, wall and CPU (`<stage>_cpu_s`: the process's, every thread's, while the stage ran). The ratio of a stage is this tree / REF within one repetition; the table
gives its median over the repetitions and the range (min–max) as the spread.

Writes DIR/bench_speed.csv (one row per run and measure, after every run) and
DIR/bench_speed.md (the table); `--report` writes the table from the rows a cut-short run left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_impute import five_sections  # noqa: E402
from stimpute.timing import STAGES, TIMINGS_FILE  # noqa: E402

BLOCK = (10, 4000)  # sections × spots per section of the Visium block


def run_impute(src: Path, sections: list[Path], known: str, out: Path, log: Path) -> dict:
    """`stimpute impute SECTIONS --known KNOWN --out OUT` with `src` first on PYTHONPATH, in
    a fresh `out`: wall and CPU seconds, peak RSS (MiB) and the stage wall and CPU seconds of its timings.json."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "stimpute", "impute", *map(str, sections), "--known", known, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stimpute impute failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    stages = json.loads((out / TIMINGS_FILE).read_text())["stages"]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            # per-stage peak resets (clear_refs) also reset what wait4 sees: take the larger
            "peak_mib": max(usage.ru_maxrss / 1024, stages.get("total", {}).get("peak_mib", 0.0)),
            **{s: stages.get(s, {}).get("seconds", 0.0) for s in STAGES},
            # CPU seconds of the process (every thread) while the stage ran: steadier than wall on a busy
            # machine; absent where a tree's timings.json does not record them (before 26010ac)
            **{f"{s}_cpu_s": stages[s]["user_s"] + stages[s]["sys_s"] for s in STAGES if "user_s" in stages.get(s, {})}}


def ref_tree(ref: str, folder: Path) -> Path:
    """A detached git worktree of `ref` at `folder` (reused when it is already at that commit)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {ref}: not a commit of {ROOT}")
    sha = commit.stdout.strip()
    if (folder / ".git").exists():
        here = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if here == sha:
            return folder
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), sha], check=True,
                   capture_output=True)
    return folder


def workloads(data: Path, out: Path, skip_block: bool) -> dict[str, tuple[list[Path], str]]:
    """name -> (sections, known section) of each workload."""
    loads = {"five": (five_sections(data, out / "data" / "five"), "C4")}
    if not skip_block:
        from bench_scale import block

        files = block(out / "data" / "block", *BLOCK, seed=0)
        loads["block"] = (files.sections[: BLOCK[0]], files.ids[0])
    return loads


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per workload and measure: median of each tree over the repetitions, and the ratio
    (this tree / REF, paired by repetition): median and range."""
    rows = []
    for (load, measure), g in runs.groupby(["workload", "measure"], sort=False):
        wide = g.pivot(index="rep", columns="tree", values="value").reindex(columns=["this", "ref"])
        ratio = (wide["this"] / wide["ref"]).dropna()
        this, ref = (wide[tree].dropna() for tree in ("this", "ref"))
        rows.append({"workload": load, "measure": measure, **{k: v.median() if len(v) else np.nan for k, v in
                                                             (("this", this), ("ref", ref), ("ratio", ratio))},
                     "ratio_min": ratio.min(), "ratio_max": ratio.max(), "reps": len(ratio)})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, ref: str, reps: int) -> str:
    lines = [f"# stimpute impute: this tree against {ref}", "",
             f"{reps} interleaved repetitions; {os.cpu_count()} CPU cores visible; load average "
             f"{os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "Seconds and MiB are medians over the repetitions; ratio = this / ref within a repetition "
             "(median, and min–max over the repetitions).", ""]
    for load, g in table.groupby("workload", sort=False):
        lines += [f"## {load}", "", "| measure | this | ref | ratio | spread |", "|---|---|---|---|---|"]
        lines += [f"| {r.measure} | {_cell(r.this, '.1f')} | {_cell(r.ref, '.1f')} | {_cell(r.ratio, '.2f')} | "
                  f"{'—' if pd.isna(r.ratio_min) else f'{r.ratio_min:.2f}–{r.ratio_max:.2f}'} |"
                  for r in g.itertuples() if r.ref > 0 or r.this > 0]
        lines.append("")
    return "\n".join(lines)


def _cell(value: float, spec: str) -> str:
    """A table cell: `value` formatted, or — where a tree did not record it."""
    return "—" if pd.isna(value) else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git ref to compare against, e.g. 9be9671 or main")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each workload on each tree")
    ap.add_argument("--skip-block", action="store_true", help="leave out the 10 × 4,000-spot Visium block")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("STIMPUTE_HER2ST", ROOT.parent / "shared/data/her2st")))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/speed")
    ap.add_argument("--report", action="store_true", help="only write the table from the runs in DIR/bench_speed.csv")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(pd.read_csv(args.out / "bench_speed.csv"), args)
    trees = {"this": ROOT / "src", "ref": ref_tree(args.baseline, args.out / "ref-tree") / "src"}
    loads = workloads(args.data, args.out, args.skip_block)
    records = []
    for rep in range(args.reps):
        order = list(trees) if rep % 2 == 0 else list(trees)[::-1]
        for load, (sections, known) in loads.items():
            for tree in order:
                run = args.out / "runs" / f"{load}-{tree}-{rep}"
                result = run_impute(trees[tree], sections, known, run, run.with_suffix(".log"))
                print(f"rep {rep} {load} {tree}: {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU, "
                      f"peak {result['peak_mib']:.0f} MiB", flush=True)
                records += [{"workload": load, "tree": tree, "rep": rep, "measure": m, "value": v} for m, v in result.items()]
                shutil.rmtree(run)  # the outputs are not compared here; the next run starts from scratch too
                runs = pd.DataFrame(records)
                runs.to_csv(args.out / "bench_speed.csv", index=False)  # after every run: a cut-short one keeps its rows
    report(runs, args)


def report(runs: pd.DataFrame, args) -> None:
    """Write and print DIR/bench_speed.md from the runs."""
    text = markdown(summary(runs), args.baseline, runs["rep"].nunique())
    (args.out / "bench_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
