"""The 3DMoEST H5 layout, read and written, and its conversion to and from stimpute's data.

Layout (one file per stack)::

    dataset.h5
    ├── <section>/                 one group per section, in stack order
    │   ├── uni_features     (N, D)  float32 patch-encoder features
    │   ├── coords_3d        (N, 3)  float64 x, y (µm, reference frame), z (µm)
    │   ├── sobel_gradients  (N, H, W) float32 Sobel gradient magnitude of the spot patch
    │   ├── expression       (N, G)  raw counts (absent for a section without counts)
    │   └── patches          (N, 224, 224, 3) uint8 spot patches (optional)
    └── gene_names           (G,)    gene symbols

Both layouts of the seed are read: the one above (after feature extraction) and the one
before it, `{patches, expression, coords_3d}` per group (features are then computed from
the image rebuilt from the patches, Sobel maps from the same image).

Features are named for what they are: a group holds `<encoder>_features` for one
registered encoder (`uni_features`: UNI, 3DMoEST's own), with the encoder also in the
dataset's `encoder` attribute; stimpute writes handcrafted features as
`handcrafted_features`, never under UNI's name. Read as sections, they travel in
`adata.obsm["<encoder>_features"]` and are used as given (`stimpute.features.stored`).

stimpute adds what its own sections need and the original code ignores: per group
`spot_ids` (N,) and attributes `um_per_px`, `spot_diameter_um`; root attribute
`thickness_um`. Files without them read fine (spot ids are numbered, scale defaults).

`coords_3d` of a stimpute stack: registered spot centres (`coords_ref`, pixels of the first
section) times the first section's µm/px; z = section index × section thickness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from stimpute.data import DEFAULT_SECTION_THICKNESS_UM, Section, Stack, coords_3d
from stimpute.errors import InputError, StimputeError
from stimpute.image import SectionImage
from stimpute.files import atomic_write
from stimpute.io.geometry import check_um_per_px

GENE_NAMES = "gene_names"
ARRAYS = ("coords_3d", "sobel_gradients", "expression", "patches")  # besides the features
MOSAIC_MAX_SIDE = 3000  # px of the image rebuilt from patches when reading an H5 as sections
PATCH_UM = 153.7  # field of view of a 224 px spot patch at HER2-ST resolution (SCALES_UM[0])


@dataclass
class MoestSection:
    """One group of a 3DMoEST H5 file (arrays exactly as stored). `features` (N, D) were
    made by `encoder` (stored as `<encoder>_features`); None with `sobel_gradients` in the
    pre-extraction layout, which has `patches` instead."""

    name: str
    coords_3d: np.ndarray
    features: np.ndarray | None = None
    encoder: str = "uni"
    sobel_gradients: np.ndarray | None = None
    expression: np.ndarray | None = None
    patches: np.ndarray | None = None
    spot_ids: list[str] | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return len(self.coords_3d)


@dataclass
class MoestData:
    """A whole 3DMoEST H5 file: sections in stack order and the shared gene names."""

    sections: list[MoestSection]
    gene_names: list[str]
    attrs: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sections]


def is_moest_h5(path: str | Path) -> bool:
    """True for an HDF5 file with a top-level `gene_names` and at least one group."""
    path = Path(path)
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return GENE_NAMES in f and any(isinstance(v, h5py.Group) for v in f.values())


def read_moest_h5(path: str | Path) -> MoestData:
    """Read and check a 3DMoEST H5 file; errors name the file, group and dataset at fault."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "3DMoEST H5 file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"cannot open as HDF5 ({exc})") from None
    with f:
        if GENE_NAMES not in f:
            raise InputError(path, f"no top-level dataset {GENE_NAMES!r}: not a 3DMoEST H5 file")
        genes = [_text(g) for g in f[GENE_NAMES][()]]
        groups = [k for k, v in f.items() if isinstance(v, h5py.Group)]
        if not groups:
            raise InputError(path, "no section group: expected one group per section")
        order = list(f.attrs.get("section_order", groups))
        sections = [_read_group(path, f[name], len(genes)) for name in order]
        attrs = {k: _plain(v) for k, v in f.attrs.items() if k != "section_order"}
    return MoestData(sections, genes, attrs)


