"""The one builder of stimpute's output AnnData (`stimpute.tl.impute` and every command use it), and its readers.

`DIR/<section>.h5ad` (one per imputed section), `DIR/block.h5ad` (every section of the
block, the measured ones included) and the objects `stimpute.tl.impute` returns share one
layout, scverse style, its fields prefixed by `key` (`key_added`, default "stimpute"),
documented field by field in the README ("Outputs"):

- `X` and `layers[key]`: expression on the normalize_total(1e4) + log1p scale, never
  negative (imputed values are clipped at 0, the floor of that scale); on measured
  sections their measured values;
- `layers[f"{key}_model"]`, `layers[f"{key}_propagated"]`, `layers[f"{key}_weight"]`: the
  two parts of the fused value and the propagated share per spot and gene (measured
  sections: their values, share 1); `layers["measured"]` where imputed sections carry counts;
- `obs["section"]`, `obs["measured"]`, `obs[f"{key}_reach"]`, `obs[f"{key}_confidence"]`
  (never NaN: where it is undefined, as for an image-only prediction with no transferred
  expression to compare with, it is `UNDEFINED_CONFIDENCE` and `uns["stimpute"]["confidence"]`
  says why); `obsm["spatial"]` (x, y) in full-resolution pixels of the section's own image;
  `obsm["spatial_3d"]` (x, y, z) in µm in the block's registered frame;
- `var[f"{key}_confidence"]`: per-gene confidence, the PCC of the fused value on known
  spots held out of training; `var[f"{key}_share"]`: the gene's propagated share;
- `uns["spatial"][section]`: `images` `hires` (≤ 2000 px) and `lowres` (≤ 600 px),
  `scalefactors` (`tissue_hires_scalef`, `tissue_lowres_scalef`, `spot_diameter_fullres`)
  and `metadata["source_image_path"]` (absolute) as Space Ranger/scanpy/squidpy expect;
  `uns["stimpute"]` the geometry and source image, `uns[key]` the run (known, targets,
  settings, registration). Everything in `uns` is writable by `write_h5ad` (`writable`).

Files from before issue 26 name the fields `layers["model"/"propagated"/"propagated_weight"]`,
`obs["cli_reach"]`, `obs["confidence"]` and `var["calibration_pcc"]`: `result_field` finds
either name.

`block.h5ad` differs in two places, so that scanpy and squidpy plot it with default
arguments (they refuse several `uns["spatial"]` libraries unless told which): its
`obsm["spatial"]` is each spot's registered position in full-resolution pixels of the
first section (the block's reference frame), and `uns["spatial"]` holds that one section's
library, so every section's spots are drawn where they lie over the reference H&E. Each
spot's position in its own section's pixels is in `obsm["spatial_section"]`, and each
section's library in `uns["stimpute"]["sections"][section]["spatial"]`, its images once in the
block: the reference section's are those of `uns["spatial"]` (`block_library`).

Reading back (`read_result`): the source image when it is still where it was, else the
`hires` image stored in the file (coordinates rescaled to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from stimpute.data import Section
from stimpute.errors import InputError
from stimpute.image import SectionImage

HIRES_SIDE = 2000  # Space Ranger's tissue_hires_image size
LOWRES_SIDE = 600  # Space Ranger's tissue_lowres_image size
SCALE = "normalize_total(1e4) + log1p"
BLOCK_FILE = "block.h5ad"
UNDEFINED_CONFIDENCE = 0.0  # obs[f"{key}_confidence"] where no second estimate exists: no evidence of agreement
NO_SECOND_ESTIMATE = ("undefined: no expression transferred from measured sections to compare the prediction with "
                      f"(image-only prediction); obs['{{key}}_confidence'] is {UNDEFINED_CONFIDENCE:g}")


def spatial_3d(xy_ref: np.ndarray, ref_um_per_px: float, z_um: float | None) -> np.ndarray:
    """(n, 3) registered x, y and z in µm from spots in reference-section pixels."""
    xy_ref = np.asarray(xy_ref, np.float64)
    return np.c_[xy_ref * ref_um_per_px, np.full(len(xy_ref), float(z_um or 0.0))]


def spatial_entry(section: Section, hires_side: int = HIRES_SIDE, source: Path | None = None) -> dict:
    """`uns["spatial"][name]` of a section: hires and lowres images, their scale factors and
    the absolute path of the source image (scanpy's `metadata["source_image_path"]`;
    `source`, else the section's image file, else "")."""
    (hires, hires_scale), (lowres, lowres_scale) = section.image.thumbnails([hires_side, min(LOWRES_SIDE, hires_side)])
    source = source or section.image.path
    source = str(Path(source).resolve()) if source else ""
    return {
        "images": {"hires": hires, "lowres": lowres},
        "scalefactors": {"tissue_hires_scalef": float(hires_scale), "tissue_lowres_scalef": float(lowres_scale),
                         "spot_diameter_fullres": float(section.spot_diameter_px)},
        "metadata": {"source_image_path": source},
    }


def source_image_path(library: dict) -> str:
    """The source image recorded in a `uns["spatial"]` library (scanpy's name, or
    `source_image` as files from before issue 26 wrote it); "" where none is."""
    metadata = dict(library.get("metadata", {}))
    return str(metadata.get("source_image_path") or metadata.get("source_image") or "")


def section_result(section: Section, genes: Sequence[str], X: np.ndarray, xyz_um: np.ndarray, measured: bool, *,
                   key: str = "stimpute", parts: dict | None = None, reach: np.ndarray | None = None,
                   confidence: np.ndarray | None = None, gene_fields: dict | None = None, truth: np.ndarray | None = None,
                   run: dict | None = None) -> ad.AnnData:
    """One section's result AnnData (module docstring); values are clipped at 0.

    `parts`: `layers[f"{key}_{name}"]` (model, propagated, weight); `reach`, `confidence`:
    per spot (defaults: 1 on measured sections; confidence `UNDEFINED_CONFIDENCE` elsewhere);
    `gene_fields`: `var[f"{key}_{name}"]`; `truth`: `layers["measured"]`; `run`: `uns[key]`.
    """
    X = _floor(X)
    adata = ad.AnnData(X=X, obs=section.adata.obs.copy(), var=pd.DataFrame(index=pd.Index(list(genes), name="gene")))
    adata.layers[key] = X.copy()
    for name, values in (parts or {}).items():
        adata.layers[f"{key}_{name}"] = _floor(values)
    if truth is not None:
        adata.layers["measured"] = _floor(truth)
    adata.obs["section"] = pd.Categorical([section.name] * adata.n_obs)
    adata.obs["measured"] = measured
    undefined = confidence is None and not measured
    if reach is not None or measured:
        adata.obs[f"{key}_reach"] = np.asarray(1.0 if reach is None else reach, np.float32)
    adata.obs[f"{key}_confidence"] = np.asarray(
        confidence if confidence is not None else UNDEFINED_CONFIDENCE if undefined else 1.0, np.float32)
    for name, values in section.adata.obsm.items():  # what the section brought: features, given positions
        adata.obsm[name] = np.asarray(values)
    adata.obsm["spatial"] = section.xy
    adata.obsm["spatial_3d"] = np.asarray(xyz_um, np.float64)
    for name, values in (gene_fields or {}).items():
        adata.var[f"{key}_{name}"] = np.asarray(values, np.float32)
    adata.uns["stimpute"] = {
        "section": section.name, "scale": SCALE, "measured": bool(measured), "key": key,
        "um_per_px": float(section.um_per_px), "spot_diameter_um": float(section.spot_diameter_um),
        **({"pitch_um": float(section.pitch_um)} if section.pitch_um else {}),
        **({"image_path": str(section.image.path.resolve())} if section.image.path else {}),
        **({"confidence": NO_SECOND_ESTIMATE.format(key=key)} if undefined else {}),
    }
    if run:
        adata.uns[key] = {**dict(adata.uns.get(key, {})), **writable(run)}
    adata.uns["spatial"] = {section.name: spatial_entry(section)}
    return adata


def asign_results(prepared, result, known: Sequence[int], key: str = "stimpute", run: dict | None = None,
                  sections: Sequence[int] | None = None) -> list[ad.AnnData]:
    """The results of an ASIGN run (`stimpute.models.asign.ImputeResult` on its
    `PreparedStack`; `stimpute impute`, `stimpute.tl.impute` and `stimpute predict` with
    an ASIGN model): of the `sections` (stack indices; default: all) in stack order,
    imputed sections with their parts, reach and per-spot confidence
    (`stimpute.confidence.spot_confidence`), measured sections with their values.
    `layers["measured"]` is there where some imputed section carries counts (zeros on
    those without, marked by `uns["stimpute"]["has_counts"]` False: no output holds NaN)."""
    from stimpute.confidence import spot_confidence

    stack, panel = prepared.stack, list(prepared.panel)
    with_truth = any(prepared.expression[i] is not None for i in range(len(stack)) if i not in known)
    genes = {"confidence": result.gene_confidence, "share": result.fusion.gene_share}
    out = []
    for i in range(len(stack)) if sections is None else sections:
        section = stack[i]
        xyz = spatial_3d(prepared.coords_ref[i], stack[0].um_per_px, section.z_um)
        values = prepared.expression[i]
        truth = (np.zeros((section.n_spots, len(panel)), np.float32) if values is None else values) if with_truth else None
        record = {**(run or {}), "registration": _registration(prepared, i)}
        if i in known:
            ones = np.ones_like(values, np.float32)
            adata = section_result(section, panel, values, xyz, True, key=key, truth=truth, gene_fields=genes, run=record,
                                   parts={"model": values, "propagated": values, "weight": ones})
        else:
            adata = section_result(section, panel, result.fused[i], xyz, False, key=key, truth=truth, gene_fields=genes,
                                   parts={"model": result.model[i], "propagated": result.propagated[i],
                                          "weight": result.weight[i]},
                                   reach=result.reach[i], confidence=spot_confidence(result.model[i], result.transferred[i]),
                                   run=record)
        adata.uns["stimpute"]["has_counts"] = values is not None
        out.append(adata)
    return out


def _registration(prepared, i: int) -> dict:
    """Section i's transform to the reference section's pixels (identity where unregistered)."""
    registration = prepared.settings.get("registration", {})
    sections = registration.get("sections", [])
    matrix = np.asarray(sections[i]["matrix"], np.float64) if sections else np.eye(3)
    return {"matrix": matrix, "reference": registration.get("reference", prepared.stack[0].name)}


def writable(value):
    """`value` as `write_h5ad` stores it in `uns`: text keys, no None (dropped), numpy for
    tuples and numbers, a list of mappings as a mapping by position."""
    if isinstance(value, dict):
        return {str(k): writable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            return {str(i): writable(v) for i, v in enumerate(value)}
        if any(v is None or isinstance(v, (dict, list, tuple)) for v in value):
            return {str(i): writable(v) for i, v in enumerate(value) if v is not None}
        return np.asarray(value) if value else np.asarray([], dtype=object).astype(str)
    if isinstance(value, Path):
        return str(value)
    return value


def result_field(frame, key: str, name: str, old: str | None = None):
    """The column or layer `f"{key}_{name}"` of `frame` (obs, var or layers), or its name in
    files from before issue 26 (`old`); None where neither is there."""
    for candidate in (f"{key}_{name}", old):
        if candidate is not None and candidate in frame:
            return frame[candidate]
    return None


def block_result(parts: Sequence[ad.AnnData]) -> ad.AnnData:
    """Every section's result in one AnnData (module docstring): obs_names
    `<section>:<spot>`, shared var, positions in the reference section's pixels under its
    one `uns["spatial"]` library, each section's own pixels and library kept aside."""
    names = [p.uns["stimpute"]["section"] for p in parts]
    spots = [p.obs_names for p in parts]
    for p, name in zip(parts, names):
        p.obs_names = name + ":" + p.obs_names
    block = ad.concat(list(parts), join="inner", merge="first")
    for p, own in zip(parts, spots):
        p.obs_names = own
    block.obs["section"] = pd.Categorical(block.obs["section"], categories=names)
    reference = names[0]
    block.obsm["spatial_section"] = block.obsm["spatial"]
    block.obsm["spatial"] = block.obsm["spatial_3d"][:, :2] / float(parts[0].uns["stimpute"]["um_per_px"])
    block.uns["spatial"] = {reference: parts[0].uns["spatial"][reference]}
    key = parts[0].uns["stimpute"].get("key", "stimpute")
    sections = {name: {**dict(p.uns.get(key, {})), **dict(p.uns["stimpute"]), "spatial": p.uns["spatial"][name]}
                for p, name in zip(parts, names)}
    sections[reference]["spatial"] = {k: v for k, v in sections[reference]["spatial"].items() if k != "images"}  # once: uns["spatial"]
    block.uns["stimpute"] = {"block": True, "scale": SCALE, "key": key, "order": names, "reference": reference,
                             "sections": sections}
    return block


def block_section(block: ad.AnnData, name: str) -> ad.AnnData:
    """One section of a `block.h5ad` as its own result: `obsm["spatial"]` in that section's
    pixels under its `uns["spatial"]` library (plots over its own H&E with default arguments)."""
    records = dict(block.uns["stimpute"]["sections"])
    if name not in records:
        raise KeyError(f"section {name!r} is not in the block (sections: {', '.join(records)})")
    part = block[block.obs["section"] == name].copy()
    part.obsm["spatial"] = part.obsm.pop("spatial_section")
    record = dict(records[name])
    record.pop("spatial")
    part.uns["spatial"] = {name: block_library(block.uns, name)}
    part.uns["stimpute"] = record
    return part


def block_library(uns: dict, name: str) -> dict:
    """Section `name`'s `uns["spatial"]` library in a block's `uns`: its record's, the
    reference section's images taken from `uns["spatial"]` (the block stores each image once)."""
    library = dict(dict(uns["stimpute"]["sections"][name]).get("spatial", {}))
    if "images" not in library and name in uns.get("spatial", {}):
        library["images"] = uns["spatial"][name]["images"]
    return library


def is_result(uns: dict) -> bool:
    """An `.h5ad` written by `stimpute impute` (expression on the log1p scale, not counts)."""
    return dict(uns.get("stimpute", {})).get("scale") == SCALE


def read_result(path: str | Path, adata: ad.AnnData | None = None) -> list[Section]:
    """Sections of a result file (one, or every section of a block), expression kept in
    `report["imputed_genes"]` only: a result holds no raw counts to learn from."""
    path = Path(path)
    adata = ad.read_h5ad(path) if adata is None else adata
    meta = dict(adata.uns["stimpute"])
    records = [meta["sections"][name] for name in meta["order"]] if meta.get("block") else [meta]
    own_px = "spatial_section" if "spatial_section" in adata.obsm else "spatial"  # blocks: own pixels aside
    sections = []
    for record in records:
        name = record["section"]
        part = adata[adata.obs["section"] == name] if meta.get("block") else adata
        spatial = block_library(adata.uns, name) if meta.get("block") else dict(adata.uns.get("spatial", {})).get(name)
        sections.append(_result_section(path, name, part, record, spatial, np.asarray(part.obsm[own_px], np.float64)))
    return sections


def _result_section(path: Path, name: str, part: ad.AnnData, record: dict, spatial: dict | None,
                    xy: np.ndarray) -> Section:
    um_per_px = float(record["um_per_px"])
    image_path = Path(record.get("image_path", ""))
    report = {"imputed_genes": int(part.n_vars), "measured": bool(record.get("measured", False))}
    if record.get("image_path") and image_path.is_file():
        image = SectionImage.open(image_path)
    elif spatial and "hires" in spatial.get("images", {}):
        scale = float(spatial["scalefactors"]["tissue_hires_scalef"])
        image, xy, um_per_px = SectionImage(array=np.asarray(spatial["images"]["hires"])), xy * scale, um_per_px / scale
        report["image"] = f"uns['spatial']['{name}'] hires (source image {record.get('image_path', '?')} not found)"
    else:
        raise InputError(path, f"no image for section {name}: its source image is gone and uns['spatial'] holds no hires image")
    spots = ad.AnnData(obs=part.obs[[c for c in ("array_row", "array_col") if c in part.obs]].copy())
    spots.obs_names = [n.split(":", 1)[-1] for n in part.obs_names]
    spots.obsm["spatial"] = xy
    z_um = float(np.median(part.obsm["spatial_3d"][:, 2])) if "spatial_3d" in part.obsm and part.n_obs else None
    return Section(name=name, adata=spots, image=image, um_per_px=um_per_px,
                   spot_diameter_um=float(record["spot_diameter_um"]), pitch_um=record.get("pitch_um"),
                   z_um=z_um, source=str(path), report=report)


def _floor(values: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(values, np.float32), 0.0)
