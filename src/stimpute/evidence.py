"""Cross-layer evidence: what the measured sections say about every other spot of the block.

After registration every spot has a position in µm in one 3D frame (x, y from the
reference section's pixels, z from the cutting depth). Each spot is linked *directly* to
the spots of every known section, never through a chain of layers, by a Gaussian distance
kernel whose scale is the spot pitch (`stimpute.register.matching.kernel_links`), times a
morphology term where image features are given. The kernel-weighted mean of the linked
spots' measured expression is the spot's *transferred* expression; the amount of kernel
weight it has (its *reach*, in [0, 1)) says how close it lies to measured tissue.

`copy_nearest` (`transfer(..., features=False, k=4, cutoff=2)`) is the plain "register, then copy the
nearest measured spots" rival that every 3D method must beat (`stimpute.models.baselines`);
ASIGN's propagation uses the same links with the morphology term and a wider reach.
"""

from __future__ import annotations

import numpy as np

from stimpute.register.matching import KERNEL_CUTOFF, KERNEL_K, kernel_links, spot_pitch_um
from stimpute.timing import timed

COPY_K, COPY_CUTOFF = 4, 2.0  # the plain copy: 4 nearest measured spots, none beyond two pitches


def registered_um(prepared, i: int) -> np.ndarray:
    """(n_i, 3) spot positions of section i in the stack's frame: x, y, z in µm."""
    if prepared.coords_ref is None:
        raise ValueError("cross-layer evidence needs registered coordinates")
    xy = np.asarray(prepared.coords_ref[i], float) * prepared.stack[0].um_per_px
    return np.c_[xy, np.full(len(xy), prepared.stack[i].z_um or 0.0)]


def known_pitch_um(prepared, known: list[int]) -> float:
    """Spot pitch of the known sections (median nearest-neighbour distance, µm)."""
    return float(np.median([spot_pitch_um(registered_um(prepared, i)[:, :2]) for i in known]))


@timed("propagation")
def transfer(prepared, known: list[int], targets: list[int], values: list[np.ndarray] | None = None, *,
             features: bool = True, k: int = KERNEL_K, cutoff: float = KERNEL_CUTOFF,
             exclude: dict[int, np.ndarray] | None = None) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Kernel-weighted mean of the known sections' `values` (default: their measured
    expression) at every spot of each target, and each spot's reach.

    `exclude[i]`: boolean mask of known section i's spots to leave out (a hold-out).
    Spots with no known spot within `cutoff` pitches get the known mean and reach 0.
    """
    values = values if values is not None else [prepared.known_expression(i) for i in known]
    keep = [np.ones(len(v), bool) if exclude is None or i not in exclude else ~exclude[i] for i, v in zip(known, values)]
    source_um = np.concatenate([registered_um(prepared, i)[m] for i, m in zip(known, keep)])
    source_values = np.concatenate([v[m] for v, m in zip(values, keep)]).astype(np.float64)
    source_features = np.concatenate([prepared.features[i][m] for i, m in zip(known, keep)]) if features else None
    pitch = known_pitch_um(prepared, known)
    fallback = source_values.mean(0)
    predicted, reach = {}, {}
    for t in targets:
        links = kernel_links(registered_um(prepared, t), source_um, pitch, k=k, cutoff=cutoff,
                             query_features=prepared.features[t] if features else None, known_features=source_features)
        total = np.asarray(links.sum(axis=1)).ravel()
        out = np.tile(fallback, (len(total), 1))
        linked = total > 0
        out[linked] = (links[linked] @ source_values) / total[linked, None]
        spatial = kernel_links(registered_um(prepared, t), source_um, pitch, k=k, cutoff=cutoff)
        predicted[t] = out.astype(np.float32)
        reach[t] = 1.0 - np.exp(-np.asarray(spatial.sum(axis=1)).ravel())
    return predicted, reach


def copy_nearest(prepared, known: list[int], targets: list[int],
                 exclude: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """The plain copy: each target spot gets the Gaussian-weighted mean of the nearest
    measured spots of the known sections (no image term), `COPY_K` at most, within `COPY_CUTOFF` pitches."""
    return transfer(prepared, known, targets, features=False, k=COPY_K, cutoff=COPY_CUTOFF, exclude=exclude)[0]
