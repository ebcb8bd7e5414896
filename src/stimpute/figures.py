"""Figures. Plotting never computes: functions take finished tables/arrays and write files.

Built on matplotlib's object API (`Figure`, no pyplot state), so it needs no display and
is safe to call from any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stimpute.files import atomic_write

PANEL_IN = 3.6  # inches per map panel
MAP_DPI = 110  # expression maps: ~400 px a panel, the spots' pattern readable, the PNG a few hundred kB
SUPERSAMPLE = 3  # spot discs are rasterised at this many times the panel resolution (smooth edges)


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    return path


def expression_heatmaps(thumbnail: np.ndarray, xy: np.ndarray, genes: Sequence[str], predicted: np.ndarray,
                        path: str | Path, measured: np.ndarray | None = None, title: str = "",
                        diameter: float | None = None, pcc: Sequence[float] | None = None, label: str = "imputed") -> Path:
    """Expression of `genes` as spots drawn at their true size on the H&E, beside the H&E alone.

    `xy`: spot centres in thumbnail pixels; `diameter`: spot diameter in thumbnail pixels
    (default: half the median neighbour distance); `predicted`/`measured`: (n_spots,
    len(genes)). Panels are cropped to the spots. With `measured`, each gene shows measured
    and predicted on one colour scale (1st-99th percentile) and the predicted panel's title
    gives the gene's PCC (`pcc`); without, one panel per gene titled `label`.
    Each panel is one image, the spots rasterised onto the H&E at the panel's resolution, in
    a fixed layout, placed on the rendered figure's pixels as they are (`save_figure`'s
    `images`, titled by figure text): only the colour bars are axes, so a section's figure
    costs a fraction of a second, not seconds of vector drawing, axes and layout search.
    """
    from matplotlib import colormaps, rcParams
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.transforms import offset_copy

    xy = np.asarray(xy, float)
    d = float(diameter) if diameter else 0.5 * _median_spacing(xy)
    h, w = thumbnail.shape[:2]
    x0, y0 = np.clip(np.floor(xy.min(0) - 1.5 * d), 0, None).astype(int)
    x1, y1 = np.ceil(xy.max(0) + 1.5 * d).astype(int)
    crop = thumbnail[y0:min(y1, h), x0:min(x1, w)]
    columns = [(label, predicted)] if measured is None else [("measured", measured), ("predicted", predicted)]
    aspect = crop.shape[0] / max(crop.shape[1], 1)
    panel_w = PANEL_IN * min(1.0, 6.0 / (PANEL_IN * aspect))  # panels at most 6 in high
    panel_h = panel_w * aspect
    scale = min(1.0, panel_w * MAP_DPI / crop.shape[1])  # one image pixel per figure pixel at most
    background, paint = _spot_raster(crop, (xy - [x0, y0]) * scale, d * scale, scale)
    gap, title_h, top, bar_w = 0.15, 0.3, 0.45 if title else 0.1, 1.0  # inches; bar_w: colour bar and its label
    fig_w = (panel_w + gap) * (len(columns) + 1) + bar_w
    fig_h = top + len(genes) * (title_h + panel_h + gap)
    fig = Figure(figsize=(fig_w, fig_h), dpi=MAP_DPI)
    images = []  # (rgb uint8, left, bottom) on the figure's pixels
    above = offset_copy(fig.transFigure, fig=fig, y=rcParams["axes.titlepad"], units="points")  # where an axes title sits

    def axes(col: float, row: float, width: float, height: float):  # inches from the top left
        return fig.add_axes((col / fig_w, 1.0 - (row + height) / fig_h, width / fig_w, height / fig_h))

    def panel(col: float, row: float, image: np.ndarray, text: str) -> None:
        """`image` filling the panel_w x panel_h inches at (col, row), titled `text`."""
        left, bottom = round(col * MAP_DPI), round((fig_h - row - panel_h) * MAP_DPI)
        size = (max(1, round((col + panel_w) * MAP_DPI) - left), max(1, round((fig_h - row) * MAP_DPI) - bottom))
        images.append((cv2.resize(_bytes(image), size, interpolation=cv2.INTER_NEAREST), left, bottom))
        fig.text((col + 0.5 * panel_w) / fig_w, 1.0 - row / fig_h, text, fontsize=10, ha="center", va="baseline",
                 transform=above)

    panel(0.0, top + title_h + 0.5 * (fig_h - top - title_h - panel_h - gap), background, "H&E")  # centred
    cmap = colormaps["viridis"]
    for g, gene in enumerate(genes):
        row = top + g * (title_h + panel_h + gap) + title_h
        both = np.concatenate([v[:, g] for _, v in columns])
        lo, hi = np.percentile(both, [1, 99]) if both.size else (0.0, 1.0)
        norm = Normalize(lo, max(hi, lo + 1e-6))
        for c, (name, values) in enumerate(columns, start=1):
            shown = f"{gene} · {name}"
            if name == "predicted" and pcc is not None and np.isfinite(pcc[g]):
                shown += f" (PCC {pcc[g]:.2f})"
            panel(c * (panel_w + gap), row, paint(cmap(norm(values[:, g]))[:, :3]), shown)
        bar = axes((len(columns) + 1) * (panel_w + gap), row + 0.1 * panel_h, 0.15, 0.8 * panel_h)
        fig.colorbar(ScalarMappable(norm, cmap), cax=bar, label="log1p expression")
    if title:
        fig.suptitle(title, y=1.0 - 0.1 / fig_h, va="top")
    return save_figure(fig, path, MAP_DPI, compress_level=1, images=images)


def save_figure(fig: Figure, path: str | Path, dpi: float, compress_level: int = 6,
                images: Sequence[tuple[np.ndarray, int, int]] = ()) -> Path:
    """Write `fig` to `path` atomically, in the format of its suffix. A PNG is rendered by Agg
    and encoded as RGB (the figures are opaque: no alpha channel to compress, a quarter less
    to encode) at zlib level `compress_level`.

    `images`: opaque (h, w, 3) uint8 images, each with the figure pixel of its lower left
    corner (`dpi` pixels per inch), put on the rendered figure where nothing else is drawn:
    the pixels `Figure.figimage(image, left, bottom, origin="upper")` would draw, without its
    resampling pass (a tenth of a second per image)."""
    path = Path(path)
    if (path.suffix.lstrip(".") or "png").lower() != "png":
        for image, left, bottom in images:
            fig.figimage(image, left, bottom, origin="upper")
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".")))
        return path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.array(np.asarray(canvas.buffer_rgba())[..., :3])
    height = rgb.shape[0]
    for image, left, bottom in images:
        h, w = image.shape[:2]
        rgb[height - bottom - h:height - bottom, left:left + w] = image
    rgb = Image.fromarray(rgb)
    atomic_write(path, lambda tmp: rgb.save(tmp, format="png", compress_level=compress_level))
    return path


def _bytes(image: np.ndarray) -> np.ndarray:
    """An RGB image of 0-1 floats as uint8, as matplotlib turns it into pixels (x * 255, truncated)."""
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _spot_raster(image: np.ndarray, xy: np.ndarray, diameter: float, scale: float):
    """`image` resized by `scale` (RGB, 0-1), and a painter: spot colours (n_spots, 3; 0-1)
    to that image with each spot a filled disc of `diameter` pixels at `xy`. Each pixel's
    spot cover is measured on a `SUPERSAMPLE` x finer grid, once, so disc edges blend
    smoothly into the H&E; a pixel takes the colour of the spot covering most of it."""
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    small = np.ascontiguousarray(small[..., :3]).astype(np.float32) / (255.0 if small.dtype == np.uint8 else 1.0)
    h, w = small.shape[:2]
    k = SUPERSAMPLE
    owner = np.full((h * k, w * k), -1, np.int32)  # which spot covers each fine pixel (later spots on top)
    yy, xx = np.ogrid[: h * k, : w * k]
    r = 0.5 * diameter * k
    for i, (cx, cy) in enumerate((xy + 0.5) * k - 0.5):
        ys = slice(max(int(cy - r), 0), min(int(cy + r) + 2, h * k))
        xs = slice(max(int(cx - r), 0), min(int(cx + r) + 2, w * k))
        owner[ys, xs][(yy[ys] - cy) ** 2 + (xx[:, xs] - cx) ** 2 <= r * r] = i
    blocks = owner.reshape(h, k, w, k).transpose(0, 2, 1, 3).reshape(h, w, k * k)
    cover = (blocks >= 0).mean(-1, dtype=np.float32)[..., None]
    owner = blocks.max(-1)  # spots do not overlap: the one spot within reach of the pixel, or -1
    spots = owner >= 0

    def paint(colours: np.ndarray) -> np.ndarray:
        out = small.copy()
        out[spots] += cover[spots] * (colours[owner[spots]] - out[spots])
        return out

    return small, paint


def block_view(xyz_um: Sequence[np.ndarray], values: Sequence[np.ndarray], names: Sequence[str], gene: str,
               path: str | Path, measured: Sequence[bool] | None = None) -> Path:
    """Static 3D view of the block: each section's spots at their registered (x, y) and
    depth z (µm), coloured by `gene` on one scale, the 1st-99th percentile of the imputed
    sections' values (measured zeros do not stretch it); z is stretched so the layers separate."""
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    states = measured if measured is not None else [False] * len(names)
    imputed = [v for v, m in zip(values, states) if not m] or list(values)
    lo, hi = np.percentile(np.concatenate(imputed), [1, 99])
    for xyz, v in zip(xyz_um, values):
        dots = ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=v, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6),
                          s=10, depthshade=False, linewidths=0)
    ax.set_zticks([float(np.median(xyz[:, 2])) for xyz in xyz_um],
                  [f"{n} ({'measured' if m else 'imputed'})" for n, m in zip(names, states)], fontsize=8)
    ax.set_box_aspect((1.0, 1.0, 0.8))
    ax.invert_yaxis()
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.view_init(elev=22, azim=-60)
    fig.colorbar(dots, ax=ax, shrink=0.6, label=f"{gene} (log1p)")
    ax.set_title(f"{gene} across the block (sections stacked in z)")
    return save_figure(fig, path, 130)


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    return path


def advice_figure(details: dict[str, pd.DataFrame], sections: Sequence[str], path: str | Path, n_shown: int = 3) -> Path:
    """`stimpute advise`'s reasoning for its top candidates: one panel per known set, per
    section of the stack (cutting order) its coverage and morphological coverage as bars
    and its score (`stimpute.advise`) as a dot; the known sections are shaded.

    `details[label]`: rows section, coverage, morphology, score (targets only).
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
        ax.plot(x, rows["score"], "o", color="black", label="score (continuity with its best known section)")
        ax.set_xticks(x, [f"{s}\n(known)" if k else s for s, k in zip(sections, known)], fontsize=8)
        ax.set_title(f"#{rank}: known {label}", fontsize=10)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("fraction of spots / score")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def _median_spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 10.0
    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
