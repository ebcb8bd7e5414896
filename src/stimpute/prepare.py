"""Make a stack ready for the models: gene panel, panel expression, features, registration, 3D graph.

`prepare_stack` runs every step the ASIGN pipeline needs before learning, in one call:
the panel is chosen from the *known* sections only (targets never inform it), each
section with counts gets its panel expression (targets keep theirs for evaluation; models
read only the known rows), spot features come from the cached encoder, and the sections
are registered and joined into one 3D spot graph.

**Features are standardised per section** (`feature_norm="section"`): each feature is
centred and scaled by its mean and spread over that section's own spots before any model,
graph or transfer sees it. Serial sections differ in stain strength, focus, compression
and scan scale; a section-wide shift of the descriptors is such a change, not biology, and
a model fitted on the known section's scale breaks on a shifted target (on the validation
protocol's stain-shifted copies the kernel ridge probe fell from 0.24 to 0.07 per-gene PCC;
standardised per section it kept 0.24: `benchmarks/README.md`, issue 25). The cache keeps
the encoder's raw features; old models trained without it (`feature_normalisation` absent from
their config) predict from raw features; `convert to-moest-h5` exports raw features.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stimpute.data import Stack
from stimpute.errors import StimputeError, StimputeWarning
from stimpute.expression import DEFAULT_PANEL_SIZE, panel_expression, select_panel, top_variable

FEATURE_NORMS = ("section", "none")
MIN_KNOWN_SPOTS = 30  # fewer measured spots cannot train (or hold out validation for) a model
TOP_HVG = 50  # the top variable genes of the accuracy summaries (`top_hvg_genes`)


@dataclass
class PreparedStack:
    """A stack made ready for models: panel expression, spot features, registration, graph.

    - `expression[i]`: (n_i, n_genes) normalise_total(1e4)+log1p panel expression of
      section i, or None where it has no counts. Methods read only the rows of the
      sections they are told are known/trained on.
    - `features[i]`: (n_i, n_scales, dim) patch features (scales: spot, 512, 1024 regions).
    - `coords_ref[i]`: (n_i, 2) spot centres registered to the first section's pixels.
    - `graph`: the 3D spot graph (torch_geometric Data; nodes section by section), or None.
    """

    stack: Stack
    panel: list[str]
    expression: list[np.ndarray | None]
    features: list[np.ndarray]
    coords_ref: list[np.ndarray] | None = None
    graph: Any = None
    settings: dict = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        """Node index of each section's first spot in the 3D graph (and a final total)."""
        return np.concatenate([[0], np.cumsum([s.n_spots for s in self.stack])])

    def known_expression(self, i: int) -> np.ndarray:
        expr = self.expression[i]
        if expr is None:
            name = self.stack[i].name
            raise StimputeError(self.stack[i].source or name, f"section {name} has no measured counts to learn from")
        return expr


def top_hvg_genes(prepared: PreparedStack, known: Sequence[int], n: int = TOP_HVG) -> list[str]:
    """The panel's `n` most variable genes over the `known` sections' spots (the top-50 summary)."""
    pooled = np.concatenate([prepared.expression[i] for i in known])
    return [prepared.panel[i] for i in top_variable(pooled, n)]


def known_indices(stack: Stack, known: str | Sequence[str] | None) -> list[int]:
    """Stack positions of the known sections: names, or one string of names joined by commas
    ("C2,C4"); default: every section with counts; [] for none."""
    if known is None:
        found = [i for i, s in enumerate(stack) if s.has_counts]
    else:
        names = [n.strip() for n in known.split(",") if n.strip()] if isinstance(known, str) else list(known)
        found = [stack.index(n) for n in names]
        if not names:  # explicitly none: prediction from images only
            return []
    for i in found:
        if not stack[i].has_counts:
            s = stack[i]
            raise StimputeError(s.source or s.name, f"--known section {s.name} carries no measured counts")
    if not found:
        raise StimputeError(None, "no known section: at least one section must carry measured counts")
    return found


