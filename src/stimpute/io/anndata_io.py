"""AnnData sections: the project's section folders, HEST-1k style `.h5ad` + WSI, and writing.

Project section folder (what `stimpute convert` writes)::

    <name>/section.h5ad   counts, obsm["spatial"], uns["stimpute"] geometry, uns["spatial"] images
    <name>/image.<ext>    the H&E image, unchanged

`uns["spatial"][library]` follows scanpy's convention (`hires` and `lowres` images, their
scale factors, `metadata["source_image_path"]`: the copied image, absolute) so
`sc.pl.spatial` and squidpy plot the section directly; `uns["stimpute"]["image"]` names
the image relative to the file, which the readers resolve (a moved folder still reads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from stimpute.data import Section
from stimpute.errors import InputError, StimputeError
from stimpute.image import IMAGE_SUFFIXES, SectionImage
from stimpute.io.geometry import VISIUM_SPOT_DIAMETER_UM, Geometry, check_um_per_px, section_geometry
from stimpute.errors import warn_default
from stimpute.io.results import HIRES_SIDE, is_result, read_result, source_image_path, spatial_entry
from stimpute.files import atomic_write, record_write, write_text_atomic  # noqa: F401  (atomic_write, write_text_atomic: re-exported)
from stimpute.io.validate import validate_section

SECTION_FILE = "section.h5ad"


def is_section_folder(path: Path) -> bool:
    return path.is_dir() and (path / SECTION_FILE).is_file()


def read_section_folder(folder: str | Path) -> Section:
    folder = Path(folder)
    return read_h5ad_section(folder / SECTION_FILE, name=folder.name)


def read_h5ad_section(
    h5ad_path: str | Path,
    image: str | Path | None = None,
    name: str | None = None,
    um_per_px: float | None = None,
    spot_diameter_um: float | None = None,
    pitch_um: float | None = None,
) -> Section:
    """Read a section from an `.h5ad` with `obsm["spatial"]` and its image.

    The image is `image` if given, else `uns["stimpute"]["image"]` (relative to the file),
    else the one `uns["spatial"]` library's `metadata["source_image_path"]`, else a sibling
    image with the same stem, else HEST-1k's `../wsis/<stem>.tif`.
    Micrometres per pixel, spot diameter and pitch: `um_per_px`, `spot_diameter_um` and
    `pitch_um` where given, else `uns["stimpute"]`, else HEST-1k metadata, else Visium
    scale factors (`stimpute.io.geometry`); a 55 µm (Visium) spot with a warning where
    nothing gives the diameter.
    """
    h5ad_path = Path(h5ad_path)
    check_um_per_px(um_per_px)
    adata = _read_h5ad(h5ad_path)
    if is_result(adata.uns):  # stimpute's own output: log1p predictions, not counts
        sections = read_result(h5ad_path, adata)
        if len(sections) > 1:
            raise InputError(h5ad_path, f"a block of {len(sections)} sections ({', '.join(s.name for s in sections)}); "
                             "read it with stimpute.io.read_sections")
        return sections[0]
    if "spatial" not in adata.obsm:
        raise InputError(h5ad_path, 'no obsm["spatial"]: spot pixel coordinates are required')
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(h5ad_path, f'obsm["spatial"] must be (n_spots, 2), got shape {xy.shape}')
    adata.obsm["spatial"] = xy[:, :2]
    meta = dict(adata.uns.get("stimpute", {}))
    image_path = Path(image) if image is not None else _find_image(h5ad_path, meta, dict(adata.uns.get("spatial", {})))
    given = {"um_per_px": um_per_px, "spot_diameter_um": spot_diameter_um, "pitch_um": pitch_um}
    geometry = section_geometry(h5ad_path, dict(adata.uns), Geometry(
        **given, sources={k: f"--{k.replace('_', '-')}" for k, v in given.items() if v}))
    scale = geometry.um_per_px
    if not scale:
        raise InputError(h5ad_path, "image scale unknown: pass --um-per-px (no uns['stimpute'], HEST metadata or Visium scalefactors)")
    if geometry.spot_diameter_um is None:
        warn_default(h5ad_path, "spot diameter", VISIUM_SPOT_DIAMETER_UM,
                     "µm, the Visium spot; `stimpute convert h5ad --spot-diameter-um` sets it")
    adata = counts_as_x(adata)
    section = Section(
        name=name or meta.get("section") or h5ad_path.stem,
        adata=adata,
        image=SectionImage.open(image_path),
        um_per_px=float(scale),
        spot_diameter_um=geometry.spot_diameter_um or VISIUM_SPOT_DIAMETER_UM,
        pitch_um=geometry.pitch_um,
        z_um=meta.get("z_um"),
        source=str(h5ad_path),
        report={**dict(meta.get("report", {})), **({"geometry": geometry.sources} if geometry.sources else {})},
    )
    return validate_section(section)


def _json_plain(value):
    """numpy arrays and scalars (a report read back from an .h5ad) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_section(section: Section, out_dir: str | Path, force: bool = False, hires_side: int = HIRES_SIDE) -> Path:
    """Write a section as a project section folder `out_dir/<name>/` (image copied; its
    `hires` copy at most `hires_side` px a side, `lowres` at most 600 px, `io.results.spatial_entry`)."""
    folder = Path(out_dir) / section.name
    target = folder / SECTION_FILE
    if target.exists() and not force:
        raise StimputeError(target, "already exists; pass --force to overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    adata = section.adata.copy()
    image_name = None
    if section.image.path is not None:
        image_name = "image" + section.image.path.suffix.lower()
        _atomic_copy(section.image.path, folder / image_name)
    else:  # in-memory image (synthetic data): store it as PNG
        from PIL import Image

        image_name = "image.png"
        atomic_write(folder / image_name, lambda p: Image.fromarray(section.image.read_region(0, 0, *section.image.size)).save(p, format="PNG"))
    adata.uns["stimpute"] = {
        "section": section.name,
        "image": image_name,
        "um_per_px": float(section.um_per_px),
        "spot_diameter_um": float(section.spot_diameter_um),
        **({"pitch_um": float(section.pitch_um)} if section.pitch_um else {}),
        "report": json.loads(json.dumps(section.report, default=_json_plain)),
        **({"z_um": float(section.z_um)} if section.z_um is not None else {}),
    }
    adata.uns["spatial"] = {section.name: spatial_entry(section, hires_side, source=folder / image_name)}
    write_h5ad_atomic(adata, target, force=True)
    return folder


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path, force: bool = False) -> Path:
    """Write an `.h5ad` under a temporary name, then rename: never a half-written file.
    Text columns of `obs`/`var` in pandas' string dtype become object columns first (`classic_strings`)."""
    path = Path(path)
    if path.exists() and not force:
        raise StimputeError(path, "already exists; pass --force to overwrite")
    for frame in (adata.obs, adata.var):
        classic_strings(frame)
    atomic_write(path, lambda tmp: _write_h5ad(adata, tmp))
    return path


