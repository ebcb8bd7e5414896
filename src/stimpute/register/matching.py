"""Cross-layer spot matching: overlapping spot discs of adjacent sections after registration.

Spots are discs; two spots of adjacent layers match when their discs overlap in the
reference frame. The overlap (IoU) is computed in closed form from the centre distance
and radii, for candidate pairs found with a KD-tree, so memory grows with the number of
overlaps, not with n × m. With features, the cosine similarity of the matched spots is
added to the IoU (the ASIGN cross-layer score) and each spot keeps its `k` best links.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

K_CROSS = 16  # cross-layer links kept per spot (ASIGN reference)
MATCH_COLUMNS = ["a", "b", "distance", "iou", "cosine", "score"]


def disc_iou(distance: np.ndarray, r1: float, r2: float) -> np.ndarray:
    """Intersection over union of two discs with radii r1, r2 whose centres are `distance` apart."""
    d = np.asarray(distance, dtype=np.float64)
    small, large = min(r1, r2), max(r1, r2)
    inter = np.zeros_like(d)
    inside = d <= large - small
    inter[inside] = np.pi * small**2
    lens = (d > large - small) & (d < r1 + r2)
    dl = d[lens]
    a1 = r1**2 * np.arccos(np.clip((dl**2 + r1**2 - r2**2) / (2 * dl * r1), -1, 1))
    a2 = r2**2 * np.arccos(np.clip((dl**2 + r2**2 - r1**2) / (2 * dl * r2), -1, 1))
    tri = 0.5 * np.sqrt(np.clip((-dl + r1 + r2) * (dl + r1 - r2) * (dl - r1 + r2) * (dl + r1 + r2), 0, None))
    inter[lens] = a1 + a2 - tri
    return inter / (np.pi * (r1**2 + r2**2) - inter)


def spot_scale(features: np.ndarray | None) -> np.ndarray | None:
    """Per-spot feature vectors: the spot scale of (n, 3, d) multi-scale features."""
    if features is None:
        return None
    features = np.asarray(features, dtype=np.float32)
    return features[:, 0] if features.ndim == 3 else features


def match_spots(
    xy_a: np.ndarray,
    xy_b: np.ndarray,
    radius_a: float,
    radius_b: float,
    features_a: np.ndarray | None = None,
    features_b: np.ndarray | None = None,
    k: int = K_CROSS,
    min_iou: float = 0.0,
    max_distance: float | None = None,
) -> pd.DataFrame:
    """Links between spots of layer a and layer b (coordinates in one frame, same units).

    Candidates are pairs closer than `max_distance` (default: the discs touch, r_a + r_b)
    with IoU > `min_iou` (set `min_iou=-1` with a larger `max_distance` to link by
    similarity alone). Score = IoU + cosine similarity (IoU alone without features). A
    link is kept when it is among the `k` best of either of its spots. Columns: a, b
    (row indices), distance, iou, cosine (NaN without features), score.
    """
    reach = radius_a + radius_b if max_distance is None else max_distance
    pairs = cKDTree(np.asarray(xy_b, float)).query_ball_point(np.asarray(xy_a, float), r=reach)
    a = np.repeat(np.arange(len(pairs)), [len(p) for p in pairs])
    b = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=len(a))
    distance = np.linalg.norm(np.asarray(xy_a, float)[a] - np.asarray(xy_b, float)[b], axis=1)
    iou = disc_iou(distance, radius_a, radius_b)
    cosine = _cosine(spot_scale(features_a), spot_scale(features_b), a, b)
    score = iou + np.nan_to_num(cosine)
    table = pd.DataFrame({"a": a, "b": b, "distance": distance, "iou": iou, "cosine": cosine, "score": score})
    table = table[table["iou"] > min_iou]
    keep = _top_k(table, "a", k) | _top_k(table, "b", k)
    return table[keep].sort_values(["a", "score"], ascending=[True, False]).reset_index(drop=True)


def _cosine(fa: np.ndarray | None, fb: np.ndarray | None, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if fa is None or fb is None:
        return np.full(len(a), np.nan)
    na = fa / np.maximum(np.linalg.norm(fa, axis=1, keepdims=True), 1e-12)
    nb = fb / np.maximum(np.linalg.norm(fb, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", na[a], nb[b]).astype(np.float64)


def _top_k(table: pd.DataFrame, by: str, k: int) -> pd.Series:
    rank = table.groupby(by)["score"].rank(method="first", ascending=False)
    return rank <= k


def match_stack(stack, coords_ref: list[np.ndarray], features: list[np.ndarray] | None = None, **thresholds) -> pd.DataFrame:
    """`match_spots` for every adjacent pair of a registered stack.

    Coordinates are reference-frame pixels (section 0), so disc radii are converted to
    that frame. Columns: section_a, spot_a, section_b, spot_b (spot = row index in the
    section's adata), spot_id_a, spot_id_b, distance (px), iou, cosine, score.
    """
    um_per_px_ref = stack[0].um_per_px
    tables = []
    for i in range(1, len(stack)):
        lower, upper = stack[i - 1], stack[i]
        table = match_spots(
            coords_ref[i - 1],
            coords_ref[i],
            lower.spot_diameter_um / 2 / um_per_px_ref,
            upper.spot_diameter_um / 2 / um_per_px_ref,
            None if features is None else features[i - 1],
            None if features is None else features[i],
            **thresholds,
        )
        tables.append(
            pd.DataFrame({
                "section_a": lower.name,
                "spot_a": table["a"].to_numpy(),
                "section_b": upper.name,
                "spot_b": table["b"].to_numpy(),
                "spot_id_a": np.asarray(lower.spot_ids, dtype=object)[table["a"].to_numpy()],
                "spot_id_b": np.asarray(upper.spot_ids, dtype=object)[table["b"].to_numpy()],
                **{c: table[c].to_numpy() for c in ("distance", "iou", "cosine", "score")},
            })
        )
    return pd.concat(tables, ignore_index=True)


def matched_fraction(stack, matches: pd.DataFrame) -> dict[str, float]:
    """Per section, the fraction of its spots with at least one cross-layer link."""
    out = {}
    for i, section in enumerate(stack):
        linked = set(matches.loc[matches["section_a"] == section.name, "spot_a"]) | set(
            matches.loc[matches["section_b"] == section.name, "spot_b"]
        )
        out[section.name] = len(linked) / max(section.n_spots, 1)
    return out


# -- distance-kernel evidence: every spot linked to the spots of every known section ----

KERNEL_SIGMA = 1.0  # Gaussian kernel width, in spot pitches
KERNEL_CUTOFF = 3.0  # links longer than this many pitches are dropped
KERNEL_K = 24  # candidate known spots per query spot
SIMILARITY_TAU = 1.0  # feature-distance temperature (distances scaled by their median)
SIMILARITY_DIMS = 20  # principal components of the standardised known features


def spot_pitch_um(xy_um: np.ndarray) -> float:
    """Typical centre-to-centre spot distance (µm): the median nearest-neighbour distance."""
    if len(xy_um) < 2:
        raise ValueError("a spot pitch needs at least two spots")
    dist, _ = cKDTree(xy_um).query(xy_um, k=2)
    return float(np.median(dist[:, 1]))


def kernel_links(query_um: np.ndarray, known_um: np.ndarray, pitch_um: float, *, k: int = KERNEL_K,
                 sigma: float = KERNEL_SIGMA, cutoff: float = KERNEL_CUTOFF,
                 query_features: np.ndarray | None = None, known_features: np.ndarray | None = None,
                 tau: float = SIMILARITY_TAU):
    """Sparse (n_query, n_known) link weights from registered positions in µm (2D or 3D).

    weight = exp(-d² / 2(σ·pitch)²) for the `k` nearest known spots within `cutoff`
    pitches, times, when features are given, a morphology term exp(-f² / τ): f is the
    distance between the two spots' features after standardising them and keeping the
    leading principal components of the known spots (raw features are all nearly
    parallel, so their cosine says nothing), divided by its median over the candidates.
    Unnormalised: a row's sum says how much evidence the spot has.
    """
    from scipy import sparse

    known_um, query_um = np.asarray(known_um, float), np.asarray(query_um, float)
    k = min(k, len(known_um))
    dist, idx = cKDTree(known_um).query(query_um, k=k)
    dist, idx = dist.reshape(len(query_um), k), idx.reshape(len(query_um), k)
    inside = dist <= cutoff * pitch_um
    idx = np.where(inside, idx, 0)
    weight = np.exp(-0.5 * (dist / (sigma * pitch_um)) ** 2) * inside
    if query_features is not None and known_features is not None:
        fq, fk = _similarity_space(np.asarray(query_features, float), np.asarray(known_features, float))
        fdist = np.linalg.norm(fq[:, None, :] - fk[idx], axis=2)
        scale = np.median(fdist[inside]) if inside.any() else 1.0
        weight *= np.exp(-((fdist / max(scale, 1e-12)) ** 2) / tau)
    rows = np.repeat(np.arange(len(query_um)), k)
    return sparse.csr_matrix((weight.ravel(), (rows, idx.ravel())), shape=(len(query_um), len(known_um)))


def _similarity_space(query: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened features of both sets, standardised and projected on the known set's PCs."""
    query, known = query.reshape(len(query), -1), known.reshape(len(known), -1)
    mean, sd = known.mean(0), known.std(0) + 1e-9
    q, kn = (query - mean) / sd, (known - mean) / sd
    dims = max(1, min(SIMILARITY_DIMS, len(known) - 1, kn.shape[1]))
    # the leading right singular vectors of kn, from the eigenvectors of the smaller of its
    # two Gram matrices (d × d scatter, or n × n for wide network features): the same axes
    # (up to sign, which distances ignore) without an SVD of kn, far cheaper and far less
    # hurt by BLAS threads on a busy machine
    if kn.shape[1] <= len(kn):
        _, vectors = np.linalg.eigh(kn.T @ kn)
        axes = vectors[:, ::-1][:, :dims]
    else:
        values, left = np.linalg.eigh(kn @ kn.T)
        values, left = values[::-1][:dims], left[:, ::-1][:, :dims]
        axes = kn.T @ left / np.sqrt(np.maximum(values, 1e-12))
    return q @ axes, kn @ axes
