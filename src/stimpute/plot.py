"""Figures. Plotting never computes: functions take finished tables/arrays and write files.

Built on matplotlib's object API (`Figure`, no pyplot state), so it needs no display and
is safe to call from any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stimpute.io.anndata_io import _atomic_write


def pcc_boxplot(results: pd.DataFrame, path: str | Path, methods: Sequence[str] | None = None) -> Path:
    """Box plot of per-gene PCC per method, one panel per protocol (like ASIGN's Figure 4).

    `results`: rows `method, protocol, pcc, status` (benchmark `results.csv`); only `ok`
    rows are drawn, undefined PCCs (constant prediction or truth) as 0, as in the means.
    """
    ok = results[results.status == "ok"]
    protocols = list(dict.fromkeys(results.protocol))
    methods = list(methods) if methods else list(dict.fromkeys(results.method))
    fig = Figure(figsize=(1.1 * len(methods) * len(protocols) + 2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(protocols), sharey=True, squeeze=False)[0]
    for ax, protocol in zip(axes, protocols):
        part = ok[ok.protocol == protocol]
        shown = [m for m in methods if (part.method == m).any()]
        values = [np.nan_to_num(part.pcc[part.method == m].to_numpy(float), nan=0.0) for m in shown]
        if shown:
            ax.boxplot(values, tick_labels=shown, showmeans=True, flierprops={"markersize": 2})
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(f"{protocol} protocol")
        ax.tick_params(axis="x", labelrotation=45)
    axes[0].set_ylabel("per-gene PCC across spots (▲ mean)")
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    return path


def expression_heatmaps(thumbnail: np.ndarray, xy: np.ndarray, genes: Sequence[str], predicted: np.ndarray,
                        path: str | Path, measured: np.ndarray | None = None, title: str = "") -> Path:
    """Predicted (and measured) expression of `genes` as spots on the tissue thumbnail.

    `xy`: spot centres in thumbnail pixels; `predicted`/`measured`: (n_spots, len(genes)).
    One row per gene; measured and predicted share the colour scale of their gene.
    """
    columns = [("predicted", predicted)] if measured is None else [("measured", measured), ("predicted", predicted)]
    fig = Figure(figsize=(3.2 * len(columns) + 0.6, 3.0 * len(genes)), layout="constrained")
    axes = fig.subplots(len(genes), len(columns), squeeze=False)
    size = max(4.0, 9000.0 / max(len(xy), 1))
    for g, gene in enumerate(genes):
        lo = min(float(np.min(v[:, g])) for _, v in columns)
        hi = max(float(np.max(v[:, g])) for _, v in columns)
        for ax, (label, values) in zip(axes[g], columns):
            ax.imshow(thumbnail)
            dots = ax.scatter(xy[:, 0], xy[:, 1], c=values[:, g], s=size, cmap="viridis", vmin=lo, vmax=hi, linewidths=0)
            ax.set_title(f"{gene} · {label}", fontsize=9)
            ax.set_axis_off()
        fig.colorbar(dots, ax=axes[g].tolist(), shrink=0.8, label="log1p expression")
    if title:
        fig.suptitle(title)
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png"))
    return path


def routing_map(thumbnails: Sequence[np.ndarray], xys: Sequence[np.ndarray], gates: Sequence[np.ndarray],
                titles: Sequence[str], path: str | Path) -> Path:
    """Which expert each spot used (3DMoEST): one panel per section, spots on the tissue
    thumbnail coloured by their top-weighted expert, more opaque the larger its gate.

    `xys[i]`: spot centres in thumbnail pixels of section i; `gates[i]`: (n_spots, n_experts).
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    n_experts = gates[0].shape[1]
    colours = colormaps["tab10" if n_experts <= 10 else "tab20"](np.arange(n_experts))
    fig = Figure(figsize=(3.6 * len(titles) + 1.4, 3.8), layout="constrained")
    axes = fig.subplots(1, len(titles), squeeze=False)[0]
    for ax, thumb, xy, g, title in zip(axes, thumbnails, xys, gates, titles):
        top = g.argmax(axis=1)
        rgba = colours[top].copy()
        rgba[:, 3] = 0.35 + 0.65 * g.max(axis=1)
        ax.imshow(thumb)
        ax.scatter(xy[:, 0], xy[:, 1], c=rgba, s=max(6.0, 9000.0 / max(len(xy), 1)), linewidths=0)
        counts = np.bincount(top, minlength=n_experts)
        ax.set_title(f"{title}\nspots per expert: {' '.join(map(str, counts))}", fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[e], label=f"expert {e}") for e in range(n_experts)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="top expert")
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    return path


def advice_figure(details: dict[str, pd.DataFrame], sections: Sequence[str], path: str | Path, n_shown: int = 3) -> Path:
    """`stimpute advise`'s reasoning for its top candidates: one panel per known set, per
    section of the stack (cutting order) its coverage and morphological coverage as bars
    and its expected PCC as a dot; the known sections are shaded.

    `details[label]`: rows section, coverage, morphology, expected_pcc (targets only).
    """
    shown = list(details.items())[:n_shown]
    fig = Figure(figsize=(max(4.0, 0.55 * len(sections) + 1.5) * len(shown), 3.6), layout="constrained")
    axes = fig.subplots(1, len(shown), sharey=True, squeeze=False)[0]
    x = np.arange(len(sections))
    for rank, (ax, (label, frame)) in enumerate(zip(axes, shown), start=1):
        rows = frame.set_index("section").reindex(sections)
        known = rows["coverage"].isna().to_numpy()
        for i in np.flatnonzero(known):
            ax.axvspan(i - 0.5, i + 0.5, color="gold", alpha=0.35, linewidth=0)
        ax.bar(x - 0.2, rows["coverage"].fillna(0), 0.4, label="coverage", color="tab:blue")
        ax.bar(x + 0.2, rows["morphology"].fillna(0), 0.4, label="morphological coverage", color="tab:green")
        ax.plot(x, rows["expected_pcc"], "o", color="black", label="expected PCC")
        ax.set_xticks(x, [f"{s}\n(known)" if k else s for s, k in zip(sections, known)], fontsize=8)
        ax.set_title(f"#{rank}: known {label}", fontsize=10)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("fraction of spots / PCC")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path
