"""Checks at the input boundary, before any heavy work.

Every reader ends here. All problems of a section are collected and raised together, one
line each naming the file and the field; recoverable oddities (spots without any count)
are fixed with a warning and recorded in `section.report`.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse

from stimpute.data import Section
from stimpute.errors import InputError, StimputeWarning

MAX_COUNT = 1e9  # UMIs of one gene in one spot: real data stay below 1e5


def validate_section(section: Section) -> Section:
    """Raise every problem of `section` at once; drop zero-count spots with a warning."""
    source = section.source or section.name
    _unique_genes(section, source)
    problems = _spot_problems(section, source) + _count_problems(section, source)
    if problems:
        raise InputError.collect(problems)
    return _drop_empty_spots(section, source)


def _unique_genes(section: Section, source: str) -> None:
    """Duplicated gene names (several features under one symbol) are made unique, with a warning."""
    names = section.adata.var_names
    if names.has_duplicates:
        dupes = ", ".join(map(str, names[names.duplicated()].unique()[:5]))
        section.adata.var_names_make_unique()
        section.report["renamed_duplicated_genes"] = int(names.duplicated().sum())
        warnings.warn(f"{source}: duplicated gene names ({dupes}) made unique as NAME-1, NAME-2, ...", StimputeWarning, stacklevel=4)


def _spot_problems(section: Section, source: str) -> list[InputError]:
    problems = []
    ids = section.adata.obs_names
    if ids.has_duplicates:
        dupes = ", ".join(map(str, ids[ids.duplicated()].unique()[:5]))
        problems.append(InputError(source, f"spot ids: duplicated ({dupes}); each spot needs a unique id"))
    xy = section.xy
    finite = np.isfinite(xy).all(axis=1)
    if not finite.all():
        problems.append(InputError(source, f'obsm["spatial"]: {int((~finite).sum())} spot(s) have missing or infinite coordinates'))
    W, H = section.image.size
    outside = finite & ((xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= W) | (xy[:, 1] >= H))
    if outside.any():
        first = ids[np.flatnonzero(outside)[0]]
        x, y = xy[outside][0]
        problems.append(
            InputError(
                source,
                f'obsm["spatial"]: {int(outside.sum())} spot(s) lie outside the {W}×{H} px image '
                f"{section.image.path or ''} (e.g. {first} at x={x:.0f}, y={y:.0f}); coordinates must be "
                "full-resolution pixels of this image",
            )
        )
    return problems


def _count_problems(section: Section, source: str) -> list[InputError]:
    if not section.has_counts:
        return []
    X = section.adata.X
    values = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    problems = []
    if np.isnan(values).any():
        problems.append(InputError(source, f"counts: {int(np.isnan(values).sum())} NaN value(s); raw counts are required"))
    if np.isinf(values).any():
        problems.append(InputError(source, f"counts: {int(np.isinf(values).sum())} infinite value(s) (beyond float32's range); raw counts are required"))
    finite = values[np.isfinite(values)]
    if (finite > MAX_COUNT).any():
        problems.append(InputError(source, f"counts: {int((finite > MAX_COUNT).sum())} value(s) above {MAX_COUNT:.0e} (largest "
                                           f"{finite.max():.3g}): not a plausible UMI count per spot and gene"))
    if (finite < 0).any():
        problems.append(InputError(source, f"counts: {int((finite < 0).sum())} negative value(s); raw counts are required"))
    if (finite != np.round(finite)).any():
        problems.append(
            InputError(source, "counts: non-integer values; raw UMI counts are required (put them in layers['counts'] if X is normalised)")
        )
    return problems


def _drop_empty_spots(section: Section, source: str) -> Section:
    if not section.has_counts:
        return section
    totals = np.asarray(section.adata.X.sum(axis=1)).ravel()
    empty = totals <= 0
    if not empty.any():
        return section
    if empty.all():
        raise InputError(source, "counts: every spot has zero counts")
    warnings.warn(f"{source}: dropped {int(empty.sum())} spot(s) with zero counts", StimputeWarning, stacklevel=3)
    section.adata = section.adata[~empty].copy()
    section.report["dropped_zero_count_spots"] = int(empty.sum())
    return section

