"""Expression preprocessing: normalisation and the gene panel every model predicts.

stimpute's scale is scanpy's library-size normalisation to 10,000 counts + log1p. The
ASIGN reference's scale, log((x + 1) / Σ(x + 1)) ("following ST-Net"), and its panel, the
top genes by mean expression, are options so results compare with the paper.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Sequence

import anndata as ad
import numpy as np
from scipy import sparse

from stimpute.defaults import DEFAULT_PANEL_SIZE
from stimpute.errors import InputError, StimputeError, StimputeWarning

TARGET_SUM = 1e4
MIN_SPOT_FRACTION = 0.1  # HVG candidates: detected in ≥10% of spots, else dispersion favours noise
Normalisation = Literal["log1p", "reference"]
PanelRule = Literal["hvg", "mean"]


def normalize_log1p(adata: ad.AnnData, method: Normalisation = "log1p") -> np.ndarray:
    """Dense float32 (n_spots, n_genes) expression on the model scale.

    `log1p`: normalise_total(1e4) + log1p (scanpy). `reference`: log((x+1)/Σ(x+1)) per spot.
    """
    counts = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    counts = counts.astype(np.float64)
    if method == "reference":
        shifted = counts + 1.0
        return np.log(shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    if method != "log1p":
        raise StimputeError("--normalisation", f"unknown normalisation {method!r} (use log1p or reference)")
    import scanpy as sc  # here, not at import: slow to import (`stimpute.preload`)

    work = ad.AnnData(X=counts)
    sc.pp.normalize_total(work, target_sum=TARGET_SUM)
    sc.pp.log1p(work)
    return np.asarray(work.X, dtype=np.float32)


def read_gene_list(path: str | Path) -> list[str]:
    """Gene symbols from a text file, one per line (blank lines and `#` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "gene list file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is not part of the first gene
    except UnicodeDecodeError:
        text = "\0"
    except OSError as exc:
        raise InputError(path, f"cannot read gene list ({exc.strerror or exc})") from None
    if "\0" in text:
        raise InputError(path, "not a text file: expected one gene symbol per line")
    genes = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise InputError(path, "gene list is empty: expected one gene symbol per line")
    return list(dict.fromkeys(genes))


def select_panel(
    adatas: Sequence[ad.AnnData] | ad.AnnData,
    n_top: int = DEFAULT_PANEL_SIZE,
    genes: Sequence[str] | str | Path | None = None,
    rule: PanelRule = "hvg",
    min_spot_fraction: float = MIN_SPOT_FRACTION,
) -> list[str]:
    """The gene panel: `genes` (a list or a file) checked against the data, else the top
    `n_top` genes of the measured sections by `rule` (`hvg`: scanpy highly variable genes
    (Pearson residuals), `mean`: highest mean expression as in the ASIGN reference) among genes
    detected in at least `min_spot_fraction` of the spots.

    Only genes measured in every given section are candidates, so the panel is defined
    everywhere it is evaluated.
    """
    if genes is None and n_top < 1:
        raise StimputeError("--n-top", f"the panel needs at least 1 gene, got --n-top {n_top}")
    if rule not in ("hvg", "mean"):
        raise StimputeError("--rule", f"unknown panel rule {rule!r} (use hvg or mean)")
    adatas = [adatas] if isinstance(adatas, ad.AnnData) else list(adatas)
    adatas = [a for a in adatas if a.n_vars > 0]
    if not adatas:
        raise StimputeError(None, "no measured section: a gene panel needs at least one section with counts")
    shared = shared_genes(adatas)
    if genes is not None:
        source = genes if isinstance(genes, (str, Path)) else "--genes"
        wanted = read_gene_list(genes) if isinstance(genes, (str, Path)) else list(dict.fromkeys(genes))
        if not wanted:
            raise StimputeError(source, "gene list is empty")
        unknown = [g for g in wanted if g not in shared]
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
            raise StimputeError(source, f"{len(unknown)} gene(s) not measured in the known section(s): {shown}")
        return wanted
    pooled = ad.concat([a[:, shared] for a in adatas], join="inner", index_unique="-")
    expressed = np.asarray((pooled.X > 0).mean(axis=0)).ravel() >= min_spot_fraction
    pooled = pooled[:, expressed].copy()
    if pooled.n_vars == 0:
        raise StimputeError(None, f"no gene is detected in {min_spot_fraction:.0%} of the measured spots")
    n_top = min(n_top, pooled.n_vars)
    if rule == "mean":
        order = np.argsort(-normalize_log1p(pooled).mean(axis=0), kind="stable")[:n_top]
        return list(pooled.var_names[order])
    # Pearson-residual HVGs on raw counts: with a few hundred spots, dispersion-based
    # flavours rank near-empty genes first; residuals rank the tissue's real programmes.
    import scanpy as sc

    work = ad.AnnData(X=sparse.csr_matrix(pooled.X, dtype=np.float32), var=pooled.var[[]].copy())
    sc.experimental.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="pearson_residuals")
    ranked = work.var.sort_values("highly_variable_rank", kind="stable")
    return list(ranked.index[ranked["highly_variable"]][:n_top])


def panel_expression(section, panel: Sequence[str], method: Normalisation = "log1p") -> np.ndarray:
    """(n_spots, len(panel)) expression of a measured section on the model scale.

    Normalisation uses the section's full library size (all genes), then keeps the panel.
    """
    adata = section.adata
    missing = [g for g in panel if g not in adata.var_names]
    if missing:
        raise InputError(section.source or section.name, f"genes of the panel not measured here: {', '.join(missing[:20])}")
    full = normalize_log1p(adata, method)
    return full[:, adata.var_names.get_indexer(list(panel))]


def top_variable(expression: np.ndarray, n: int = 50) -> np.ndarray:
    """Indices of the `n` panel genes with the highest variance (for top-50 summaries)."""
    return np.argsort(-np.var(expression, axis=0), kind="stable")[: min(n, expression.shape[1])]


def shared_genes(adatas: Sequence[ad.AnnData]) -> list[str]:
    """Genes measured in every section, in the first section's order.

    Sections often differ in a few symbols; the genes lost are reported in a warning, and
    no gene in common is an error.
    """
    names = [list(a.var_names) for a in adatas]
    keep = set(names[0]).intersection(*names[1:])
    if not keep:
        raise StimputeError(None, "the measured sections share no gene symbol: check that they use the same gene naming")
    lost = len(set().union(*names)) - len(keep)
    if lost:
        warnings.warn(f"{lost} gene(s) not measured in every section were left out ({len(keep)} kept)", StimputeWarning, stacklevel=3)
    return [g for g in names[0] if g in keep]