def write_moest_h5(data: MoestData, path: str | Path, force: bool = False) -> Path:
    """Write `data` as a 3DMoEST H5 file (temporary file, then rename)."""
    path = Path(path)
    if path.exists() and not force:
        raise StimputeError(path, "already exists; pass --force to overwrite")
    for section in data.sections:
        _check_section(str(path), section, len(data.gene_names))

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(GENE_NAMES, data=np.asarray(data.gene_names, dtype=object), dtype=h5py.string_dtype())
            f.attrs["section_order"] = np.asarray(data.names, dtype=object)
            for key, value in data.attrs.items():
                f.attrs[key] = value
            for s in data.sections:
                g = f.create_group(s.name)  # features under their encoder's name: see the module doc
                for key in ARRAYS:
                    if (value := getattr(s, key)) is not None:
                        g.create_dataset(key, data=value, compression="gzip" if value.size > 4096 else None)
                if s.features is not None:
                    key = _dataset(s, "features")
                    g.create_dataset(key, data=s.features, compression="gzip" if s.features.size > 4096 else None)
                    g[key].attrs["encoder"] = s.encoder
                if s.spot_ids is not None:
                    g.create_dataset("spot_ids", data=np.asarray(s.spot_ids, dtype=object), dtype=h5py.string_dtype())
                for key, value in s.attrs.items():
                    g.attrs[key] = value

    atomic_write(path, write)
    return path


# -- stimpute -> 3DMoEST -------------------------------------------------------------------
def prepared_to_moest(
    prepared,
    thickness_um: float | None = None,
    genes: Sequence[str] | None = None,
    with_patches: bool = False,
    sobel_size: int | None = None,
) -> MoestData:
    """3DMoEST data of a `PreparedStack`: spot-scale features, coordinates, Sobel maps, counts.

    The features are written under their encoder's name (`<encoder>_features`).
    `genes`: the counts written (default: the prepared panel). Sections without counts
    get no `expression` dataset.
    """
    from stimpute.features.encoders import base_encoder
    from stimpute.features.sobel import SOBEL_SIZE, sobel_gradients
    from stimpute.patches import SCALES_UM, iter_patches

    stack = prepared.stack
    if prepared.coords_ref is None:
        raise StimputeError(None, "the prepared stack has no registered coordinates (coords_ref)")
    genes = list(prepared.panel if genes is None else genes)
    thickness = stack.thickness_um if thickness_um is None else float(thickness_um)
    xyz = coords_3d(stack, prepared.coords_ref, thickness)
    encoder = base_encoder(str(prepared.settings.get("encoder", "handcrafted")))[0]
    sections = []
    for i, s in enumerate(stack):
        counts = None
        if s.has_counts:
            missing = [g for g in genes if g not in s.adata.var_names]
            if missing:
                raise InputError(s.source or s.name, f"genes not measured here: {', '.join(missing[:10])}")
            counts = _dense(s.adata[:, genes].X).astype(np.float32)
        patches = None
        if with_patches:
            patches = np.concatenate([b.patches[:, 0] for b in iter_patches(s, SCALES_UM[:1], out_size=224)])
        sections.append(
            MoestSection(
                name=s.name,
                features=np.asarray(prepared.features[i][:, 0], np.float32),
                encoder=encoder,
                coords_3d=xyz[i],
                sobel_gradients=sobel_gradients(s, sobel_size or SOBEL_SIZE),
                expression=counts,
                patches=patches,
                spot_ids=s.spot_ids,
                attrs={"um_per_px": float(s.um_per_px), "spot_diameter_um": float(s.spot_diameter_um)},
            )
        )
    return MoestData(sections, genes, {"thickness_um": thickness, "encoder": str(prepared.settings.get("encoder", encoder))})


