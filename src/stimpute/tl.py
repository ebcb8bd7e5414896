"""Tools on AnnData, scanpy style: `register`, `features`, `impute` and `advise` a stack of sections.

Each function takes the sections of one tissue block in cutting order, as a list of
AnnData objects or a dict name -> AnnData (names are what `known` refers to; a list's
names come from each object's `uns["spatial"]` library id, else `section0`, `section1`,
...). Every object carries `obsm["spatial"]` (spot centres in full-resolution pixels),
raw counts in `X` or `layers["counts"]` (no genes: an unmeasured section) and its H&E
image where scanpy and squidpy keep it (`uns["spatial"][library_id]`; the resolution used
is the highest present: see `stimpute.io.inmemory`). An object with 0 obs is an H&E image
alone (`obsm["spatial"]` may be missing): `impute` lays virtual spots on it, as `stimpute
impute` does on an image file. Nothing is read from or written to disk unless `cache_dir` is given.

The functions build on each other: `impute` reuses the registration `register` left in
`obsm["spatial_3d"]` and the features `features` left in `obsm["X_stimpute_features"]`
instead of computing them again. Spots are treated alike by all three: positions and
image features exist for every spot; spots of a measured section with zero counts are
dropped (with a warning) where expression is learnt, so `impute` returns the kept spots.
`stimpute impute` (the command) is this module on the sections it reads
(`impute_sections`), its results written as they are.

`register` and `features` add fields to the given objects and return them; `impute`
returns new objects, because its values exist only for the gene panel (their `var`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from stimpute.data import Stack
from stimpute.defaults import DEFAULT_FUSION, DEFAULT_PANEL_SIZE
from stimpute.errors import StimputeError
from stimpute.io.inmemory import section_from_anndata
from stimpute.io.results import spatial_3d as registered_xyz

Sections = Sequence[ad.AnnData] | Mapping[str, ad.AnnData]
SPATIAL_3D = "spatial_3d"
FEATURES_KEY = "X_stimpute_features"
FIT_TOLERANCE_PX = 0.5  # a section's spatial_3d is a rigid (or mirrored) map of its pixels to this precision


def register(adatas: Sections, *, key_added: str = "stimpute", um_per_px: float | None = None,
             thickness_um: float = 10.0, device: str = "auto", seed: int = 0, progress: bool = False) -> Sections:
    """Align every section onto the first one (rigid + mirror search, ECC refinement).

    Parameters
    ----------
    adatas
        The sections in cutting order (list, or mapping name -> AnnData).
    key_added
        Where the transforms go: `uns[key_added]["registration"]`.
    um_per_px
        Micrometres per full-resolution pixel (default: `uns["stimpute"]`, else Visium scale factors).
    thickness_um
        Section spacing: z = position × `thickness_um` unless `uns["stimpute"]["z_um"]`.
    device, seed
        Accepted for a uniform signature: registration runs on the CPU and draws no random numbers.
    progress
        Show a progress bar.

    Returns
    -------
    The given objects, each with `obsm["spatial_3d"]` ((n_obs, 3) registered x, y and z in
    µm of the first section's frame, for every spot) and `uns[key_added]["registration"]`
    (`matrix`: 3×3, this section's pixels -> the first section's pixels; `reference`).
    """
    from stimpute.register import apply_transform, register_stack

    names, objects, stack = _stack(adatas, um_per_px, thickness_um, counts=False)
    stack.require_3d()
    registration = register_stack(stack, progress=progress)
    for adata, section, matrix in zip(objects, stack, registration.transforms):
        adata.obsm[SPATIAL_3D] = registered_xyz(apply_transform(matrix, section.xy), stack[0].um_per_px, section.z_um)
        _uns(adata, key_added)["registration"] = {"matrix": np.asarray(matrix), "reference": names[0]}
    return adatas


def features(adatas: Sections, *, encoder: str | None = None, weights: str | Path | None = None,
             key_added: str = FEATURES_KEY, um_per_px: float | None = None, cache_dir: str | Path | None = None,
             device: str = "auto", seed: int = 0, progress: bool = False) -> Sections:
    """Per-spot image features at three scales (spot, 512 µm and 1024 µm windows).

    Parameters
    ----------
    adatas
        The sections (list, or mapping name -> AnnData).
    encoder
        `handcrafted` (no weights) or a network (`resnet18`, `resnet50`, `uni`, `ciga`) with a
        local `weights` file; default: the features the objects carry (`obsm["uni_features"]`,
        ...), else handcrafted (`stimpute.features.stored`).
    key_added
        `obsm` and `uns` key of the result; `stimpute.tl.impute` reads the default one.
    cache_dir
        Feature cache folder (default: none, nothing written).
    device
        Where a network encoder runs: "auto", "cpu" or "cuda".
    seed
        Accepted for a uniform signature: feature extraction draws no random numbers.

    Returns
    -------
    The given objects, each with `obsm[key_added]` ((n_obs, n_scales × dim) float32, the
    scales side by side, for every spot; usable as `sc.pp.neighbors(adata, use_rep=key_added)`)
    and `uns[key_added]` (`encoder`, `scales`, `dim`).
    """
    from stimpute.device import resolve_device
    from stimpute.features.stored import stack_features
    from stimpute.io.results import writable
    from stimpute.patches import SCALES_UM, scale_names

    _, objects, stack = _stack(adatas, um_per_px, counts=False)
    spotted = [i for i, s in enumerate(stack) if s.n_spots]  # an H&E image alone has no spots (yet) to encode
    if not spotted:
        raise StimputeError(None, "no section has spots: an H&E image alone gets virtual spots in stimpute.tl.impute")
    feats, record = stack_features(Stack([stack[i] for i in spotted]), encoder, weights, cache_dir=cache_dir,
                                   progress=progress, hardware={"accelerator": resolve_device(device)})
    values = dict(zip(spotted, feats))
    for i, adata in enumerate(objects):
        shape = values[i].shape if i in values else (0, *feats[0].shape[1:])
        adata.obsm[key_added] = values.get(i, np.zeros(shape, np.float32)).reshape(shape[0], shape[1] * shape[2])
        adata.uns[key_added] = writable({**record, "scales": scale_names(SCALES_UM), "dim": int(shape[2])})
    return adatas


def impute(adatas: Sections, known: str | Sequence[str], *, key_added: str = "stimpute",
           genes: Sequence[str] | None = None, n_top: int = DEFAULT_PANEL_SIZE, seed: int = 0, epochs: int = 200,
           device: str = "auto", fusion: str = DEFAULT_FUSION, members: Sequence[str] | None = None,
           programs: str | int = "auto", encoder: str | None = None, weights: str | Path | None = None,
           um_per_px: float | None = None, thickness_um: float = 10.0, spot_diameter_um: float | None = None,
           pitch_um: float | None = None, grid_scale: float = 1.0, cache_dir: str | Path | None = None,
           progress: bool = False) -> Sections:
    """ASIGN on in-memory sections: learn from the `known` ones and impute every other section.

    Registration and features are reused where `register` and `features` left them
    (`obsm["spatial_3d"]`, `obsm["X_stimpute_features"]`), computed otherwise. A section
    given as its H&E image alone (an AnnData with 0 obs and the image in `uns["spatial"]`)
    gets virtual spots: the known section's spot lattice, laid over its tissue in the
    registered frame (`stimpute.register.grid`), as `stimpute impute` does for an image file.

    Parameters
    ----------
    adatas
        The sections in cutting order (list, or mapping name -> AnnData).
    known
        The measured section(s): a name, a list, or names joined by commas.
    key_added
        Prefix of every field set (below).
    genes, n_top
        The gene panel: `genes`, else the top `n_top` highly variable genes of the known sections.
    seed
        Seed of the training split, initialisation and dropout.
    epochs
        Cap on MSAGNet's training epochs (early stopping on held-out known spots).
    device
        Where training runs: "auto" (a GPU where there is one), "cpu" or "cuda".
    fusion, members, programs
        ASIGN's fusion rule, image members and gene-program rank (`stimpute.models.asign.impute_stack`).
    encoder, weights
        Feature encoder (default: the features the objects carry, else handcrafted).
    um_per_px
        Micrometres per full-resolution pixel of every section (default: each one's
        metadata; an H&E image alone without any: the median of the sections with spots).
    spot_diameter_um, pitch_um, grid_scale
        The virtual spots of H&E-only sections: diameter and pitch in µm (default: the
        known section's) and the pitch multiplier (0.5: a finer grid), as `stimpute impute`'s
        `--spot-diameter-um`, `--pitch-um`, `--grid-scale`.

    Returns
    -------
    One new AnnData per section (same container type and order as `adatas`; the kept
    spots, or the virtual spots of an H&E image alone: obs names `<col>x<row>`, their
    lattice indices in `obs["array_col"/"array_row"]`), `var` = the gene panel, values normalize_total(1e4) + log1p, in the layout of
    `stimpute.io.results`: `X` and `layers[key_added]` (the imputation; measured sections:
    their values), `layers[f"{key_added}_model"]`, `layers[f"{key_added}_propagated"]`,
    `layers[f"{key_added}_weight"]`, `obs["section"]`, `obs["measured"]`,
    `obs[f"{key_added}_reach"]`, `obs[f"{key_added}_confidence"]`, `obsm["spatial_3d"]`,
    `var[f"{key_added}_confidence"]`, `var[f"{key_added}_share"]`, `uns["spatial"]`
    (hires and lowres images), `uns["stimpute"]` and `uns[key_added]` (`panel`, `known`,
    `targets`, `settings`, `registration`). The given objects are not changed.
    """
    from stimpute.device import resolve_device
    from stimpute.models.msagnet_training import TrainConfig
    from stimpute.register.grid import GridOptions

    grid = GridOptions(spot_diameter_um=spot_diameter_um, pitch_um=pitch_um, grid_scale=grid_scale)
    names, objects, stack = _stack(adatas, um_per_px, thickness_um)
    stack.require_3d()
    config = TrainConfig(seed=seed, max_epochs=epochs, accelerator=resolve_device(device))
    done = impute_sections(stack, known, key_added=key_added, genes=list(genes) if genes else None, n_top=n_top,
                           config=config, members=members, fusion=fusion, programs=programs, encoder=encoder,
                           weights=weights, features=given_features(stack, encoder), grid=grid, cache_dir=cache_dir,
                           progress=progress)
    return dict(zip(names, done.adatas)) if isinstance(adatas, Mapping) else done.adatas


@dataclass
class Imputation:
    """What `impute_sections` made: the prepared stack, its registration, ASIGN's result,
    the known and target stack indices, and every section's result AnnData (stack order)."""

    prepared: object
    registration: object
    result: object
    known: list[int]
    targets: list[int]
    adatas: list[ad.AnnData]


def impute_sections(stack: Stack, known, *, key_added: str = "stimpute", genes=None, n_top: int = DEFAULT_PANEL_SIZE,
                    config=None, members: Sequence[str] | None = None, fusion: str = DEFAULT_FUSION,
                    programs: str | int = "auto", encoder: str | None = None, weights: str | Path | None = None,
                    features: tuple[list[np.ndarray], dict] | None = None, grid=None,
                    cache_dir: str | Path | None = None, checkpoints: str | Path | None = None,
                    progress: bool = False) -> Imputation:
    """ASIGN on a `Stack` (what `impute` and `stimpute impute` both run).

    Registration: the positions the sections carry (`obsm["spatial_3d"]`, `given_registration`),
    else registered here, H&E-only sections given virtual spots (`grid`,
    `stimpute.register.grid`). `features`: per section (n, n_scales, dim) and their record,
    else computed (cached in `cache_dir`). `config`: MSAGNet's `TrainConfig` (seed, epochs,
    device); `checkpoints`: its checkpoint folder (a finished training is reused).
    """
    from stimpute import __version__
    from stimpute.io.results import asign_results
    from stimpute.prepare import known_indices, prepare_stack
    from stimpute.register.grid import place_virtual_spots
    from stimpute.models.msagnet import TrainConfig
    from stimpute.trainer import lightning_flags

    k = known_indices(stack, known)
    targets = [i for i in range(len(stack)) if i not in k]
    if not targets:
        raise StimputeError(None, "nothing to impute: every section is known")
    config = config or TrainConfig()
    registration = given_registration(stack) or place_virtual_spots(stack, k, grid, progress=progress)
    prepared = prepare_stack(stack, known=[stack[i].name for i in k], panel=genes, n_top=n_top, encoder=encoder,
                             weights=weights, cache_dir=cache_dir, progress=progress, registration=registration,
                             hardware=lightning_flags(config), features=features)
    # the models after the images: `stimpute.preload` imports them meanwhile
    from stimpute.models.asign import MEMBERS, impute_stack
    from stimpute.models.asign.programs import programs_record

    members = tuple(members or MEMBERS)
    result = impute_stack(prepared, k, seed=config.seed, config=config, ckpt_dir=checkpoints, progress=progress,
                          members=members, fusion=fusion, programs=programs)
    settings = {"stimpute_version": __version__, "seed": config.seed, "epochs": config.max_epochs, "fusion": fusion,
                "gene_programs": programs_record(programs, result.programs), "members": list(members),
                "encoder": prepared.settings["encoder"], "panel_source": prepared.settings["panel_source"],
                "scale": "normalize_total(1e4) + log1p"}
    run = {"panel": list(prepared.panel), "known": [stack[i].name for i in k], "targets": [stack[i].name for i in targets], "settings": settings}
    adatas = asign_results(prepared, result, k, key=key_added, run=run)
    return Imputation(prepared, registration, result, k, targets, adatas)


def given_registration(stack: Stack):
    """The `StackRegistration` the sections carry in `obsm["spatial_3d"]` (from `register`,
    or an earlier run): each section's map of its pixels to the first section's, fitted to
    its spots (exact for a rigid or mirrored map). None where a section carries none, has
    fewer than 3 spots, or its positions are no such map (its images are registered then)."""
    from stimpute.register import StackRegistration, apply_transform

    transforms = []
    for section in stack:
        xyz = section.adata.obsm.get(SPATIAL_3D)
        if xyz is None or section.n_spots < 3:
            return None
        ref_px = np.asarray(xyz, np.float64)[:, :2] / stack[0].um_per_px
        design = np.c_[section.xy, np.ones(section.n_spots)]
        coef, *_ = np.linalg.lstsq(design, ref_px, rcond=None)
        matrix = np.vstack([coef.T, [0.0, 0.0, 1.0]])
        if np.abs(apply_transform(matrix, section.xy) - ref_px).max() > FIT_TOLERANCE_PX:
            return None
        transforms.append(matrix)
    return StackRegistration(stack.names, transforms, [apply_transform(t, s.xy) for t, s in zip(transforms, stack)])


def given_features(stack: Stack, encoder: str | None = None) -> tuple[list[np.ndarray], dict] | None:
    """The features `features` left on every section (`obsm["X_stimpute_features"]` and its
    `uns` record), as (n_spots, n_scales, dim) per section and their record; None where a
    section lacks them, has no spots yet (an H&E image alone: its virtual spots come later)
    or `encoder` names another encoder (they are computed then)."""
    found = []
    for section in stack:
        values, record = section.adata.obsm.get(FEATURES_KEY), dict(section.adata.uns.get(FEATURES_KEY, {}))
        if values is None or not section.n_spots or "dim" not in record or encoder not in (None, record.get("encoder")):
            return None
        values = np.asarray(values, np.float32)
        found.append((values.reshape(len(values), -1, int(record["dim"])), record))
    record = {k: v for k, v in found[0][1].items() if k not in ("scales", "dim")}
    return [values for values, _ in found], {"weights": None, "weights_sha256": None, **record}


def advise(adatas: Sections, budget: int, *, encoder: str | None = None, um_per_px: float | None = None,
           thickness_um: float = 10.0, cache_dir: str | Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Which `budget` sections to measure, from images and registration only.

    Every candidate known set is ranked by how well its sections, transferred through the
    registration, reconstruct the other sections' image pseudo-expression (counts, where
    present, are never read; see `stimpute.advise`).

    Returns
    -------
    The table `rank, known, expected_pcc` (empty: no absolute PCC is claimed), `score, gap,
    loss, loss_low, loss_high, tie, usable_image` (`known`: names joined by `+`; a set with
    no usable image ranks last, its loss not estimated); its `attrs["details"]`
    holds, per top candidate, each target's coverage, z distance, morphological coverage,
    reach and score (its continuity with its best known section). The given objects are not changed.
    """
    from stimpute.advise import advise as rank
    from stimpute.advise import check_budget, describe_stack

    names, _, stack = _stack(adatas, um_per_px, thickness_um)
    check_budget(names, budget)
    result = rank(describe_stack(stack, cache_dir=cache_dir, encoder=encoder, progress=progress), budget)
    table = result.table.copy()
    table.attrs["details"] = result.details
    return table


def _stack(adatas: Sections, um_per_px: float | None, thickness_um: float = 10.0,
           counts: bool = True) -> tuple[list[str], list[ad.AnnData], Stack]:
    """Names, objects and the in-memory `Stack` of the given sections; `counts=False`: their
    spots and images only (every spot kept, for the image-only steps)."""
    objects = list(adatas.values()) if isinstance(adatas, Mapping) else list(adatas)
    if not objects:
        raise StimputeError(None, "no sections given")
    for i, a in enumerate(objects):
        if not isinstance(a, ad.AnnData):
            raise StimputeError(f"section {i}", f"expected an AnnData, got {type(a).__name__}")
    names = [str(n) for n in adatas] if isinstance(adatas, Mapping) else [_name(a, i) for i, a in enumerate(objects)]
    given = objects if counts else [ad.AnnData(obs=a.obs[[]], obsm=dict(a.obsm), uns=dict(a.uns)) for a in objects]
    read = {i: section_from_anndata(a, n, um_per_px=um_per_px) for i, (n, a) in enumerate(zip(names, given)) if a.n_obs}
    scales = [s.um_per_px for s in read.values()]
    default = float(np.median(scales)) if scales else None
    for i, (n, a) in enumerate(zip(names, given)):  # H&E images alone (no spots yet): virtual spots come in `impute`
        if not a.n_obs:
            read[i] = section_from_anndata(a, n, um_per_px=um_per_px, default_um_per_px=default)
    return names, objects, Stack([read[i] for i in range(len(given))], thickness_um=thickness_um)


def _name(adata: ad.AnnData, i: int) -> str:
    libraries = list(dict(adata.uns.get("spatial", {})))
    return str(libraries[0]) if len(libraries) == 1 else f"section{i}"


def _uns(adata: ad.AnnData, key: str) -> dict:
    adata.uns[key] = dict(adata.uns.get(key, {}))
    return adata.uns[key]


__all__ = ["register", "features", "impute", "advise", "impute_sections"]