def _write_h5ad(adata: ad.AnnData, path: str) -> None:
    """`adata` as gzip-compressed `.h5ad`, except its RGB images in `uns` (hires, lowres),
    which are stored as they are: gzip gains little on them and costs most of the writing
    time. The file reads as any `.h5ad` does."""
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    import h5py

    images = _images(adata.uns, ("uns",))
    for keys, (parent, name, _) in images.items():
        parent.pop(name, None)  # a dict shared by two paths (a block's reference library) is met twice
    try:
        adata.write_h5ad(path, compression="gzip")
        with h5py.File(path, "a") as f:
            for keys, (_, name, image) in images.items():
                write_elem(f["/".join(keys[:-1])], name, image)
    finally:
        for parent, name, image in images.values():
            parent[name] = image


def _images(uns: dict, keys: tuple) -> dict:
    """Every (h, w, 3|4) uint8 array in the nested dicts of `uns`: its key path -> (dict, key, array)."""
    found = {}
    for name, value in list(uns.items()):
        if isinstance(value, dict):
            found.update(_images(value, (*keys, str(name))))
        elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
            found[(*keys, str(name))] = (uns, name, value)
    return found


def classic_strings(frame: pd.DataFrame) -> None:
    """Turn pandas' string dtype (the default for text from pandas 3) into object columns,
    index and categories, in place: anndata writes those as plain string arrays, which every
    anndata version reads; it refuses nullable strings unless told to, and anndata < 0.11
    cannot read them."""
    for name, column in frame.items():
        if isinstance(column.dtype, pd.StringDtype):
            frame[name] = column.astype(object)
        elif isinstance(column.dtype, pd.CategoricalDtype) and isinstance(column.cat.categories.dtype, pd.StringDtype):
            frame[name] = column.cat.set_categories(column.cat.categories.astype(object))
    if isinstance(frame.index.dtype, pd.StringDtype):
        frame.index = frame.index.astype(object)


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` unless `dst` already holds the same bytes (size and mtime do not
    tell: another image of the same size may be older)."""
    if dst.is_file() and _same_bytes(src, dst):
        record_write(dst)  # kept as this run's copy
        return
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(chunk):
            if block != fb.read(chunk):
                return False
    return True


def _read_h5ad(path: Path) -> ad.AnnData:
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:
        raise InputError(path, f"cannot read .h5ad ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def counts_as_x(adata: ad.AnnData) -> ad.AnnData:
    """Raw counts go to X (sparse float32); `layers["counts"]` wins over a normalised X."""
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if X is None:
        X = sparse.csr_matrix((adata.n_obs, adata.n_vars), dtype=np.float32)
    out = ad.AnnData(X=sparse.csr_matrix(X, dtype=np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    for key, value in adata.obsm.items():  # spatial, plus per-spot arrays such as 3DMoEST's uni_features
        out.obsm[key] = value
    for key in ("spatial", *adata.obsm):  # the scanpy/squidpy image entry, and the records of per-spot arrays
        if key in adata.uns:  # (`stimpute.tl.features`'s encoder), travel with the spots
            out.uns[key] = adata.uns[key]
    out.obs_names = out.obs_names.astype(str)
    out.var_names = out.var_names.astype(str)
    return out


def _find_image(h5ad_path: Path, meta: dict, spatial: dict) -> Path:
    if meta.get("image"):
        return h5ad_path.parent / meta["image"]
    recorded = [Path(p) for p in map(source_image_path, map(dict, spatial.values())) if p]
    if len(recorded) == 1 and recorded[0].is_file():
        return recorded[0]
    for p in sorted(h5ad_path.parent.glob(h5ad_path.stem + ".*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return p
    for sub in ("wsis", "wsi"):
        for p in sorted((h5ad_path.parent.parent / sub).glob(h5ad_path.stem + ".*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                return p
    raise InputError(h5ad_path, "no image found for this section (looked for a sibling image with the same name and in "
                                "../wsis/): put it there, or make a section folder with `stimpute convert h5ad FILE OUT --image PATH`")

