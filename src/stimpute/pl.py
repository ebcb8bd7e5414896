"""Plots of `stimpute.tl` results, scanpy style: they read AnnData fields and compute nothing.

Each function returns a matplotlib `Figure` (object API, no pyplot state: safe without a
display); save it with `fig.savefig(path)` or show it in a notebook. `view` is the
interactive one: a self-contained Plotly page of the whole block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
from matplotlib.figure import Figure

from stimpute.errors import StimputeError
from stimpute.io.inmemory import library_image
from stimpute.tl import SPATIAL_3D
from stimpute.view import View, read_view_sections, view_html


def imputed(adata: ad.AnnData, genes: str | Sequence[str], *, key: str = "stimpute", layer: str | None = None,
            ncols: int = 4, cmap: str = "viridis") -> Figure:
    """Spots coloured by `genes` over the section's H&E image, one panel per gene.

    Reads `layers[layer or key]` (from `stimpute.tl.impute`), `obsm["spatial"]` and the
    image of `uns["spatial"]` (hires, else lowres, else fullres, with its scalefactor).
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    values = _values(adata, genes, layer or key)
    image, scale = library_image(adata)
    xy = np.asarray(adata.obsm["spatial"], np.float64)[:, :2] * scale
    ncols = max(1, min(ncols, len(genes)))
    nrows = -(-len(genes) // ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    size = max(4.0, 9000.0 / max(len(xy), 1))
    for ax, gene, v in zip(axes, genes, values.T):
        ax.imshow(image)
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=size, cmap=cmap, linewidths=0)
        fig.colorbar(dots, ax=ax, shrink=0.8)
        ax.set_title(gene, fontsize=9)
        ax.set_axis_off()
    for ax in axes[len(genes):]:
        ax.set_visible(False)
    return fig


def block_3d(adatas: Sequence[ad.AnnData] | Mapping[str, ad.AnnData], gene: str, *, key: str = "stimpute",
             layer: str | None = None, cmap: str = "viridis") -> Figure:
    """Every section's spots at their registered 3D position (`obsm["spatial_3d"]`, µm),
    coloured by `gene` (`layers[layer or key]`) on one colour scale (1st-99th percentile of
    the imputed spots), drawn at about their true diameter, each section labelled (name,
    measured or imputed) at its depth."""
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

    objects = list(adatas.values()) if isinstance(adatas, Mapping) else list(adatas)
    for a in objects:
        if SPATIAL_3D not in a.obsm:
            raise StimputeError(None, f'no obsm["{SPATIAL_3D}"]: run stimpute.tl.register or stimpute.tl.impute first')
    values = [_values(a, [gene], layer or key)[:, 0] for a in objects]
    _, sections = read_view_sections(adatas, key)
    imputed = np.concatenate([v[~s.measured] for s, v in zip(sections, values)])
    lo, hi = np.percentile(imputed if imputed.size else np.concatenate(values), [1, 99])  # measured zeros do not stretch it
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    extent = max(float(np.ptp(np.concatenate([s.xyz[:, :2] for s in sections]), axis=0).max()), 1e-9)
    points_per_um = 0.45 * 72 * 7 / extent  # the x-y box spans about 45 % of the figure's width
    for s, v in zip(sections, values):
        dots = ax.scatter(s.xyz[:, 0], s.xyz[:, 1], s.xyz[:, 2], c=v, s=(s.diameter_um * points_per_um) ** 2, cmap=cmap,
                          vmin=lo, vmax=max(hi, lo + 1e-6), linewidths=0, depthshade=False)
    depths = [float(np.median(s.xyz[:, 2])) for s in sections]
    ax.set_zticks(depths, [f"{s.name} ({'measured' if s.measured.all() else 'imputed'})" for s in sections], fontsize=8)
    fig.colorbar(dots, ax=ax, shrink=0.6, label=f"{gene} (log1p)")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_box_aspect((1.0, 1.0, 0.6))
    ax.invert_yaxis()  # image rows grow downwards
    return fig


def view(data, gene: str | None = None, *, key: str = "stimpute", path: str | Path | None = None) -> View:
    """The block in 3D, interactive (Plotly; the page `stimpute view` writes): H&E planes,
    spots at true size coloured by `gene` (search box for the others), confidence overlay.

    `data`: a `block.h5ad` AnnData, the output folder of `stimpute impute`, or the objects
    `stimpute.tl.impute` returns. Shows inline in a notebook; `path` also writes the page
    (self-contained, opens offline). Returns the `View` (`.html`, `.write(path)`).
    """
    page = View(view_html(data, gene, key))
    if path is not None:
        page.write(path)
    return page


def _values(adata: ad.AnnData, genes: list[str], layer: str) -> np.ndarray:
    """(n_spots, len(genes)) dense values of `layer` (or X when `layer` is "X")."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise StimputeError(None, f"gene(s) not in the panel: {', '.join(missing)}")
    if layer != "X" and layer not in adata.layers:
        raise StimputeError(None, f'no layers["{layer}"] (layers: {", ".join(adata.layers) or "none"}); run stimpute.tl.impute first')
    matrix = adata[:, genes].X if layer == "X" else adata[:, genes].layers[layer]
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, np.float64)


__all__ = ["imputed", "block_3d", "view"]