def prepare_stack(
    stack: Stack,
    known: str | Sequence[str] | None = None,
    panel: Sequence[str] | str | Path | None = None,
    encoder: str | None = None,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    n_top: int = DEFAULT_PANEL_SIZE,
    register: bool = True,
    registration=None,
    hardware: dict | None = None,
    feature_norm: str = "section",
    features: tuple[list[np.ndarray], dict] | None = None,
) -> PreparedStack:
    """Panel, expression, features, registration and 3D graph of `stack` (see module doc).

    `panel`: a gene list or a file of genes (checked against the known sections), else the
    top `n_top` HVGs of the known sections. `encoder`, `weights`: the feature encoder and
    its local weight file (network encoders); default: the features the sections carry,
    else handcrafted (`stimpute.features.stored`). `cache_dir`: feature cache folder.
    `register=False` (sections of different samples, 2D use): each section keeps its own
    pixel frame, and only the graph's within-section edges are meaningful.
    `registration`: a `StackRegistration` already computed (e.g. with virtual spots placed).
    `hardware`: Lightning's accelerator, devices, num_nodes and strategy of the processes
    that share the feature encoding (`stimpute.features.spot_features`).
    `feature_norm`: "section" standardises each section's features over its own spots
    (module doc), "none" keeps the encoder's values.
    `features`: each section's (n_spots, n_scales, dim) features and their record, already
    computed (`stimpute.tl.features`); default: `stack_features`.
    """
    from stimpute.features.stored import stack_features
    from stimpute.graph import WITHIN, build_graph, build_graph_2d
    from stimpute.register import register_stack

    known_idx = known_indices(stack, known)
    if known_idx:
        genes = select_panel([stack[i].adata for i in known_idx], n_top=n_top, genes=panel)
    elif isinstance(panel, (list, tuple)) and panel:  # prediction only: the trained model's panel
        genes = list(panel)
    else:
        raise StimputeError(None, "no known section: give a gene panel to predict")
    _warn_implausible(stack, known_idx, genes)
    expression = [panel_expression(s, genes) if _has_panel(s, genes) else None for s in stack]
    features, record = features or stack_features(stack, encoder, weights, cache_dir=cache_dir, progress=progress,
                                                  hardware=hardware)
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
    if feature_norm == "section":
        features = [standardise_section(f) for f in features]
    record = {**record, "feature_normalisation": feature_norm}
    if registration is None and register and len(stack) > 1:
        registration = register_stack(stack, progress=progress)
    coords_ref = registration.coords_ref if registration else [s.xy for s in stack]
    graph = build_graph(stack, coords_ref, features=features) if len(stack) > 1 else build_graph_2d(stack[0])
    if registration is None:  # unregistered sections: cross-layer matches would be meaningless
        keep = graph.edge_type == WITHIN
        graph.edge_index, graph.edge_type, graph.edge_weight = graph.edge_index[:, keep], graph.edge_type[keep], graph.edge_weight[keep]
    for s in stack:
        s.image.release()
    settings = {
        "known": [stack[i].name for i in known_idx],
        "encoder": record["encoder"],
        "features": record,
        "panel_source": str(panel) if isinstance(panel, (str, Path)) else ("user list" if panel else f"top {n_top} HVGs"),
        "n_genes": len(genes),
        **({"registration": registration.to_json()} if registration else {}),
    }
    return PreparedStack(stack, genes, expression, features, coords_ref, graph, settings)


def standardise_section(features: np.ndarray) -> np.ndarray:
    """(n_spots, ...) features centred and scaled per feature over the section's own spots
    (a constant feature becomes 0)."""
    f = np.asarray(features, np.float64)
    spread = f.std(axis=0)
    return ((f - f.mean(axis=0)) / np.where(spread > 1e-12, spread, 1.0)).astype(np.float32)


def _has_panel(section, genes: Sequence[str]) -> bool:
    return section.has_counts and all(g in section.adata.var_names for g in genes)



def with_known_panel(prepared: PreparedStack, known: Sequence[int], n_top: int = DEFAULT_PANEL_SIZE) -> PreparedStack:
    """The same stack scored on the panel of its `known` sections only (top `n_top` HVGs):
    a benchmark split must not choose its genes from the sections it is tested on."""
    stack = prepared.stack
    genes = select_panel([stack[i].adata for i in known], n_top=n_top)
    expression = [panel_expression(s, genes) if _has_panel(s, genes) else None for s in stack]
    return replace(prepared, panel=genes, expression=expression,
                   settings={**prepared.settings, "n_genes": len(genes), "panel_source": f"top {n_top} HVGs of the known sections"})


def _warn_implausible(stack: Stack, known_idx: list[int], genes: Sequence[str]) -> None:
    """One warning line each: too few measured spots to learn from; a section with counts
    that lacks panel genes (it is left out of the metrics)."""
    n_known = sum(stack[i].n_spots for i in known_idx)
    if known_idx and n_known < MIN_KNOWN_SPOTS:
        names = ", ".join(stack[i].name for i in known_idx)
        warnings.warn(f"only {n_known} measured spot(s) in {names}: too few to train on (at least {MIN_KNOWN_SPOTS} "
                      "advised); expect accuracy near zero", StimputeWarning, stacklevel=3)
    for i, section in enumerate(stack):
        if i in known_idx or not section.has_counts:
            continue
        missing = [g for g in genes if g not in section.adata.var_names]
        if missing:
            warnings.warn(f"{section.source or section.name}: {len(missing)} of {len(genes)} panel genes are not measured "
                          f"here (e.g. {', '.join(missing[:3])}); {section.name} is left out of the metrics",
                          StimputeWarning, stacklevel=3)
