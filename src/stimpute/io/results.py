"""What `stimpute impute` writes, as AnnData users open in scanpy and squidpy, and read back.

`DIR/<section>.h5ad` (one per imputed section) and `DIR/block.h5ad` (every section of the
block, the measured ones included) share one layout, documented field by field in the
README ("Outputs"):

- `X`: expression on the normalize_total(1e4) + log1p scale, never negative (imputed
  values are clipped at 0, the floor of that scale); `layers` likewise;
- `obs["section"]`, `obs["measured"]`, `obs["confidence"]` (never NaN: where it is undefined,
  as for an image-only prediction with no transferred expression to compare with, it is
  `UNDEFINED_CONFIDENCE` and `uns["stimpute"]["confidence"]` says why); `obsm["spatial"]` (x, y) in
  full-resolution pixels of the section's own image; `obsm["spatial_3d"]` (x, y, z) in
  µm in the block's registered frame;
- `var["calibration_pcc"]`: per-gene confidence, the PCC of the fused value on known
  spots held out of training;
- `uns["spatial"][section]`: `images` `hires` (≤ 2000 px) and `lowres` (≤ 600 px) and
  `scalefactors` (`tissue_hires_scalef`, `tissue_lowres_scalef`, `spot_diameter_fullres`)
  as Space Ranger/scanpy/squidpy expect; `uns["stimpute"]` the geometry and source image.

`block.h5ad` differs in two places, so that scanpy and squidpy plot it with default
arguments (they refuse several `uns["spatial"]` libraries unless told which): its
`obsm["spatial"]` is each spot's registered position in full-resolution pixels of the
first section (the block's reference frame), and `uns["spatial"]` holds that one section's
library, so every section's spots are drawn where they lie over the reference H&E. Each
spot's position in its own section's pixels is in `obsm["spatial_section"]`, and each
section's library in `uns["stimpute"]["sections"][section]["spatial"]`.

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
UNDEFINED_CONFIDENCE = 0.0  # obs["confidence"] where no second estimate exists: no evidence of agreement
NO_SECOND_ESTIMATE = ("undefined: no expression transferred from measured sections to compare the prediction with "
                      f"(image-only prediction); obs['confidence'] is {UNDEFINED_CONFIDENCE:g}")


def spatial_3d(xy_ref: np.ndarray, ref_um_per_px: float, z_um: float | None) -> np.ndarray:
    """(n, 3) registered x, y and z in µm from spots in reference-section pixels."""
    xy_ref = np.asarray(xy_ref, np.float64)
    return np.c_[xy_ref * ref_um_per_px, np.full(len(xy_ref), float(z_um or 0.0))]


def spatial_entry(section: Section) -> dict:
    """`uns["spatial"][name]` of a section: hires and lowres images and their scale factors."""
    hires, hires_scale = section.image.thumbnail(HIRES_SIDE)
    lowres, lowres_scale = section.image.thumbnail(LOWRES_SIDE)
    return {
        "images": {"hires": hires, "lowres": lowres},
        "scalefactors": {"tissue_hires_scalef": float(hires_scale), "tissue_lowres_scalef": float(lowres_scale),
                         "spot_diameter_fullres": float(section.spot_diameter_px)},
        "metadata": {"source_image": str(section.image.path) if section.image.path else ""},
    }


def section_result(section: Section, genes: Sequence[str], X: np.ndarray, xyz_um: np.ndarray, measured: bool,
                   layers: dict | None = None, obs: dict | None = None, gene_confidence: np.ndarray | None = None) -> ad.AnnData:
    """One section's result AnnData (module docstring); imputed values are clipped at 0."""
    adata = ad.AnnData(X=_floor(X), obs=section.adata.obs.copy(), var=pd.DataFrame(index=pd.Index(list(genes), name="gene")))
    for name, values in (layers or {}).items():
        adata.layers[name] = _floor(values)
    adata.obs["section"] = pd.Categorical([section.name] * adata.n_obs)
    adata.obs["measured"] = measured
    for name, values in (obs or {}).items():
        adata.obs[name] = np.asarray(values)
    undefined = "confidence" not in adata.obs and not measured
    if "confidence" not in adata.obs:
        adata.obs["confidence"] = np.float32(UNDEFINED_CONFIDENCE if undefined else 1.0)
    adata.obsm["spatial"] = section.xy
    adata.obsm["spatial_3d"] = np.asarray(xyz_um, np.float64)
    if gene_confidence is not None:
        adata.var["calibration_pcc"] = np.asarray(gene_confidence, np.float32)
    adata.uns["stimpute"] = {
        "section": section.name, "scale": SCALE, "measured": bool(measured),
        "um_per_px": float(section.um_per_px), "spot_diameter_um": float(section.spot_diameter_um),
        **({"pitch_um": float(section.pitch_um)} if section.pitch_um else {}),
        **({"image_path": str(section.image.path.resolve())} if section.image.path else {}),
        **({"confidence": NO_SECOND_ESTIMATE} if undefined else {}),
    }
    adata.uns["spatial"] = {section.name: spatial_entry(section)}
    return adata


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
    sections = {name: {**dict(p.uns["stimpute"]), "spatial": p.uns["spatial"][name]} for p, name in zip(parts, names)}
    block.uns["stimpute"] = {"block": True, "scale": SCALE, "order": names, "reference": reference, "sections": sections}
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
    part.uns["spatial"] = {name: record.pop("spatial")}
    part.uns["stimpute"] = record
    return part


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
        spatial = record.get("spatial") or dict(adata.uns.get("spatial", {})).get(name)
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
