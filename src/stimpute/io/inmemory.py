"""Sections from in-memory AnnData objects laid out as scanpy and squidpy keep them, and back.

A spot table is an AnnData with `obsm["spatial"]` (spot centres in full-resolution pixels)
and raw counts in `layers["counts"]` or `X` (no genes: an unmeasured section). Its H&E
image is found in `uns["spatial"][library_id]`, the highest resolution first:

1. `images["fullres"]`: a full-resolution RGB array;
2. an image file: `metadata["source_image_path"]` (what `sc.read_visium` records; older
   stimpute files: `source_image`) or `uns["stimpute"]["image"]`, read lazily region by
   region at full resolution;
3. `images["hires"]` with `scalefactors["tissue_hires_scalef"]`, else `images["lowres"]`
   with `tissue_lowres_scalef`: a downscaled copy, resampled on the fly (coordinates stay
   in full-resolution pixels; features then see only the detail that copy holds).

Micrometres per pixel: the argument, else `uns["stimpute"]["um_per_px"]`, else Visium's
`scalefactors["spot_diameter_fullres"]` (55 µm spots).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from stimpute.data import Section
from stimpute.errors import InputError, warn_default
from stimpute.image import SectionImage
from stimpute.io.anndata_io import VISIUM_SPOT_DIAMETER_UM, counts_as_x
from stimpute.io.results import source_image_path
from stimpute.io.validate import validate_section

HIRES_SIDE = 2000  # px of the longer side of the hires image `section_to_anndata` stores (Space Ranger's size)


def section_from_anndata(adata: ad.AnnData, name: str, um_per_px: float | None = None,
                         spot_diameter_um: float | None = None, z_um: float | None = None,
                         default_um_per_px: float | None = None) -> Section:
    """A validated `Section` over `adata` (see module docstring); `adata` itself is not changed.

    An AnnData without spots (0 obs; `obsm["spatial"]` may be missing) is an H&E-only
    section: its image alone, to which `stimpute.register.grid` gives virtual spots. Where
    its scale is nowhere recorded, it takes `default_um_per_px` (that of the sections with
    spots), with a warning, as an image file does (`stimpute.io.image_section`).
    """
    if "spatial" not in adata.obsm and adata.n_obs:
        raise InputError(name, 'no obsm["spatial"]: spot pixel coordinates are required')
    xy = np.asarray(adata.obsm["spatial"] if "spatial" in adata.obsm else np.zeros((0, 2)), dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(name, f'obsm["spatial"] must be (n_spots, 2), got shape {xy.shape}')
    meta = dict(adata.uns.get("stimpute", {}))
    library = _library(adata, name)
    scalefactors = dict(library.get("scalefactors", {}))
    counts = counts_as_x(adata)
    counts.obsm["spatial"] = xy[:, :2]
    diameter_px = scalefactors.get("spot_diameter_fullres")
    scale = um_per_px or meta.get("um_per_px") or (VISIUM_SPOT_DIAMETER_UM / float(diameter_px) if diameter_px else None)
    if not scale and not adata.n_obs and default_um_per_px:
        warn_default(name, "micrometres per pixel", default_um_per_px, "µm/px, as the sections with spots; pass um_per_px")
        scale = default_um_per_px
    if not scale:
        raise InputError(name, "image scale unknown: pass um_per_px (no uns['stimpute']['um_per_px'] or Visium spot_diameter_fullres)")
    section = Section(
        name=name, adata=counts, image=_image(library, meta, name), um_per_px=float(scale),
        spot_diameter_um=float(spot_diameter_um or meta.get("spot_diameter_um") or VISIUM_SPOT_DIAMETER_UM),
        pitch_um=meta.get("pitch_um"),
        z_um=z_um if z_um is not None else meta.get("z_um"), source=name,
    )
    return validate_section(section)


def section_to_anndata(section: Section, hires_side: int = HIRES_SIDE, counts: bool = True) -> ad.AnnData:
    """The section as a user holds it in scanpy: counts in X (`counts=False`: no genes, an
    unmeasured section), `obsm["spatial"]` in full-resolution pixels, the image as
    `uns["spatial"][name]["images"]["hires"]` with its scalefactors and the image file's path
    (`metadata["source_image_path"]`, where it has one), geometry in `uns["stimpute"]`."""
    adata = section.adata.copy() if counts else ad.AnnData(obs=section.adata.obs.copy())
    adata.obsm["spatial"] = section.xy
    hires, scale = section.image.thumbnail(hires_side)
    adata.uns["spatial"] = {section.name: {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(section.spot_diameter_px)},
        "metadata": {"source_image_path": str(section.image.path.resolve()) if section.image.path else ""},
    }}
    adata.uns["stimpute"] = {"section": section.name, "um_per_px": float(section.um_per_px),
                             "spot_diameter_um": float(section.spot_diameter_um),
                             **({"pitch_um": float(section.pitch_um)} if section.pitch_um else {})}
    return adata


def library_image(adata: ad.AnnData) -> tuple[np.ndarray, float]:
    """The image array of `uns["spatial"]` best suited to plotting (hires, else lowres, else
    fullres) and its scale (array px per full-resolution px)."""
    library = _library(adata, "adata")
    images, factors = dict(library.get("images", {})), dict(library.get("scalefactors", {}))
    for key, factor in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef"), ("fullres", None)):
        if key in images:
            return np.asarray(images[key]), float(factors[factor]) if factor else 1.0
    raise InputError("adata", 'no image in uns["spatial"][library]["images"] (hires, lowres or fullres)')


def _library(adata: ad.AnnData, name: str) -> dict:
    """`uns["spatial"][library_id]`: the one library, or the one named `name`."""
    spatial = dict(adata.uns.get("spatial", {}))
    if len(spatial) == 1:
        return dict(next(iter(spatial.values())))
    if name in spatial:
        return dict(spatial[name])
    found = ", ".join(map(str, spatial)) or "none"
    raise InputError(name, f'cannot tell which uns["spatial"] library holds the image (libraries: {found}); '
                           "name the section after its library_id")


def _image(library: dict, meta: dict, name: str) -> SectionImage:
    images, factors = dict(library.get("images", {})), dict(library.get("scalefactors", {}))
    if "fullres" in images:
        return SectionImage(array=np.asarray(images["fullres"]))
    path = source_image_path(library) or meta.get("image")
    if path and Path(str(path)).is_file():
        return SectionImage.open(str(path))
    for key, factor in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        if key in images:
            if factor not in factors:
                raise InputError(name, f'uns["spatial"] has a {key} image but no scalefactors["{factor}"]')
            return SectionImage(array=np.asarray(images[key]), scale=float(factors[factor]))
    raise InputError(name, 'no H&E image: expected uns["spatial"][library_id]["images"] (fullres, hires or lowres) '
                           'or an image file at metadata["source_image_path"]')


__all__ = ["section_from_anndata", "section_to_anndata", "library_image"]
