"""Spot graphs: within-section neighbours (2D) and the 3D stack graph with cross-layer links.

Nodes are spots, ordered section by section and, within a section, in adata order.
Within-section edges follow ASIGN: k = 8 nearest neighbours on the array grid, pruned to
2.0 grid units (the adjacent ring); without an array grid, neighbours within 1.5 spot
pitches in pixels. Cross-layer edges link overlapping spots of adjacent sections after
registration (`stimpute.register.matching`), weighted by IoU (+ feature cosine). Every
edge is stored in both directions. All sparse: memory grows with the number of edges.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.spatial import cKDTree

from stimpute.data import Section, Stack
from stimpute.errors import StimputeError
from stimpute.files import atomic_write
from stimpute.register.matching import K_CROSS, match_stack
from stimpute.timing import timed

if TYPE_CHECKING:
    from torch_geometric.data import Data

WITHIN, CROSS = 0, 1  # edge_type values
K_WITHIN = 8
MAX_GRID_DISTANCE = 2.0
PITCH_RADIUS = 1.5  # neighbour radius in spot pitches when there is no array grid
GRAPH_KEYS = ("edge_index", "edge_type", "edge_weight", "section", "spot", "pos")


def within_edges(section: Section, k: int = K_WITHIN, max_grid_distance: float = MAX_GRID_DISTANCE) -> np.ndarray:
    """(2, E) undirected neighbour pairs (both directions) of one section's spots."""
    obs = section.adata.obs
    if {"array_row", "array_col"} <= set(obs.columns):
        points = obs[["array_col", "array_row"]].to_numpy(np.float64)
        radius = max_grid_distance
    else:
        points = section.xy
        radius = PITCH_RADIUS * spot_pitch(points)
    n = len(points)
    if n < 2:
        return np.zeros((2, 0), np.int64)
    dist, idx = cKDTree(points).query(points, k=min(k + 1, n))
    src = np.repeat(np.arange(n), idx.shape[1])
    dst, dist = idx.ravel(), dist.ravel()
    keep = (dst != src) & (dist <= radius + 1e-9)
    pairs = np.stack([src[keep], dst[keep]])
    pairs = np.unique(np.concatenate([pairs, pairs[::-1]], axis=1), axis=1)
    return pairs.astype(np.int64)


def spot_pitch(xy: np.ndarray) -> float:
    """Typical centre-to-centre spot distance: the median nearest-neighbour distance."""
    if len(xy) < 2:
        return 1.0
    dist, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(dist[:, 1]))


@timed("graph")
def build_graph_2d(section: Section, **within) -> Data:
    """Graph of one section: within-section edges only; `pos` is (x, y, z) in its own pixels."""
    return _assemble([section], [section.xy], [within_edges(section, **within)], np.zeros((2, 0), np.int64), np.zeros(0))


@timed("graph")
def build_graph(
    stack: Stack,
    coords_ref: list[np.ndarray],
    features: list[np.ndarray] | None = None,
    k_within: int = K_WITHIN,
    max_grid_distance: float = MAX_GRID_DISTANCE,
    k: int = K_CROSS,
    min_iou: float = 0.0,
    max_distance: float | None = None,
) -> Data:
    """The 3D spot graph of a registered stack (see module docstring).

    `coords_ref[i]` are section i's spots in reference pixels; `features[i]` optional
    (n_i, d) or (n_i, 3, d) spot features for the cosine term of cross-layer scores.
    Returns Data with edge_index (2, E), edge_type (0 within, 1 cross), edge_weight
    (1 within; IoU + cosine across), section, spot, pos (x_ref, y_ref, z µm) and
    `section_names`.
    """
    if len(coords_ref) != len(stack) or any(len(c) != s.n_spots for c, s in zip(coords_ref, stack)):
        raise StimputeError(None, "coords_ref must hold one (n_spots, 2) array per section of the stack")
    within = [within_edges(s, k_within, max_grid_distance) for s in stack]
    matches = match_stack(stack, coords_ref, features, k=k, min_iou=min_iou, max_distance=max_distance)
    offsets = np.cumsum([0] + [s.n_spots for s in stack])
    index = {name: offsets[i] for i, name in enumerate(stack.names)}
    a = matches["spot_a"].to_numpy() + matches["section_a"].map(index).to_numpy()
    b = matches["spot_b"].to_numpy() + matches["section_b"].map(index).to_numpy()
    cross = np.concatenate([np.stack([a, b]), np.stack([b, a])], axis=1).astype(np.int64)
    weights = np.tile(matches["score"].to_numpy(np.float64), 2)
    return _assemble(stack.sections, coords_ref, within, cross, weights)


def _assemble(sections: list[Section], coords: list[np.ndarray], within: list[np.ndarray], cross: np.ndarray, cross_weight: np.ndarray) -> Data:
    offsets = np.cumsum([0] + [s.n_spots for s in sections])
    within_all = np.concatenate([e + off for e, off in zip(within, offsets)], axis=1)
    edge_index = np.concatenate([within_all, cross], axis=1)
    pos = np.concatenate([np.c_[c, np.full(len(c), s.z_um or 0.0)] for c, s in zip(coords, sections)])
    from torch_geometric.data import Data  # here, not at import: slow to import (`stimpute.preload`)

    data = Data(
        edge_index=torch.as_tensor(edge_index, dtype=torch.long),
        edge_type=torch.as_tensor(np.r_[np.full(within_all.shape[1], WITHIN), np.full(cross.shape[1], CROSS)], dtype=torch.long),
        edge_weight=torch.as_tensor(np.r_[np.ones(within_all.shape[1]), cross_weight], dtype=torch.float32),
        section=torch.as_tensor(np.repeat(np.arange(len(sections)), np.diff(offsets)), dtype=torch.long),
        spot=torch.as_tensor(np.concatenate([np.arange(s.n_spots) for s in sections]), dtype=torch.long),
        pos=torch.as_tensor(pos, dtype=torch.float32),
        num_nodes=int(offsets[-1]),
    )
    data.section_names = [s.name for s in sections]
    return data


def save_graph(data: Data, path: str | Path) -> Path:
    """Write the graph as a plain dict of tensors (loadable with weights_only=True), atomically."""
    path = Path(path)
    payload = {key: data[key] for key in GRAPH_KEYS}
    payload["num_nodes"] = int(data.num_nodes)
    payload["section_names"] = list(data.section_names)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_graph(path: str | Path) -> Data:
    """Read a graph written by `save_graph` (safe loading: tensors, ints and strings only)."""
    path = Path(path)
    try:
        payload = torch.load(path, weights_only=True)
        missing = [k for k in GRAPH_KEYS if k not in payload]
    except Exception as exc:
        raise StimputeError(path, f"cannot read graph file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if missing:
        raise StimputeError(path, f"not a stimpute graph: missing {', '.join(missing)}")
    names = payload.pop("section_names")
    from torch_geometric.data import Data

    data = Data(**payload)
    data.section_names = names
    return data
