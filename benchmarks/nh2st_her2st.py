"""NH²2ST beside the image baselines on the shared HER2-ST sections (C2, C3, C4), both protocols.

Uses the benchmark harness (`stimpute.evaluate.run_benchmark`) on a stack prepared with
only what these methods read: the 250-HVG panel of all measured sections, their
expression, and cached handcrafted features (no registration needed). Writes
results.csv / summary.md into --out and prints the summary.

    python benchmarks/nh2st_her2st.py --out nh2st-bench [--methods nh2st ridge knn mean]
    python benchmarks/nh2st_her2st.py --nh2st emb_dim=128 max_epochs=60 patience=10   # CPU budget

`--nh2st KEY=VALUE ...` overrides NH²2ST defaults (`NH2STConfig`) for this run.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import yaml

from stimpute.data import Stack
from stimpute.benchmark import run_benchmark
from stimpute.expression import panel_expression, select_panel
from stimpute.features import spot_features
from stimpute.io import read_section
from stimpute.models import METHODS, load_methods
from stimpute.prepare import PreparedStack

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "her2st")
    parser.add_argument("--cache", type=Path, default=ROOT / "features", help="feature cache folder")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "nh2st-bench")
    parser.add_argument("--methods", nargs="+", default=["nh2st", "ridge", "knn", "mean"])
    parser.add_argument("--protocols", nargs="+", default=["3d", "2d"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nh2st", nargs="*", default=[], metavar="KEY=VALUE", help="NH2STConfig overrides")
    args = parser.parse_args()
    load_methods()
    if args.nh2st:
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.nh2st)}
        METHODS["nh2st"] = functools.partial(METHODS["nh2st"], **overrides)
    stack = Stack([read_section(args.data / name) for name in ("C2", "C3", "C4")])
    panel = select_panel([s.adata for s in stack], n_top=250)
    prepared = PreparedStack(stack, panel, [panel_expression(s, panel) for s in stack],
                             [spot_features(s, cache_dir=args.cache, progress=True) for s in stack],
                             settings={"encoder": "handcrafted"})
    result = run_benchmark(prepared, args.out, args.methods, args.protocols, seed=args.seed, force=True,
                           progress=True, settings={"script": "benchmarks/nh2st_her2st.py", "nh2st": args.nh2st})
    print(result.files["summary"].read_text())
    ok = result.results[result.results.status == "ok"]
    print(ok.groupby(["protocol", "known", "target", "method"]).pcc.mean().unstack("method").round(3).to_string())


if __name__ == "__main__":
    main()