# -- 3DMoEST -> stimpute -------------------------------------------------------------------
def moest_to_stack(data: MoestData, source: str | Path | None = None, um_per_px: float | None = None) -> Stack:
    """Sections of a 3DMoEST file: counts, spot positions in the reference frame, and an image
    rebuilt from the stored patches (white where there is none).

    Spots are placed by `coords_3d` x, y (µm) at `um_per_px` (default: coarse enough that the
    rebuilt image is at most `MOSAIC_MAX_SIDE` px, never finer than the stored scale). The
    arrays of the file travel in `adata.obsm` (`<encoder>_features`, `coords_3d`,
    `sobel_gradients`, where stored).
    """
    every = np.concatenate([s.coords_3d[:, :2] for s in data.sections])
    origin = every.min(axis=0) - PATCH_UM
    extent = float((every.max(axis=0) + PATCH_UM - origin).max())
    check_um_per_px(um_per_px)
    stored = min(float(s.attrs.get("um_per_px", 0.0) or np.inf) for s in data.sections)
    scale = float(um_per_px or max(extent / MOSAIC_MAX_SIDE, stored if np.isfinite(stored) else 0.0))
    thickness = float(data.attrs.get("thickness_um", DEFAULT_SECTION_THICKNESS_UM))
    sections = [_to_section(s, data.gene_names, origin, extent, scale, source) for s in data.sections]
    return Stack(sections, thickness_um=thickness)


def read_moest_section(path: str | Path, um_per_px: float | None = None) -> Section:
    """The one section of a single-group 3DMoEST file (for `stimpute.io.read_section`)."""
    data = read_moest_h5(path)
    if len(data.sections) != 1:
        raise InputError(
            path,
            f"holds {len(data.sections)} sections ({', '.join(data.names)}); convert it with "
            "`stimpute convert moest-h5 FILE OUT` and read the section folders",
        )
    return moest_to_stack(data, source=path, um_per_px=um_per_px)[0]


def moest_to_prepared(data: MoestData, panel: Sequence[str] | None = None, source: str | Path | None = None):
    """A `PreparedStack` straight from the file: stored features as given (as in
    `stimpute.features.stored.stack_features`), registered coordinates from `coords_3d` and
    log1p panel expression of the sections with counts."""
    from stimpute.expression import panel_expression
    from stimpute.features.stored import stack_features
    from stimpute.prepare import PreparedStack

    stack = moest_to_stack(data, source=source)
    genes = list(panel or data.gene_names)
    expression = [panel_expression(s, genes) if s.has_counts else None for s in stack]
    features, record = stack_features(stack)
    coords_ref = [s.xy for s in stack]  # one shared frame and scale for every section
    settings = {"source": str(source) if source else "3DMoEST H5", "encoder": record["encoder"], "features": record}
    return PreparedStack(stack, genes, expression, features, coords_ref, None, settings)


# -- helpers -------------------------------------------------------------------------------
def _read_group(path: Path, g: h5py.Group, n_genes: int) -> MoestSection:
    from stimpute.features.stored import SUFFIX, is_stored_key

    where = f"{path}::/{g.name.strip('/')}"
    if "coords_3d" not in g:
        raise InputError(where, "missing dataset 'coords_3d' (every section group needs it)")
    found = [k for k in g if is_stored_key(k)]
    if len(found) > 1:
        raise InputError(where, f"features of several encoders ({', '.join(found)}): keep one")
    missing = [] if "patches" in g else [k for k, ok in (("uni_features", found), ("sobel_gradients", "sobel_gradients" in g)) if not ok]
    if missing:  # neither layout: {<encoder>_features, coords_3d, sobel_gradients, ...} or {patches, coords_3d, ...}
        raise InputError(where, f"missing dataset {missing[0]!r} and no 'patches' to compute it from: a section group holds "
                                "uni_features (or another <encoder>_features), coords_3d and sobel_gradients, or patches and coords_3d")
    arrays = {key: g[key][()] for key in ARRAYS if key in g}
    if found:
        arrays["features"] = g[found[0]][()]
        arrays["encoder"] = _text(g[found[0]].attrs.get("encoder", found[0][: -len(SUFFIX)]))
        if arrays["encoder"] != found[0][: -len(SUFFIX)]:
            raise InputError(f"{where}/{found[0]}", f"encoder attribute {arrays['encoder']!r} contradicts the dataset's name")
    ids = [_text(v) for v in g["spot_ids"][()]] if "spot_ids" in g else None
    section = MoestSection(name=g.name.strip("/"), spot_ids=ids, attrs={k: _plain(v) for k, v in g.attrs.items()}, **arrays)
    _check_section(str(path), section, n_genes)
    return section


