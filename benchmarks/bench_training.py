"""MSAGNet training cost on a Visium-size 3D spot graph, by node budget (`--batch-nodes`).

Builds a synthetic stack graph with Visium geometry (hexagonal 100 µm pitch; 6 within-
section neighbours; each spot linked to its 3 nearest spots in the next section),
random features (3 scales × 201, the handcrafted encoder's size) and a 60-gene panel
that depends on them, the first section known; then, once per budget and in a fresh
process each (clean peak memory), trains `--epochs` epochs and predicts every node:

    python benchmarks/bench_training.py --sections 3 --spots 3200 --epochs 3 --batch-nodes 20000,4000 --out DIR
    [--models 128x2,64x1]   (MSAGNet width x transformer layers, one run each)

Writes DIR/training.csv: sections, spots, nodes, batch_nodes, batches (training batches
per epoch), epochs, model, train_s / train_cpu_s (wall and CPU seconds of `fit`),
cpu_s_per_epoch, predict_s,
peak_mib (peak RSS during training and prediction, Linux VmHWM reset before), val_pcc
(mean per-gene PCC on the held-out known spots).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def visium_graph(n_sections: int, spots: int, seed: int = 0, dim: int = 201, n_genes: int = 60):
    """A `stimpute.models.msagnet_training.GraphBatch` of `n_sections` hexagonal Visium sections (first known)."""
    import torch
    from scipy.spatial import cKDTree

    from stimpute.impute import split_known
    from stimpute.models.msagnet_training import GraphBatch

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(spots)))
    r, c = np.divmod(np.arange(spots), side)
    xy = np.c_[c * 100.0 + 50.0 * (r % 2), r * 100.0 * np.sqrt(3) / 2]
    sections = [xy + rng.normal(0, 20, 2) for _ in range(n_sections)]
    edges, types, weights = [], [], []
    for s, pts in enumerate(sections):
        pairs = cKDTree(pts).query_pairs(101.0, output_type="ndarray") + s * spots
        edges += [pairs, pairs[:, ::-1]]
        types += [np.zeros(2 * len(pairs), int)]
        weights += [np.ones(2 * len(pairs))]
        if s + 1 < n_sections:
            dist, nearest = cKDTree(sections[s + 1]).query(pts, k=3)
            a = np.repeat(np.arange(spots), 3) + s * spots
            b = nearest.ravel() + (s + 1) * spots
            w = np.exp(-(dist.ravel() / 100.0) ** 2)
            edges += [np.c_[a, b], np.c_[b, a]]
            types += [np.ones(2 * len(a), int)]
            weights += [np.r_[w, w]]
    n = n_sections * spots
    programmes = np.sin(np.concatenate(sections)[:, :1] / 700.0 + np.arange(4) * 1.3)  # smooth tissue programmes
    x = rng.normal(size=(n, 3, dim)).astype(np.float32)
    x[:, :, :4] += programmes[:, None, :].astype(np.float32)
    y = (programmes @ rng.normal(size=(4, n_genes)) + 0.3 * rng.normal(size=(n, n_genes))).astype(np.float32)
    held = split_known(spots, 0.25, seed)
    train, val = np.zeros(n, bool), np.zeros(n, bool)
    train[:spots], val[:spots] = ~held, held
    pos = np.c_[np.concatenate(sections), np.repeat(np.arange(n_sections) * 10.0, spots)]
    return GraphBatch(torch.as_tensor(x), torch.as_tensor(np.concatenate(edges).T.copy()),
                      torch.as_tensor(np.concatenate(types)), torch.as_tensor(np.concatenate(weights), dtype=torch.float32),
                      torch.as_tensor(y), torch.as_tensor(train), torch.as_tensor(val),
                      torch.as_tensor(pos, dtype=torch.float32))


def run_one(n_sections: int, spots: int, epochs: int, budget: int, seed: int, model: str | None = None) -> dict:
    """Train and predict once in this process; the row of training.csv."""
    from stimpute.metrics import pearson_columns
    from stimpute.timing import proc_status_mib, reset_peak_rss
    from stimpute.models.msagnet import MSAGNetConfig
    from stimpute.models.msagnet_training import TrainConfig, fit, predict_graph, threads_for, torch_threads

    batch = visium_graph(n_sections, spots, seed)
    config = TrainConfig(max_epochs=epochs, patience=epochs, min_delta=0.0, seed=seed, batch_nodes=budget)  # every epoch runs
    if model:
        width, layers = map(int, model.split("x"))
        config = replace(config, model=MSAGNetConfig(width=width, transformer_layers=layers))
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    module = fit(batch, config)
    train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    with torch_threads(threads_for(config, len(batch.x))):
        pred = predict_graph(module.model, batch, budget).numpy()
    predict_s = time.perf_counter() - start
    data = module.trainer.datamodule
    held = batch.val_mask.numpy()
    return {"sections": n_sections, "spots": spots, "nodes": len(batch.x), "batch_nodes": budget,
            "batches": 1 if data.plan is None else len(data.plan), "epochs": epochs,
            "model": f"{config.model.width}x{config.model.transformer_layers}",
            "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu, 1), "cpu_s_per_epoch": round(train_cpu / epochs, 3),
            "predict_s": round(predict_s, 1),
            "peak_mib": round(proc_status_mib("VmHWM"), 0),
            "val_pcc": round(float(np.nanmean(pearson_columns(pred[held], batch.y.numpy()[held]))), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=3)
    ap.add_argument("--spots", type=int, default=3200, help="spots per section")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-nodes", default="20000,4000", help="comma-separated node budgets, one run each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="", help="MSAGNet sizes WIDTHxLAYERS (transformer layers), comma-separated, "
                                                 "one run each per budget, e.g. 128x2,64x1 (default: TrainConfig's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single run, row as JSON on stdout
    args = ap.parse_args()
    budgets = [int(b) for b in args.batch_nodes.split(",")]
    if args.one:
        print(json.dumps(run_one(args.sections, args.spots, args.epochs, budgets[0], args.seed, args.models or None)))
        return
    import pandas as pd

    rows = []
    for budget, model in itertools.product(budgets, args.models.split(",")):
        cmd = [sys.executable, __file__, "--one", "--sections", str(args.sections), "--spots", str(args.spots),
               "--epochs", str(args.epochs), "--batch-nodes", str(budget), "--seed", str(args.seed), "--out", str(args.out),
               "--models", model]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "training.csv", index=False)


if __name__ == "__main__":
    main()
