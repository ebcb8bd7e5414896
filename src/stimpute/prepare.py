"""Make a stack ready for the models: gene panel, panel expression, features, registration, 3D graph.

`prepare_stack` runs every step the ASIGN pipeline needs before learning, in one call:
the panel is chosen from the *known* sections only (targets never inform it), each
section with counts gets its panel expression (targets keep theirs for evaluation; models
read only the known rows), spot features come from the cached encoder, and the sections
are registered and joined into one 3D spot graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stimpute.data import Stack
from stimpute.errors import StimputeError
from stimpute.expression import DEFAULT_PANEL_SIZE, panel_expression, select_panel
from stimpute.models.base import PreparedStack


def known_indices(stack: Stack, known: str | Sequence[str] | None) -> list[int]:
    """Stack positions of the known sections (default: every section with counts; [] for none)."""
    if known is None:
        found = [i for i, s in enumerate(stack) if s.has_counts]
    else:
        names = [known] if isinstance(known, str) else list(known)
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
    encoder: str = "handcrafted",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    n_top: int = DEFAULT_PANEL_SIZE,
    register: bool = True,
) -> PreparedStack:
    """Panel, expression, features, registration and 3D graph of `stack` (see module doc).

    `panel`: a gene list or a file of genes (checked against the known sections), else the
    top `n_top` HVGs of the known sections. `cache_dir`: feature cache folder.
    `register=False` (sections of different samples, 2D use): each section keeps its own
    pixel frame, and only the graph's within-section edges are meaningful.
    """
    from stimpute.features import spot_features
    from stimpute.register import register_stack

    try:
        from stimpute.graph import build_graph
    except ImportError:  # issue 5's graph module not merged yet: same contract, simple version
        build_graph = _interim_graph

    known_idx = known_indices(stack, known)
    if known_idx:
        genes = select_panel([stack[i].adata for i in known_idx], n_top=n_top, genes=panel)
    elif isinstance(panel, (list, tuple)) and panel:  # prediction only: the trained model's panel
        genes = list(panel)
    else:
        raise StimputeError(None, "no known section: give a gene panel to predict")
    expression = [panel_expression(s, genes) if _has_panel(s, genes) else None for s in stack]
    features = [spot_features(s, encoder=encoder, cache_dir=cache_dir, progress=progress) for s in stack]
    registration = register_stack(stack, progress=progress) if register and len(stack) > 1 else None
    coords_ref = registration.coords_ref if registration else [s.xy for s in stack]
    graph = build_graph(stack, coords_ref, features=features)
    for s in stack:
        s.image.release()
    settings = {
        "known": [stack[i].name for i in known_idx],
        "encoder": encoder,
        "panel_source": str(panel) if isinstance(panel, (str, Path)) else ("user list" if panel else f"top {n_top} HVGs"),
        "n_genes": len(genes),
        **({"registration": registration.to_json()} if registration else {}),
    }
    return PreparedStack(stack, genes, expression, features, coords_ref, graph, settings)


def _has_panel(section, genes: Sequence[str]) -> bool:
    return section.has_counts and all(g in section.adata.var_names for g in genes)


def _interim_graph(stack: Stack, coords_ref: list[np.ndarray], features=None, k_within: int = 8, k_cross: int = 6):
    """The `stimpute.graph.build_graph` contract, minimally: within-section edges to the
    adjacent ring (k ≤ 8 within 1.5 pitches) and cross-layer edges between adjacent
    sections scored by disc IoU + cosine feature similarity (top `k_cross`, within 2 pitches).
    """
    import torch
    from scipy.spatial import cKDTree
    from torch_geometric.data import Data
    from torch_geometric.utils import coalesce

    offsets = np.concatenate([[0], np.cumsum([s.n_spots for s in stack])])
    spot_feats = [None if features is None else _unit_rows(f[:, 0]) for f in (features or [None] * len(stack))]
    src, dst, etype, weight = [], [], [], []

    def add(a, b, t, w):
        src.extend([a, b]), dst.extend([b, a]), etype.extend([np.full(len(a), t)] * 2), weight.extend([w, w])

    for i, s in enumerate(stack):
        xy = coords_ref[i]
        dist, nbr = cKDTree(xy).query(xy, k=min(k_within + 1, len(xy)))
        pitch = np.median(dist[:, 1]) if len(xy) > 1 else 1.0
        keep = (nbr != np.arange(len(xy))[:, None]) & (dist <= 1.5 * pitch)
        rows = np.repeat(np.arange(len(xy))[:, None], nbr.shape[1], axis=1)
        add(rows[keep] + offsets[i], nbr[keep] + offsets[i], 0, np.ones(keep.sum()))
        if i == 0:
            continue
        prev = coords_ref[i - 1]
        radius = stack[i].spot_diameter_um / stack[0].um_per_px / 2
        dist, nbr = cKDTree(prev).query(xy, k=min(k_cross, len(prev)), distance_upper_bound=2 * pitch)
        found = np.isfinite(dist)
        rows = np.repeat(np.arange(len(xy))[:, None], nbr.shape[1], axis=1)
        a, b, d = rows[found], nbr[found], dist[found]
        sim = 0.0 if spot_feats[i] is None else np.clip((spot_feats[i][a] * spot_feats[i - 1][b]).sum(1), 0, None)
        add(a + offsets[i], b + offsets[i - 1], 1, _disc_iou(d, radius) + sim)
    edge_index, (edge_type, edge_weight) = coalesce(  # pairs found from both ends: keep one edge
        torch.as_tensor(np.stack([np.concatenate(src), np.concatenate(dst)]), dtype=torch.long),
        [torch.as_tensor(np.concatenate(etype)), torch.as_tensor(np.concatenate(weight), dtype=torch.float32)],
        num_nodes=int(offsets[-1]), reduce="max")
    section = np.repeat(np.arange(len(stack)), np.diff(offsets))
    spot = np.concatenate([np.arange(s.n_spots) for s in stack])
    z = np.concatenate([np.full(s.n_spots, float(s.z_um)) for s in stack])
    return Data(
        edge_index=edge_index, edge_type=edge_type, edge_weight=edge_weight,
        section=torch.as_tensor(section), spot=torch.as_tensor(spot),
        pos=torch.as_tensor(np.column_stack([np.concatenate(coords_ref), z]), dtype=torch.float32),
        num_nodes=int(offsets[-1]),
    )


def _disc_iou(d: np.ndarray, r: float) -> np.ndarray:
    """Intersection over union of two discs of radius r whose centres are d apart."""
    d = np.minimum(np.asarray(d, float), 2 * r)
    inter = 2 * r**2 * np.arccos(d / (2 * r)) - d / 2 * np.sqrt(4 * r**2 - d**2)
    return inter / (2 * np.pi * r**2 - inter)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)
