"""3DMoEST on the shared HER2-ST stack: fit on one known section, figures for the others.

    python benchmarks/moe3d_her2st.py [--known C3] [--out benchmarks/results/moe3d] [--cache DIR]

Prints a markdown table (per-gene PCC over the 250-gene panel and its top-50 HVGs, MSE,
MAE, seconds) for moe3d and ridge on the same features, and writes `routing_map.png`
(which expert each spot used) and `heatmaps_<section>.png` (measured vs predicted).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from stimpute.metrics import gene_metrics, summarise_pcc
from stimpute.prepare import top_hvg_genes
from stimpute.io import read_stack
from stimpute.models import get_method, load_methods
from stimpute.figures import expression_heatmaps, routing_map
from stimpute.prepare import prepare_stack

REPO = Path(__file__).resolve().parents[1]
HER2ST = REPO.parent / "shared" / "data" / "her2st"
HEATMAP_GENES = ("ERBB2", "GNAS", "MGP")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--known", default="C3")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "moe3d")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: OUT/features)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stack = read_stack([HER2ST / name for name in ("C2", "C3", "C4")])
    prepared = prepare_stack(stack, known=args.known, cache_dir=args.cache or args.out / "features", progress=True)
    known = [stack.index(args.known)]
    targets = [i for i in range(len(stack)) if i not in known and prepared.expression[i] is not None]
    hvg = [prepared.panel.index(g) for g in top_hvg_genes(prepared)]
    load_methods()
    rows, moe3d = [], None
    for name in ("moe3d", "ridge"):
        method = get_method(name)
        start = time.perf_counter()
        pred = method.fit_predict(prepared, known, targets, seed=args.seed)
        seconds = time.perf_counter() - start
        moe3d = method if name == "moe3d" else moe3d
        for t in targets:
            m = gene_metrics(pred[t], prepared.expression[t], prepared.panel)
            rows.append((name, stack[t].name, summarise_pcc(m.pcc), summarise_pcc(m.pcc.iloc[hvg]), m.mse.mean(), m.mae.mean(), seconds))
            if name == "moe3d":
                _heatmaps(prepared, t, pred[t], args.out)
    print(f"known {args.known}; per-gene PCC across spots (mean ± sd)\n")
    print("| method | target | PCC panel (250) | PCC top-50 HVG | MSE | MAE | seconds (fit + predict) |")
    print("|---|---|---|---|---|---|---|")
    for name, target, panel, top, mse, mae, seconds in rows:
        print(f"| {name} | {target} | {panel.mean:.3f} ± {panel.sd:.3f} | {top.mean:.3f} ± {top.sd:.3f} | {mse:.3f} | {mae:.3f} | {seconds:.1f} |")
    shown = sorted(moe3d.routing_)
    thumbs = [stack[i].image.thumbnail(800) for i in shown]
    path = routing_map([t for t, _ in thumbs], [stack[i].xy * s for i, (_, s) in zip(shown, thumbs)],
                       [moe3d.routing_[i] for i in shown],
                       [f"{stack[i].name} ({'known' if i in known else 'target'})" for i in shown], args.out / "routing_map.png")
    print(f"\nrouting map: {path}")


def _heatmaps(prepared, t: int, pred: np.ndarray, out: Path) -> None:
    section = prepared.stack[t]
    genes = [g for g in HEATMAP_GENES if g in prepared.panel] or list(prepared.panel[:3])
    cols = [prepared.panel.index(g) for g in genes]
    thumb, scale = section.image.thumbnail(800)
    expression_heatmaps(thumb, section.xy * scale, genes, pred[:, cols], out / f"heatmaps_{section.name}.png",
                        measured=prepared.expression[t][:, cols], title=f"moe3d · {section.name}")


if __name__ == "__main__":
    main()
