"""Metrics for predicted expression, named by what they average over.

Papers in this field report several incompatible "PCC"s. stimpute's headline is the
**per-gene PCC**: for each gene, Pearson correlation across spots (does the map look
right?). The ASIGN paper reports the **per-spot PCC**: for each spot, correlation across
genes, averaged over spots; it runs far higher because genes differ in mean level. Both
are computed here, always under these names.

The benchmark harness (`run_benchmark`) runs every registered method under two protocols
(`protocol_splits`: 3D imputation from one known layer, 2D leave-one-section-out), scores
every split, records failures per split instead of stopping, and writes `results.csv`,
`spots.csv`, `splits.json` and `summary.md`.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stimpute import __version__
from stimpute.errors import StimputeError
from stimpute.files import atomic_write, write_text_atomic
from stimpute.models import METHOD_ALIASES, METHODS, NotApplicable, current_name, get_method, load_methods
from stimpute.prepare import PreparedStack, top_hvg_genes
from stimpute.metrics import Summary, gene_metrics, paired_test, pearson_columns, spot_pcc, summarise_pcc  # noqa: F401  (re-exported)
from stimpute.prepare import with_known_panel


# --------------------------------------------------------------------------- protocols

PROTOCOLS = ("3d", "2d")
METHOD_ORDER = ("asign", "asign_model", "msagnet_3d", "msagnet_2d", "propagation", "composite", "transfer", "overlap", "similarity", "ridge", "knn", "mean")
RESULT_COLUMNS = ["method", "protocol", "known", "target", "gene", "pcc", "mse", "mae",
                  "status", "error", "seconds", "peak_mib", "top50"]


@dataclass(frozen=True)
class Split:
    """One run of a method: learn from the `known` sections, predict the `targets`.

    `3d` (ASIGN's setting): one measured section is known, every other measured section is
    a target; the method may read the known layer through the 3D graph. `2d`:
    leave-one-section-out on images only; 3D information is withheld.
    """

    protocol: str
    known: tuple[int, ...]
    targets: tuple[int, ...]


def protocol_splits(prepared: PreparedStack, protocol: str) -> list[Split]:
    """Every split of `protocol` over the sections of `prepared` that carry expression."""
    measured = [i for i, e in enumerate(prepared.expression) if e is not None]
    if len(measured) < 2:
        raise StimputeError(None, f"a benchmark needs at least two measured sections; got {len(measured)}")
    if protocol == "3d":
        return [Split("3d", (k,), tuple(t for t in measured if t != k)) for k in measured]
    if protocol == "2d":
        return [Split("2d", tuple(k for k in measured if k != t), (t,)) for t in measured]
    raise StimputeError("--protocols", f"unknown protocol {protocol!r} (use {' or '.join(PROTOCOLS)})")


def image_only(prepared: PreparedStack) -> PreparedStack:
    """The 2D protocol's view: no registration, no cross-layer edges (within-section kept)."""
    graph = prepared.graph
    if graph is not None and getattr(graph, "edge_type", None) is not None:
        graph = graph.edge_subgraph(graph.edge_type == 0)
    return replace(prepared, coords_ref=None, graph=graph, settings={**prepared.settings, "protocol": "2d"})


def default_methods() -> list[str]:
    """Every registered method, the paper's order first."""
    load_methods()
    return [m for m in METHOD_ORDER if m in METHODS] + sorted(set(METHODS) - set(METHOD_ORDER))


# --------------------------------------------------------------------------- measuring


class ResourceMeter:
    """Wall-clock seconds and peak resident-memory growth (MiB) of a block.

    Memory is the largest RSS of the process seen while the block runs (psutil, sampled
    every `interval` seconds by a background thread, and at both ends) minus its RSS on
    entry, so it counts numpy and torch alike on any OS psutil supports; a peak shorter
    than one interval can be missed. NaN where the process's memory cannot be read.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval

    def __enter__(self) -> "ResourceMeter":
        import psutil

        self.seconds = float("nan")
        try:
            self._process = psutil.Process()
        except (psutil.Error, OSError):  # no /proc (or its equivalent) to read
            self._process = None
        self._base = self._peak = self._rss()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self._start = time.perf_counter()
        return self

    def _rss(self) -> float:
        import psutil

        try:
            return float(self._process.memory_info().rss) if self._process else float("nan")
        except (psutil.Error, OSError):
            return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._sampler.join()
        self._peak = max(self._peak, self._rss())

    @property
    def peak_mib(self) -> float:
        return max(0.0, (self._peak - self._base) / 2**20) if np.isfinite(self._peak - self._base) else float("nan")


# --------------------------------------------------------------------------- running


@dataclass
class BenchmarkResult:
    """Per-gene rows (`results.csv`), per-spot PCC rows (`spots.csv`), the summary table."""

    results: pd.DataFrame
    spots: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path]


def run_split(prepared: PreparedStack, name: str, split: Split, seed: int = 0,
              accelerator: str = "cpu", parallel: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run one method on one split and score each target: per-gene rows and per-spot rows.
    `accelerator` and `parallel` (`devices`, `num_nodes`, `strategy`): Lightning's, for the
    methods that train with Lightning (`Method.on_device`).

    Any exception is caught and recorded on the rows (`status` failed / not_applicable,
    `error`), so one broken method or split never loses the others.
    """
    names = prepared.stack.names
    known = "+".join(names[i] for i in split.known)
    predictions, status, error = {}, "ok", ""
    with ResourceMeter() as meter:
        try:
            method = get_method(name).on_device(accelerator, **(parallel or {}))
            if split.protocol == "2d" and method.needs_3d:
                raise NotApplicable("a 3D method: the 2D protocol gives images only")
            predictions = method.fit_predict(prepared, list(split.known), list(split.targets), seed=seed)
        except NotApplicable as exc:
            status, error = "not_applicable", str(exc)
        except Exception as exc:  # recorded, not raised: the grid must complete
            status, error = "failed", f"{type(exc).__name__}: {exc}"
    gene_rows, spot_rows = [], []
    for t in split.targets:
        truth = prepared.expression[t]
        target_status, target_error = status, error
        pred = predictions.get(t) if status == "ok" else None
        if status == "ok" and (pred is None or np.shape(pred) != truth.shape):
            target_status = "failed"
            target_error = f"prediction for {names[t]} has shape {np.shape(pred) if pred is not None else None}, expected {truth.shape}"
        if target_status == "ok":
            rows = gene_metrics(pred, truth, prepared.panel)
            spot_rows.append(pd.DataFrame({"spot": prepared.stack[t].spot_ids, "pcc": spot_pcc(pred, truth)}).assign(target=names[t]))
        else:
            rows = pd.DataFrame({"gene": [""], "pcc": [np.nan], "mse": [np.nan], "mae": [np.nan]})
        gene_rows.append(rows.assign(target=names[t], status=target_status, error=target_error))
    meta = {"method": name, "protocol": split.protocol, "known": known}
    genes = pd.concat(gene_rows, ignore_index=True).assign(**meta, seconds=meter.seconds, peak_mib=meter.peak_mib)
    genes["top50"] = genes.gene.isin(top_hvg_genes(prepared, split.known))
    spots = pd.concat(spot_rows, ignore_index=True).assign(**meta) if spot_rows else pd.DataFrame()
    return genes[RESULT_COLUMNS], spots


def run_benchmark(
    prepared: PreparedStack,
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    protocols: Sequence[str] = PROTOCOLS,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
    settings: dict | None = None,
    accelerator: str = "cpu",
    parallel: dict | None = None,
) -> BenchmarkResult:
    """Run the protocol × method grid on `prepared` and write into `out_dir`:
    `results.csv` (one row per method, protocol, split, target and gene), `spots.csv`
    (the ASIGN paper's per-spot PCC), `splits.json` (to rerun), `summary.md`.

    `settings` (e.g. the command line) are recorded in `splits.json` and `summary.md`;
    `accelerator` ("cpu" or "cuda") and `parallel` (`devices`, `num_nodes`, `strategy`) are
    Lightning's for the methods that train with it.
    The files are rewritten after every split, so an interrupted run keeps what it finished.
    """
    out_dir = Path(out_dir)
    methods, protocols = check_benchmark(out_dir, methods, protocols, force)
    views = {(protocol, split): with_known_panel(prepared if protocol == "3d" else image_only(prepared), split.known)
             for protocol in protocols for split in protocol_splits(prepared, protocol)}
    grid = [(name, view, split) for (_, split), view in views.items() for name in methods]
    record = {"stimpute_version": __version__, **(settings or {}), "seed": seed, "sections": prepared.stack.names, "methods": methods,
              "protocols": {p: [_split_json(views[p, s], s) for s in protocol_splits(prepared, p)] for p in protocols},
              "panel_rule": "per split: top HVGs of its known sections; top-50: their most variable panel genes",
              "prepared": prepared.settings}
    gene_parts, spot_parts, result = [], [], None
    with _progress(progress) as bar:
        task = bar.add_task("benchmark", total=len(grid)) if bar else None
        for name, view, split in grid:
            if bar:
                bar.update(task, description=f"{name} · {split.protocol} · {_split_label(prepared, split)}")
            genes, spots = run_split(view, name, split, seed, accelerator, parallel)
            gene_parts.append(genes)
            spot_parts.append(spots)
            result = write_benchmark(out_dir, gene_parts, spot_parts, record)  # a killed run keeps its splits
            if bar:
                bar.advance(task)
    return result


def write_benchmark(out_dir: Path, gene_parts: list[pd.DataFrame], spot_parts: list[pd.DataFrame],
                    record: dict) -> BenchmarkResult:
    """Summarise the splits run so far and (re)write every output file atomically."""
    results = pd.concat(gene_parts, ignore_index=True)
    spot_columns = ["method", "protocol", "known", "target", "spot", "pcc"]
    spots = pd.concat([s[spot_columns] for s in spot_parts if len(s)] or [pd.DataFrame(columns=spot_columns)],
                      ignore_index=True)
    summary = summarise_benchmark(results, spots)
    files = {
        "results": _write_csv(out_dir / "results.csv", results),
        "spots": _write_csv(out_dir / "spots.csv", spots),
        "splits": write_text_atomic(out_dir / "splits.json", json.dumps(record, indent=1, default=str) + "\n"),
        "summary": write_text_atomic(out_dir / "summary.md", summary_markdown(summary, record)),
    }
    return BenchmarkResult(results, spots, summary, files)


def check_benchmark(out_dir: Path, methods: Sequence[str] | None, protocols: Sequence[str],
                    force: bool = False) -> tuple[list[str], list[str]]:
    """Validate the grid and the output folder before any expensive work; return the
    method names (default: every registered method) and protocols."""
    if (Path(out_dir) / "results.csv").exists() and not force:
        raise StimputeError(out_dir, "already holds benchmark results; pass --force to overwrite them")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise StimputeError("--protocols", f"unknown protocol(s) {', '.join(unknown) or '(none given)'} (use {' and/or '.join(PROTOCOLS)})")
    if not methods or not set(methods) <= set(METHODS):
        load_methods()  # torch methods are imported only when asked for
    methods = [current_name(m, METHOD_ALIASES, "method") for m in methods] if methods else default_methods()
    for name in methods:
        get_method(name)  # unknown names fail here, naming the available ones
    return methods, list(protocols)


# --------------------------------------------------------------------------- summarising


def summarise_benchmark(results: pd.DataFrame, spots: pd.DataFrame) -> pd.DataFrame:
    """One row per method × protocol: per-gene PCC (panel, top HVGs of each split), per-spot
    PCC, MSE, MAE, paired Wilcoxon p against the protocol's best method, seconds, peak memory."""
    rows = []
    for (protocol, method), group in results.groupby(["protocol", "method"], sort=False):
        ok = group[group.status == "ok"]
        runs = group.drop_duplicates(["known"])
        pcc, top = summarise_pcc(ok.pcc), summarise_pcc(ok.pcc[ok.top50.astype(bool)])
        spot = summarise_pcc(spots.pcc[(spots.method == method) & (spots.protocol == protocol)]) if len(spots) else None
        n_bad = int((group.status != "ok").sum())
        rows.append({
            "method": method, "protocol": protocol,
            "pcc": pcc.mean, "pcc_sd": pcc.sd, "undefined": pcc.n_undefined, "n_values": pcc.n_genes,
            "pcc_hvg": top.mean, "pcc_hvg_sd": top.sd,
            "spot_pcc": spot.mean if spot and spot.n_genes else np.nan,
            "spot_pcc_sd": spot.sd if spot and spot.n_genes else np.nan,
            "mse": ok.mse.mean(), "mae": ok.mae.mean(),
            "seconds": runs.seconds.sum(), "peak_mib": runs.peak_mib.max(),
            "status": "ok" if not n_bad else _status_note(group),  # e.g. "failed on 2/6 targets: <error>"
        })
    summary = pd.DataFrame(rows)
    summary["wilcoxon_p"], summary["best"] = np.nan, False
    for protocol, part in summary[summary.n_values > 0].groupby("protocol"):
        best = part.loc[part.pcc.idxmax(), "method"]
        ok = results[(results.protocol == protocol) & (results.status == "ok")]
        for idx, method in part.method.items():
            if method == best:
                summary.loc[idx, "best"] = True
            else:
                summary.loc[idx, "wilcoxon_p"] = paired_test(ok[ok.method == method], ok[ok.method == best])
    return summary


def _status_note(group: pd.DataFrame) -> str:
    bad = group[group.status != "ok"].drop_duplicates(["known", "target"])
    first = bad.iloc[0]
    status = first.status.replace("_", " ")
    return f"{status} on {len(bad)}/{group.drop_duplicates(['known', 'target']).shape[0]} targets: {first.error}"


def summary_markdown(summary: pd.DataFrame, record: dict) -> str:
    """The benchmark table in markdown, with what every column means and where it came from."""
    lines = [
        "# stimpute benchmark",
        "",
        f"Sections {', '.join(record['sections'])}; seed {record['seed']}; "
        + (f"command `{record['command']}`; " if record.get("command") else "")
        + (f"{record['date']}; " if record.get("date") else "")
        + (f"{record['machine']}." if record.get("machine") else ""),
        "",
        "- **per-gene PCC**: Pearson r across the spots of a target section for each gene, mean ± sd "
        "over genes × targets × splits (stimpute's headline; undefined r, from a constant prediction "
        "or truth, counted as 0 — count in *undef.*). *top-50 HVG*: the same over the 50 most variable panel genes.",
        "- **per-spot PCC (ASIGN paper's metric)**: Pearson r across genes for each spot, mean ± sd over spots; "
        "runs far higher than per-gene PCC because genes differ in level.",
        "- **MSE / MAE**: per gene over spots (log1p scale), averaged. **Wilcoxon p**: signed-rank test of the "
        "per-gene PCCs against the protocol's best method (**bold**), paired on split, target and gene.",
        "- Each split's panel and top-50 genes come from its known sections only.",
        "- **s**: wall-clock seconds of fit + predict summed over splits. **peak MiB**: largest growth of "
        "resident memory (Linux peak RSS) during one split.",
        "- Protocols: **3d** = each measured section in turn known, the others imputed (ASIGN's setting); "
        "**2d** = leave-one-section-out, images only.",
        "",
        "| method | protocol | per-gene PCC | per-gene PCC top-50 HVG | per-spot PCC (ASIGN paper) | MSE | MAE "
        "| Wilcoxon p vs best | undef. | s | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        if row.n_values == 0:
            lines.append(f"| {row.method} | {row.protocol} | – | – | – | – | – | – | – | {row.seconds:.1f} | – | {_md(row.status)} |")
            continue
        name = f"**{row.method}**" if row.best else row.method
        p = "best" if row.best else (f"{row.wilcoxon_p:.2g}" if row.wilcoxon_p > 1e-300 else "<1e-300")
        lines.append(
            f"| {name} | {row.protocol} | {row.pcc:.3f} ± {row.pcc_sd:.3f} | {row.pcc_hvg:.3f} ± {row.pcc_hvg_sd:.3f} "
            f"| {row.spot_pcc:.3f} ± {row.spot_pcc_sd:.3f} | {row.mse:.3f} | {row.mae:.3f} | {p} "
            f"| {row.undefined}/{row.n_values} | {row.seconds:.1f} | {row.peak_mib:.0f} | {_md(row.status)} |"
        )
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:160]


def _split_label(prepared: PreparedStack, split: Split) -> str:
    names = prepared.stack.names
    return f"{'+'.join(names[i] for i in split.known)} → {'+'.join(names[i] for i in split.targets)}"


def _split_json(prepared: PreparedStack, split: Split) -> dict:
    names = prepared.stack.names
    return {"known": [names[i] for i in split.known], "targets": [names[i] for i in split.targets],
            "panel": list(prepared.panel), "top_hvg": top_hvg_genes(prepared, split.known)}


def _write_csv(path: Path, frame: pd.DataFrame) -> Path:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))