def _check_section(path: str, s: MoestSection, n_genes: int) -> None:
    """Shapes agree: N spots everywhere, D features, 3 coordinates, G genes, finite values."""
    where = f"{path}::/{s.name}"
    n = len(s.coords_3d)
    expected = {
        "features": (2, None),
        "coords_3d": (2, 3),
        "sobel_gradients": (3, None),
        "expression": (2, n_genes),
        "patches": (4, None),
    }
    for key, (ndim, width) in expected.items():
        value = getattr(s, key)
        if value is None:
            continue
        if value.ndim != ndim or len(value) != n or (width is not None and value.shape[1] != width):
            want = {"features": "(N, D)", "coords_3d": "(N, 3)", "sobel_gradients": "(N, H, W)",
                    "expression": f"(N, G={n_genes} genes)", "patches": "(N, 224, 224, 3)"}[key]
            raise InputError(f"{where}/{_dataset(s, key)}", f"shape {value.shape}, expected {want} with N={n} spots")
        if key != "patches" and not np.isfinite(np.asarray(value, float)).all():
            raise InputError(f"{where}/{_dataset(s, key)}", "contains missing or infinite values")
    if s.expression is not None and (np.asarray(s.expression) < 0).any():
        raise InputError(f"{where}/expression", "negative values: expected raw counts")
    if s.spot_ids is not None and len(s.spot_ids) != n:
        raise InputError(f"{where}/spot_ids", f"{len(s.spot_ids)} ids for N={n} spots")


def _to_section(s: MoestSection, genes, origin, extent, scale, source) -> Section:
    xy = (s.coords_3d[:, :2] - origin) / scale
    side = int(np.ceil(extent / scale)) + 1
    canvas = np.full((side, side, 3), 255, np.uint8)
    if s.patches is not None:
        _paste(canvas, s.patches, xy, max(1, int(round(PATCH_UM / scale))))
    counts = s.expression if s.expression is not None else np.zeros((s.n_spots, 0), np.float32)
    adata = ad.AnnData(
        X=sparse.csr_matrix(np.asarray(counts, np.float32)),
        obs=pd.DataFrame(index=pd.Index(s.spot_ids or [f"spot{j}" for j in range(s.n_spots)], name="spot")),
        var=pd.DataFrame(index=pd.Index(genes if s.expression is not None else [], dtype=str, name="gene")),
    )
    adata.obsm["spatial"] = xy
    adata.obsm["coords_3d"] = np.asarray(s.coords_3d)
    if s.sobel_gradients is not None:
        adata.obsm["sobel_gradients"] = np.asarray(s.sobel_gradients)
    if s.features is not None:
        adata.obsm[_dataset(s, "features")] = np.asarray(s.features)
    return Section(
        name=s.name,
        adata=adata,
        image=SectionImage(array=canvas),
        um_per_px=scale,
        spot_diameter_um=float(s.attrs.get("spot_diameter_um", 100.0)),
        z_um=float(s.coords_3d[0, 2]) if s.n_spots else None,
        source=f"{source}::/{s.name}" if source else s.name,
        report={"moest_h5": "image rebuilt from stored patches" if s.patches is not None else "no patches: blank image"},
    )


def _dataset(s: MoestSection, key: str) -> str:
    """The dataset name of a `MoestSection` field: features are `<encoder>_features`."""
    from stimpute.features.stored import stored_key

    return stored_key(s.encoder) if key == "features" else key


def _paste(canvas: np.ndarray, patches: np.ndarray, xy: np.ndarray, side: int) -> None:
    import cv2

    H, W = canvas.shape[:2]
    for patch, (x, y) in zip(patches, xy):
        x0, y0 = int(round(x - side / 2)), int(round(y - side / 2))
        tile = cv2.resize(np.asarray(patch, np.uint8), (side, side), interpolation=cv2.INTER_AREA)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + side, W), min(y0 + side, H)
        if cx1 > cx0 and cy1 > cy0:
            canvas[cy0:cy1, cx0:cx1] = tile[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _dense(X) -> np.ndarray:
    return X.toarray() if sparse.issparse(X) else np.asarray(X)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value):
    if isinstance(value, np.ndarray):
        return [_text(v) if isinstance(v, (bytes, str)) else v for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return _text(value) if isinstance(value, bytes) else value
