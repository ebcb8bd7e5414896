"""Spot geometry and image scale from the metadata users already have.

Three sources, tried in this order for each value, each naming what it gave:
- HEST-1k metadata JSON (`metadata/<id>.json` beside `st/`, or `<stem>.json` beside the
  file): `pixel_size_um_estimated` (else `pixel_size_um_embedded`), `spot_diameter` and
  `inter_spot_dist` in µm, `st_technology`;
- Space Ranger's `spatial/scalefactors_json.json` and scanpy's `uns["spatial"][lib]
  ["scalefactors"]`: `spot_diameter_fullres` (px) gives µm/px from the spot diameter;
- the image file itself (`image_um_per_px`): TIFF/WSI resolution tags, PNG/JPEG dpi when
  it is plausible for a microscope (a 72 dpi screen default is not).
Where none gives a value, the technology's default is used and one warning line says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from stimpute.errors import InputError, StimputeError, warn_default

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_PITCH_UM = 100.0
LEGACY_ST_SPOT_DIAMETER_UM = 100.0  # Spatial Transcriptomics (Ståhl et al. 2016) arrays, e.g. HER2-ST
LEGACY_ST_PITCH_UM = 200.0
MAX_MICROSCOPE_UM_PER_PX = 10.0  # coarser than this, an image's dpi tag is a screen default, not a scan
TECHNOLOGY_GEOMETRY = {  # st_technology (lower case) -> (spot diameter, pitch) in µm
    "visium": (VISIUM_SPOT_DIAMETER_UM, VISIUM_PITCH_UM),
    "spatial transcriptomics": (LEGACY_ST_SPOT_DIAMETER_UM, LEGACY_ST_PITCH_UM),
}


def check_um_per_px(um_per_px: float | None) -> float | None:
    """The user's `--um-per-px` (None: not given): a pixel size must be a positive number."""
    if um_per_px is not None and not (math.isfinite(um_per_px) and um_per_px > 0):
        raise StimputeError("--um-per-px", f"must be a pixel size > 0 µm, got {um_per_px:g}")
    return um_per_px


@dataclass
class Geometry:
    """µm per full-resolution pixel, spot diameter and pitch (µm); None where unknown.

    `sources` names, per field, where the value came from (recorded in the section report).
    """

    um_per_px: float | None = None
    spot_diameter_um: float | None = None
    pitch_um: float | None = None
    sources: dict = field(default_factory=dict)

    def fill(self, other: "Geometry") -> "Geometry":
        """This geometry with its unknown fields taken from `other`."""
        out = Geometry(self.um_per_px, self.spot_diameter_um, self.pitch_um, dict(self.sources))
        for name in ("um_per_px", "spot_diameter_um", "pitch_um"):
            if getattr(out, name) is None and getattr(other, name) is not None:
                setattr(out, name, getattr(other, name))
                out.sources[name] = other.sources.get(name, "?")
        return out


def section_geometry(h5ad_path: Path, uns: dict, given: Geometry | None = None) -> Geometry:
    """Geometry of an `.h5ad` section: `given` (the user's options), then `uns["stimpute"]`,
    HEST metadata, Visium scale factors."""
    own = dict(uns.get("stimpute", {}))
    geometry = Geometry(positive(own.get("um_per_px")), positive(own.get("spot_diameter_um")),
                        positive(own.get("pitch_um")))
    geometry.sources = {k: "uns['stimpute']" for k in ("um_per_px", "spot_diameter_um", "pitch_um") if getattr(geometry, k)}
    geometry = (given or Geometry()).fill(geometry).fill(hest_geometry(h5ad_path))
    scalefactors = visium_scalefactors(h5ad_path, uns)
    if scalefactors and geometry.um_per_px is None and positive(scalefactors[0].get("spot_diameter_fullres")):
        if geometry.spot_diameter_um is None:
            warn_default(h5ad_path, "spot diameter", VISIUM_SPOT_DIAMETER_UM, "µm, the Visium spot of Space Ranger scale factors")
        diameter_um = geometry.spot_diameter_um or VISIUM_SPOT_DIAMETER_UM
        geometry = geometry.fill(Geometry(
            um_per_px=diameter_um / float(scalefactors[0]["spot_diameter_fullres"]),
            spot_diameter_um=diameter_um, pitch_um=VISIUM_PITCH_UM if diameter_um == VISIUM_SPOT_DIAMETER_UM else None,
            sources={"um_per_px": f"{scalefactors[1]} spot_diameter_fullres", "spot_diameter_um": "Visium default",
                     "pitch_um": "Visium default"},
        ))
    return geometry


