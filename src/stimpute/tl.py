"""Tools on AnnData, scanpy style: `register`, `features`, `impute` and `advise` a stack of sections.

Each function takes the sections of one tissue block in cutting order, as a list of
AnnData objects or a dict name -> AnnData (names are what `known` refers to; a list's
names come from each object's `uns["spatial"]` library id, else `section0`, `section1`,
...). Every object carries `obsm["spatial"]` (spot centres in full-resolution pixels),
raw counts in `X` or `layers["counts"]` (no genes: an unmeasured section) and its H&E
image where scanpy and squidpy keep it (`uns["spatial"][library_id]`; the resolution used
is the highest present: see `stimpute.io.inmemory`). Nothing is read from or written to
disk unless `cache_dir` is given.

`register` and `features` add fields to the given objects and return them; `impute`
returns new objects, because its values exist only for the gene panel (their `var`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from stimpute.data import Stack
from stimpute.errors import StimputeError
from stimpute.expression import DEFAULT_PANEL_SIZE
from stimpute.io.inmemory import section_from_anndata

Sections = Sequence[ad.AnnData] | Mapping[str, ad.AnnData]
SPATIAL_3D = "spatial_3d"


def register(adatas: Sections, *, key_added: str = "stimpute", um_per_px: float | None = None,
             thickness_um: float = 10.0, progress: bool = False) -> Sections:
    """Align every section onto the first one (rigid + mirror search, ECC refinement).

    Sets on each object:
    - `obsm["spatial_3d"]`: (n_spots, 3) registered x, y and the section's z, in µm of
      the first section's frame (z = position × `thickness_um` unless `uns["stimpute"]["z_um"]`).
    - `uns[key_added]["registration"]`: `matrix` (3×3, this section's pixels -> the first
      section's pixels), `reference` (the first section's name).
    """
    from stimpute.register import register_stack

    names, objects, stack = _stack(adatas, um_per_px, thickness_um)
    stack.require_3d()
    registration = register_stack(stack, progress=progress)
    for adata, section, xy_ref, matrix in zip(objects, stack, registration.coords_ref, registration.transforms):
        _check_spots_kept(adata, section)
        adata.obsm[SPATIAL_3D] = _spatial_3d(stack, section, xy_ref)
        _uns(adata, key_added)["registration"] = {"matrix": np.asarray(matrix), "reference": names[0]}
    return adatas


def features(adatas: Sections, *, encoder: str = "handcrafted", weights: str | Path | None = None,
             key_added: str = "X_stimpute_features", um_per_px: float | None = None,
             cache_dir: str | Path | None = None, progress: bool = False) -> Sections:
    """Per-spot image features at three scales (spot, 512 µm and 1024 µm windows).

    `encoder`: `handcrafted` (no weights) or a network (`resnet18`, `resnet50`, `uni`,
    `ciga`) with a local `weights` file. Sets on each object:
    - `obsm[key_added]`: (n_spots, 3 × dim) float32, the three scales side by side
      (usable as `sc.pp.neighbors(adata, use_rep=key_added)`).
    - `uns[key_added]`: `encoder`, `scales` (names), `dim` (per scale).
    """
    from stimpute.features import spot_features
    from stimpute.patches import SCALES_UM, scale_names

    _, objects, stack = _stack(adatas, um_per_px)
    for adata, section in zip(objects, stack):
        _check_spots_kept(adata, section)
        feats = spot_features(section, encoder=encoder, weights=weights, cache_dir=cache_dir, progress=progress)
        section.image.release()
        adata.obsm[key_added] = feats.reshape(len(feats), -1)
        adata.uns[key_added] = {"encoder": encoder, "scales": scale_names(SCALES_UM), "dim": int(feats.shape[2])}
    return adatas


def impute(adatas: Sections, known: str | Sequence[str], *, key_added: str = "stimpute",
           genes: Sequence[str] | None = None, n_top: int = DEFAULT_PANEL_SIZE, seed: int = 0, epochs: int = 200,
           fusion: str = "fixed", members: Sequence[str] | None = None, programs: str | int = "auto",
           encoder: str | None = None,
           weights: str | Path | None = None, um_per_px: float | None = None, thickness_um: float = 10.0,
           cache_dir: str | Path | None = None, progress: bool = False) -> Sections:
    """ASIGN on in-memory sections: register them, learn from the `known` ones (a name, a
    list, or names joined by commas) and impute every other section (`stimpute.impute`).

    Returns one new AnnData per section (same container type and order as `adatas`), with
    `var` = the gene panel (`genes`, else the top `n_top` highly variable genes of the known
    sections) and the input's `obs`, `obsm` and `uns` carried over. Values are
    normalize_total(1e4) + log1p. Sets:
    - `X` and `layers[key_added]`: the fused imputation, clipped at 0; on known sections
      their measured panel expression.
    - `layers[f"{key_added}_model"]`, `layers[f"{key_added}_propagated"]`: the image
      models' part and the cross-layer propagated part (known sections: measured).
    - `obs[f"{key_added}_reach"]`: how much measured tissue a spot sees through the
      registration, in [0, 1) (known sections: 1); `obs[f"{key_added}_measured"]`.
    - `obsm["spatial_3d"]`: registered x, y, z in µm (see `register`).
    - `var[f"{key_added}_confidence"]`: per-gene PCC of the fused value on held-out known
      spots; `var[f"{key_added}_share"]`: the gene's share of the propagated part.
    - `uns[key_added]`: `panel`, `known`, `targets`, `settings`, `gene_confidence`,
      `registration` (this section's `matrix` and the `reference`).

    `programs`: rank of the gene-program projection of both parts ("auto": cross-validated
    on the known spots; "none"; or a number). `encoder` (default: the features the objects
    carry in `obsm["<encoder>_features"]`, e.g. 3DMoEST's `uni_features`, else handcrafted)
    and its `weights`: see `stimpute.features.stored`. The given objects are not changed. Training
    runs on CPU; `epochs` caps MSAGNet's.
    """
    from stimpute import __version__
    from stimpute.impute import MEMBERS, impute_stack
    from stimpute.prepare import known_indices, prepare_stack
    from stimpute.programs import programs_record
    from stimpute.train import TrainConfig

    names, objects, stack = _stack(adatas, um_per_px, thickness_um)
    stack.require_3d()
    k = known_indices(stack, known)
    targets = [i for i in range(len(stack)) if i not in k]
    if not targets:
        raise StimputeError(None, "nothing to impute: every section is known")
    members = tuple(members or MEMBERS)
    prepared = prepare_stack(stack, known=[names[i] for i in k], panel=list(genes) if genes else None, n_top=n_top,
                             encoder=encoder, weights=weights, cache_dir=cache_dir, progress=progress)
    config = TrainConfig(seed=seed, max_epochs=epochs)
    result = impute_stack(prepared, k, seed=seed, config=config, members=members, fusion=fusion, programs=programs)
    settings = {"stimpute_version": __version__, "seed": seed, "epochs": epochs, "fusion": fusion,
                "gene_programs": programs_record(programs, result.programs),
                "members": list(members), "encoder": prepared.settings["encoder"], "panel_source": prepared.settings["panel_source"],
                "scale": "normalize_total(1e4) + log1p"}
    var = pd.DataFrame({f"{key_added}_confidence": result.gene_confidence.astype(np.float32),
                        f"{key_added}_share": result.fusion.gene_share.astype(np.float32)},
                       index=pd.Index(prepared.panel, name="gene"))
    transforms = prepared.settings.get("registration", {}).get("sections", [])
    out = []
    for i, (adata, section) in enumerate(zip(objects, stack)):
        measured = i in k
        if measured:
            parts = {"": prepared.expression[i]} | {f"_{p}": prepared.expression[i] for p in ("model", "propagated")}
        else:
            parts = {"": np.maximum(result.fused[i], 0), "_model": result.model[i], "_propagated": result.propagated[i]}
        spots = adata[list(section.adata.obs_names)] if adata.n_obs != section.n_spots else adata
        new = ad.AnnData(X=np.asarray(parts[""], np.float32), obs=spots.obs.copy(), var=var.copy(),
                         obsm=dict(spots.obsm), uns=dict(adata.uns))
        for suffix, values in parts.items():
            new.layers[key_added + suffix] = np.asarray(values, np.float32)
        new.obs[f"{key_added}_reach"] = np.ones(section.n_spots, np.float32) if measured else result.reach[i].astype(np.float32)
        new.obs[f"{key_added}_measured"] = measured
        new.obsm[SPATIAL_3D] = _spatial_3d(stack, section, prepared.coords_ref[i])
        new.uns[key_added] = {
            "panel": list(prepared.panel), "known": [names[j] for j in k], "targets": [names[j] for j in targets],
            "settings": settings, "gene_confidence": result.gene_confidence.astype(np.float32),
            "registration": {"matrix": np.asarray(transforms[i]["matrix"]) if transforms else np.eye(3),
                             "reference": names[0]},
        }
        out.append(new)
    return dict(zip(names, out)) if isinstance(adatas, Mapping) else out


def advise(adatas: Sections, budget: int, *, encoder: str | None = None, um_per_px: float | None = None,
           thickness_um: float = 10.0, cache_dir: str | Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Which `budget` sections to measure: every candidate known set ranked by the expected
    mean per-gene PCC of the other sections, from images and registration only (counts,
    where present, are never read; see `stimpute.advise`).

    Returns the table `rank, known, expected_pcc` (`known`: names joined by `+`); its
    `attrs["details"]` holds, per top candidate, each target's coverage, z distance,
    morphological coverage and expected PCC. The given objects are not changed.
    """
    from stimpute.advise import advise as rank
    from stimpute.advise import check_budget, describe_stack

    names, _, stack = _stack(adatas, um_per_px, thickness_um)
    check_budget(names, budget)
    result = rank(describe_stack(stack, cache_dir=cache_dir, encoder=encoder, progress=progress), budget)
    table = result.table.copy()
    table.attrs["details"] = result.details
    return table


def _stack(adatas: Sections, um_per_px: float | None, thickness_um: float = 10.0) -> tuple[list[str], list[ad.AnnData], Stack]:
    """Names, objects and the in-memory `Stack` of the given sections."""
    objects = list(adatas.values()) if isinstance(adatas, Mapping) else list(adatas)
    if not objects:
        raise StimputeError(None, "no sections given")
    for i, a in enumerate(objects):
        if not isinstance(a, ad.AnnData):
            raise StimputeError(f"section {i}", f"expected an AnnData, got {type(a).__name__}")
    names = [str(n) for n in adatas] if isinstance(adatas, Mapping) else [_name(a, i) for i, a in enumerate(objects)]
    sections = [section_from_anndata(a, n, um_per_px=um_per_px) for n, a in zip(names, objects)]
    return names, objects, Stack(sections, thickness_um=thickness_um)


def _name(adata: ad.AnnData, i: int) -> str:
    libraries = list(dict(adata.uns.get("spatial", {})))
    return str(libraries[0]) if len(libraries) == 1 else f"section{i}"


def _spatial_3d(stack: Stack, section, xy_ref: np.ndarray) -> np.ndarray:
    """(n, 3) registered x, y (reference section's pixels -> µm) and z in µm."""
    xy_um = np.asarray(xy_ref, np.float64) * stack[0].um_per_px
    return np.column_stack([xy_um, np.full(len(xy_um), float(section.z_um))])


def _check_spots_kept(adata: ad.AnnData, section) -> None:
    if adata.n_obs != section.n_spots:
        raise StimputeError(section.name, f"{adata.n_obs - section.n_spots} spot(s) have zero counts; "
                                          "drop them first (sc.pp.filter_cells(adata, min_counts=1))")


def _uns(adata: ad.AnnData, key: str) -> dict:
    adata.uns[key] = dict(adata.uns.get(key, {}))
    return adata.uns[key]


__all__ = ["register", "features", "impute", "advise"]
