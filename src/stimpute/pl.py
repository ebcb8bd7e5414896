"""Plots of stimpute results, scanpy style: they read AnnData fields and compute nothing.

They read what `stimpute.tl.impute` returns and what `stimpute impute` writes
(`<section>.h5ad`, `block.h5ad`, also files from before issue 26) alike: the layout of
`stimpute.io.results`. Each function draws into `ax` where given, else into a new
matplotlib `Figure` (object API, no pyplot state: safe without a display), and returns
that figure; `show=True` displays it (in a notebook) and returns None, as scanpy does.
`view` is the interactive one: a self-contained Plotly page of the whole block.
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
from stimpute.view import MARKER_GENES, View, read_view_sections, view_html

Sections = ad.AnnData | Sequence[ad.AnnData] | Mapping[str, ad.AnnData]


def imputed(adata: ad.AnnData, genes: str | Sequence[str] | None = None, *, key: str | None = None,
            layer: str | None = None, ax=None, show: bool | None = None, ncols: int = 4,
            cmap: str = "viridis") -> Figure | None:
    """Spots coloured by `genes`, at their true size over the section's `hires` H&E image.

    Parameters
    ----------
    adata
        One section's result (or a `block.h5ad`: every section over the first one's H&E).
    genes
        Gene(s) to draw, one panel each; default: the HER2 markers in the panel, else its first gene.
    key
        The `key_added` of the result (default: the one the result records, else "stimpute").
    layer
        Values drawn: `layers[layer]`, "X"; default: `layers[key]` where present, else `X`.
    ax
        A matplotlib `Axes` to draw one gene into (default: a new figure, one panel per gene).
    show
        Display the figure (notebook) and return None.
    ncols, cmap
        Panels per row; colour map.

    Returns
    -------
    The `Figure`, or None where `show`.
    """
    from matplotlib.collections import EllipseCollection

    genes = _genes(adata, genes)
    values = _values(adata, genes, _layer(adata, key, layer))
    image, scale = library_image(adata)
    xy = np.asarray(adata.obsm["spatial"], np.float64)[:, :2] * scale
    diameter = _diameter_px(adata) * scale
    if ax is not None and len(genes) != 1:
        raise StimputeError(None, f"ax= takes one gene, {len(genes)} were given: leave ax out for one panel per gene")
    if ax is None:
        ncols = max(1, min(ncols, len(genes)))
        fig = Figure(figsize=(3.4 * ncols, 3.2 * -(-len(genes) // ncols)), layout="constrained")
        axes = fig.subplots(-(-len(genes) // ncols), ncols, squeeze=False).ravel()
    else:
        fig, axes = ax.figure, np.array([ax])
    for a, gene, v in zip(axes, genes, values.T):
        a.imshow(image)
        dots = EllipseCollection(diameter, diameter, 0.0, units="xy", offsets=xy, offset_transform=a.transData,
                                 cmap=cmap, linewidths=0)
        dots.set_array(v)
        a.add_collection(dots)
        fig.colorbar(dots, ax=a, shrink=0.8)
        a.set_title(gene, fontsize=9)
        a.set_axis_off()
    for a in axes[len(genes):]:
        a.set_visible(False)
    return _finish(fig, show)


def block_3d(adatas: Sections, gene: str | None = None, *, key: str | None = None, layer: str | None = None, ax=None,
             show: bool | None = None, cmap: str = "viridis") -> Figure | None:
    """Every section's spots at their registered 3D position (`obsm["spatial_3d"]`, µm).

    Spots are coloured by `gene` on one colour scale (1st-99th percentile of the imputed
    spots), drawn at about their true diameter, each section labelled (name, measured or
    imputed) at its depth.

    Parameters
    ----------
    adatas
        A `block.h5ad` AnnData, or the sections' results (list or mapping, as `stimpute.tl.impute` returns them).
    gene
        Default: a HER2 marker in the panel, else its first gene.
    key, layer
        As in `imputed`.
    ax
        A matplotlib `Axes3D` (default: a new figure).
    show
        Display the figure (notebook) and return None.

    Returns
    -------
    The `Figure`, or None where `show`.
    """
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

    parts = _parts(adatas)
    for a in parts:
        if SPATIAL_3D not in a.obsm:
            raise StimputeError(None, f'no obsm["{SPATIAL_3D}"]: run stimpute.tl.register or stimpute.tl.impute first')
    (gene,) = _genes(parts[0], gene)[:1]
    values = [_values(a, [gene], _layer(a, key, layer))[:, 0] for a in parts]
    _, sections = read_view_sections(adatas, _key(parts[0], key))
    imputed_values = np.concatenate([v[~s.measured] for s, v in zip(sections, values)])
    lo, hi = np.percentile(imputed_values if imputed_values.size else np.concatenate(values), [1, 99])
    if ax is None:
        fig = Figure(figsize=(7, 6), layout="constrained")
        ax = fig.add_subplot(projection="3d")
    fig = ax.figure
    extent = max(float(np.ptp(np.concatenate([s.xyz[:, :2] for s in sections]), axis=0).max()), 1e-9)
    points_per_um = 0.45 * 72 * fig.get_figwidth() / extent  # the x-y box spans about 45 % of the figure's width
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
    return _finish(fig, show)


def view(data, gene: str | None = None, *, key: str = "stimpute", path: str | Path | None = None) -> View:
    """The block in 3D, interactive (Plotly; the page `stimpute view` writes).

    H&E planes, spots at true size coloured by `gene` (search box for the others), confidence overlay.

    Parameters
    ----------
    data
        A `block.h5ad` AnnData, the output folder of `stimpute impute`, or the objects `stimpute.tl.impute` returns.
    gene
        The gene shown first (default: a marker gene, else the first of the panel).
    key
        The `key_added` of `stimpute.tl.impute`.
    path
        Also write the page there (self-contained, opens offline).

    Returns
    -------
    The `View` (`.html`, `.write(path)`); it shows inline in a notebook.
    """
    page = View(view_html(data, gene, key))
    if path is not None:
        page.write(path)
    return page


def _parts(adatas: Sections) -> list[ad.AnnData]:
    """The sections of a block AnnData, or the given results, as a list."""
    if isinstance(adatas, ad.AnnData):
        meta = dict(adatas.uns.get("stimpute", {}))
        if not meta.get("block"):
            return [adatas]
        return [adatas[(adatas.obs["section"] == name).to_numpy()] for name in meta["order"]]
    return list(adatas.values()) if isinstance(adatas, Mapping) else list(adatas)


def _key(adata: ad.AnnData, key: str | None) -> str:
    return key or str(dict(adata.uns.get("stimpute", {})).get("key", "stimpute"))


def _layer(adata: ad.AnnData, key: str | None, layer: str | None) -> str:
    """The layer to draw: the given one, else the result's imputation (`layers[key]`), else X
    (files from before issue 26 hold the imputation in X only)."""
    if layer is not None:
        return layer
    key = _key(adata, key)
    return key if key in adata.layers else "X"


def _genes(adata: ad.AnnData, genes: str | Sequence[str] | None) -> list[str]:
    if genes is None:
        return [g for g in MARKER_GENES if g in adata.var_names][:1] or [str(adata.var_names[0])]
    return [genes] if isinstance(genes, str) else list(genes)


def _diameter_px(adata: ad.AnnData) -> float:
    """Spot diameter in full-resolution pixels: the library's `spot_diameter_fullres`, else
    µm over µm per pixel from `uns["stimpute"]`."""
    spatial = dict(adata.uns.get("spatial", {}))
    factors = dict(dict(next(iter(spatial.values()))).get("scalefactors", {})) if len(spatial) == 1 else {}
    if "spot_diameter_fullres" in factors:
        return float(factors["spot_diameter_fullres"])
    meta = dict(adata.uns.get("stimpute", {}))
    if "spot_diameter_um" in meta and "um_per_px" in meta:
        return float(meta["spot_diameter_um"]) / float(meta["um_per_px"])
    raise StimputeError(None, 'spot size unknown: no uns["spatial"] scalefactors["spot_diameter_fullres"]')


def _values(adata: ad.AnnData, genes: list[str], layer: str) -> np.ndarray:
    """(n_spots, len(genes)) dense values of `layer` (or X when `layer` is "X")."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise StimputeError(None, f"gene(s) not in the panel: {', '.join(missing)}")
    if layer != "X" and layer not in adata.layers:
        raise StimputeError(None, f'no layers["{layer}"] (layers: {", ".join(adata.layers) or "none"}); run stimpute.tl.impute first')
    matrix = adata[:, genes].X if layer == "X" else adata[:, genes].layers[layer]
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, np.float64)


def _finish(fig: Figure, show: bool | None) -> Figure | None:
    """Return `fig`, or display it (IPython, where present) and return None."""
    if not show:
        return fig
    try:
        from IPython.display import display
    except ImportError:  # no notebook: nothing to display it in
        return fig
    display(fig)
    return None


__all__ = ["imputed", "block_3d", "view"]