def hest_metadata(path: Path) -> tuple[dict, Path] | None:
    """HEST-1k metadata of a sample file: `../metadata/<stem>.json`, else `<stem>.json` beside it."""
    for candidate in (path.parent.parent / "metadata" / f"{path.stem}.json", path.with_suffix(".json")):
        if candidate.is_file() and candidate != path:
            try:
                meta = json.loads(candidate.read_text())
            except (ValueError, OSError):
                raise InputError(candidate, "cannot read metadata JSON") from None
            if isinstance(meta, dict):
                return meta, candidate
    return None


def hest_geometry(path: Path) -> Geometry:
    """Geometry from a HEST-1k metadata JSON (see `hest_metadata`); empty when there is none."""
    found = hest_metadata(path)
    if found is None:
        return Geometry()
    meta, meta_path = found
    technology = TECHNOLOGY_GEOMETRY.get(str(meta.get("st_technology", "")).strip().lower(), (None, None))
    values = {
        "um_per_px": (positive(meta.get("pixel_size_um_estimated")), "pixel_size_um_estimated"),
        "spot_diameter_um": (positive(meta.get("spot_diameter")), "spot_diameter"),
        "pitch_um": (positive(meta.get("inter_spot_dist")), "inter_spot_dist"),
    }
    if values["um_per_px"][0] is None:
        values["um_per_px"] = (positive(meta.get("pixel_size_um_embedded")), "pixel_size_um_embedded")
    geometry = Geometry()
    for name, (value, key) in values.items():
        if value is not None:
            setattr(geometry, name, value)
            geometry.sources[name] = f"{meta_path.name} {key}"
    tech = Geometry(None, technology[0], technology[1],
                    {"spot_diameter_um": f"{meta_path.name} st_technology", "pitch_um": f"{meta_path.name} st_technology"})
    return geometry.fill(tech)


def visium_scalefactors(h5ad_path: Path, uns: dict) -> tuple[dict, str] | None:
    """Space Ranger scale factors: `uns["spatial"][lib]["scalefactors"]`, else a
    `scalefactors_json.json` in `spatial/` beside the file or one folder up."""
    for lib in dict(uns.get("spatial", {})).values():
        factors = dict(dict(lib).get("scalefactors", {}))
        if factors:
            return factors, "uns['spatial']"
    for folder in (h5ad_path.parent / "spatial", h5ad_path.parent.parent / "spatial", h5ad_path.parent):
        path = folder / "scalefactors_json.json"
        if path.is_file():
            try:
                return dict(json.loads(path.read_text())), path.name
            except (ValueError, OSError):
                raise InputError(path, "cannot read Visium scale factors JSON") from None
    return None


def image_um_per_px(path: Path) -> tuple[float, str] | None:
    """µm per pixel stored in an image file (WSI mpp, TIFF resolution, PNG/JPEG dpi), if plausible."""
    suffix = path.suffix.lower()
    value = None
    if suffix in (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif", ".qptiff"):
        value = _slide_mpp(path)
    if value is None:
        value = _dpi_um_per_px(path)
    if value is None or not 0 < value <= MAX_MICROSCOPE_UM_PER_PX:
        return None
    return value, "image resolution tags"


def _slide_mpp(path: Path) -> float | None:
    try:
        import tiffslide

        with tiffslide.TiffSlide(str(path)) as slide:
            mpp = slide.properties.get("tiffslide.mpp-x")
    except Exception:
        return None
    return positive(mpp)


def _dpi_um_per_px(path: Path) -> float | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
    except Exception:
        return None
    if not dpi or not positive(dpi[0]):
        return None
    return 25400.0 / float(dpi[0])


def positive(value) -> float | None:
    """`value` as a float where it is a finite number > 0, else None (a missing or bad metadata field)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 and value == value and value != float("inf") else None
