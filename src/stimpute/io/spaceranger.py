"""Reader for 10x Genomics Space Ranger `outs/` folders (Visium v1, v2 and CytAssist).

An `outs/` folder is a section::

    outs/filtered_feature_bc_matrix.h5      counts of the spots under tissue (10x HDF5 layout)
    outs/spatial/tissue_positions_list.csv  spot table without header (Space Ranger 1.x), or
    outs/spatial/tissue_positions.csv       the same with a header (2.x, CytAssist), or
    outs/spatial/tissue_positions.parquet   (3.x)
    outs/spatial/scalefactors_json.json     spot_diameter_fullres, fiducial_diameter_fullres, tissue_*_scalef
    outs/spatial/tissue_hires_image.png     downscaled image (tissue_lowres_image.png: more so)

Space Ranger does not copy the full-resolution image it was given (`spaceranger count
--image`) into `outs/`. The section's image is, in this order: the `image` argument
(`stimpute convert spaceranger --image`), the one image file directly in `outs/` (the
scan, or a link to it, as the HEST library expects it), else `spatial/`'s hires image
with coordinates and scale multiplied by its scale factor, with one warning line (the
features of a 0.1× image see less of the tissue than a full-resolution scan).

Geometry: µm per full-resolution pixel from the 55 µm spot (`spot_diameter_fullres`),
else the 65 µm fiducials (`fiducial_diameter_fullres`), else `microns_per_pixel`; spots
55 µm, pitch 100 µm (Visium). Only spots under tissue (`in_tissue == 1`) are read; the
section is named by the folder above `outs/` (`runs/A1/outs` → `A1`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from stimpute.data import Section
from stimpute.errors import InputError, StimputeWarning
from stimpute.image import IMAGE_SUFFIXES, SectionImage
from stimpute.io.geometry import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, check_um_per_px, positive
from stimpute.io.validate import validate_section

MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
SCALEFACTORS_FILE = "scalefactors_json.json"
FIDUCIAL_DIAMETER_UM = 65.0  # Visium fiducial frame spots
DOWNSCALED_IMAGES = (("tissue_hires_image.png", "tissue_hires_scalef"), ("tissue_lowres_image.png", "tissue_lowres_scalef"))
GENE_EXPRESSION = "Gene Expression"


def spaceranger_outs(path: Path) -> Path | None:
    """The `outs/` folder that `path` is (or holds, for a Space Ranger run folder), else None."""
    for folder in (path, path / "outs"):
        if folder.is_dir() and (folder / MATRIX_FILE).is_file() and (folder / "spatial").is_dir():
            return folder
    return None


def spaceranger_files(outs: Path) -> list[Path]:
    """The files of `outs` a section is read from (the inputs recorded and hashed, not its BAM)."""
    spatial = outs / "spatial"
    names = [outs / MATRIX_FILE, *(spatial / n for n in POSITION_FILES), spatial / SCALEFACTORS_FILE,
             *(spatial / n for n, _ in DOWNSCALED_IMAGES), *_scans(outs)]
    return [p for p in names if p.is_file()]


def read_spaceranger(path: str | Path, image: str | Path | None = None, um_per_px: float | None = None) -> Section:
    """A Section from a Space Ranger `outs/` folder (see the module docstring), validated.

    `image`: the full-resolution image Space Ranger was run on; `um_per_px` overrides
    the scale read from the scale factors.
    """
    path = Path(path)
    outs = spaceranger_outs(path)
    if outs is None:
        raise InputError(path, f"not a Space Ranger outs/ folder: expected {MATRIX_FILE} and spatial/")
    factors, factors_path = _scalefactors(outs)
    scale, source = _full_um_per_px(factors, factors_path)
    if check_um_per_px(um_per_px):
        scale, source = float(um_per_px), "--um-per-px"
    spots = _positions(outs)
    counts = read_10x_h5(outs / MATRIX_FILE)
    matched = spots.index.intersection(counts.obs_names, sort=False)
    if len(matched) == 0:
        raise InputError(outs / MATRIX_FILE, f"none of its barcodes is a spot under tissue in spatial/ "
                                             f"(e.g. {counts.obs_names[0] if counts.n_obs else 'no barcode'})")
    report = {
        "spots_selected": int(len(spots)),
        "spots_kept": int(len(matched)),
        "dropped_spots_without_counts": int(len(spots) - len(matched)),
        "dropped_counts_without_spot": int(len(counts.obs_names.difference(spots.index))),
    }
    spots = spots.loc[matched]
    adata = counts[matched].copy()
    adata.obs = pd.DataFrame({"array_row": spots["array_row"].to_numpy(int), "array_col": spots["array_col"].to_numpy(int)},
                             index=pd.Index(matched.astype(str), name="spot"))
    xy = spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)  # x = column, y = row
    image_path, factor = _image(outs, image, factors, factors_path)
    adata.obsm["spatial"] = xy * factor
    geometry = {"um_per_px": source, "spot_diameter_um": "Visium", "pitch_um": "Visium"}
    if factor != 1.0:
        geometry["image"] = f"spatial/{image_path.name} (× {factor:g} of full resolution)"
    section = Section(
        name=_name(outs),
        adata=adata,
        image=SectionImage.open(image_path),
        um_per_px=scale / factor,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        pitch_um=VISIUM_PITCH_UM,
        source=str(path),
        report={**report, "geometry": geometry},
    )
    return validate_section(section)


def _name(outs: Path) -> str:
    """The folder above `outs/` (`runs/A1/outs` → `A1`), else the folder's own name; `.` too is named."""
    folder = outs.resolve()
    return folder.parent.name if folder.name == "outs" else folder.name


def read_10x_h5(path: Path) -> ad.AnnData:
    """Counts (barcodes × gene-expression features, CSR float32) of a 10x feature-barcode
    matrix HDF5 file (Cell Ranger ≥ 3 / Space Ranger layout: group `matrix`, stored as
    features × barcodes CSC). var_names are gene symbols, `var["gene_ids"]` the Ensembl ids."""
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise InputError(path, "not a 10x feature-barcode matrix: no 'matrix' group (Space Ranger writes one)")
            m = f["matrix"]
            missing = [k for k in ("barcodes", "data", "indices", "indptr", "shape", "features/name", "features/id") if k not in m]
            if missing:
                raise InputError(path, f"10x matrix lacks {', '.join('matrix/' + k for k in missing)}")
            n_features, n_barcodes = (int(v) for v in m["shape"][:2])
            X = sparse.csr_matrix((m["data"][:].astype(np.float32), m["indices"][:], m["indptr"][:]),
                                  shape=(n_barcodes, n_features))
            barcodes = _text(m["barcodes"][:])
            names, ids = _text(m["features/name"][:]), _text(m["features/id"][:])
            kinds = _text(m["features/feature_type"][:]) if "features/feature_type" in m else [GENE_EXPRESSION] * n_features
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"cannot read 10x matrix HDF5 ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    genes = np.array([k == GENE_EXPRESSION for k in kinds])  # CytAssist panels may add antibody capture features
    if not genes.any():
        raise InputError(path, f"no '{GENE_EXPRESSION}' features")
    var = pd.DataFrame({"gene_ids": np.asarray(ids, dtype=object)[genes]},
                       index=pd.Index(np.asarray(names, dtype=object)[genes], name="gene"))
    return ad.AnnData(X=X[:, genes], obs=pd.DataFrame(index=pd.Index(barcodes, name="spot")), var=var)


def _text(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _positions(outs: Path) -> pd.DataFrame:
    """Spots under tissue, indexed by barcode, with the POSITION_COLUMNS as numbers."""
    spatial = outs / "spatial"
    path = next((spatial / n for n in POSITION_FILES if (spatial / n).is_file()), None)
    if path is None:
        raise InputError(spatial, f"no spot table ({', '.join(POSITION_FILES)})")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with_header = path.read_text(errors="replace").lstrip().startswith("barcode")
            table = pd.read_csv(path, header=0 if with_header else None, names=None if with_header else list(POSITION_COLUMNS))
    except ImportError:
        raise InputError(path, "reading parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as exc:
        raise InputError(path, f"cannot read spot table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, f"spot table lacks columns {', '.join(missing)} (expected {','.join(POSITION_COLUMNS)})")
    table = table.set_index(table["barcode"].astype(str))
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(float))
        if bad.any():
            raise InputError(path, f"column {column}: {int(bad.sum())} spot(s) without a number "
                                   f"(e.g. {table[column].iloc[np.flatnonzero(bad)[0]]!r})")
        table[column] = values
    table = table[table["in_tissue"] == 1]
    if table.empty:
        raise InputError(path, "no spot under tissue (in_tissue == 1)")
    if table.index.has_duplicates:
        raise InputError(path, f"duplicated barcodes: {', '.join(table.index[table.index.duplicated()][:5])}")
    return table


def _scalefactors(outs: Path) -> tuple[dict, Path]:
    path = outs / "spatial" / SCALEFACTORS_FILE
    if not path.is_file():
        raise InputError(outs / "spatial", f"no {SCALEFACTORS_FILE}: the spot size and image scale are unknown")
    try:
        factors = json.loads(path.read_text())
    except (ValueError, OSError):
        raise InputError(path, "cannot read Visium scale factors JSON") from None
    if not isinstance(factors, dict):
        raise InputError(path, "not a JSON object of scale factors")
    return factors, path


def _full_um_per_px(factors: dict, path: Path) -> tuple[float, str]:
    """µm per full-resolution pixel and the scale factor it came from."""
    for key, size_um in (("spot_diameter_fullres", VISIUM_SPOT_DIAMETER_UM), ("fiducial_diameter_fullres", FIDUCIAL_DIAMETER_UM)):
        px = positive(factors.get(key))
        if px:
            return size_um / px, f"{path.name} {key} ({size_um:g} µm)"
    if positive(factors.get("microns_per_pixel")):
        return float(factors["microns_per_pixel"]), f"{path.name} microns_per_pixel"
    raise InputError(path, "no spot_diameter_fullres, fiducial_diameter_fullres or microns_per_pixel: image scale unknown")


def _scans(outs: Path) -> list[Path]:
    return sorted(p for p in outs.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _image(outs: Path, image: str | Path | None, factors: dict, factors_path: Path) -> tuple[Path, float]:
    """The image file and its pixels per full-resolution pixel (module docstring)."""
    if image is not None:
        return Path(image), 1.0
    scans = _scans(outs)
    if len(scans) > 1:
        raise InputError(outs, f"several images ({', '.join(p.name for p in scans)}): keep only the full-resolution "
                               "scan in outs/, or name it with `stimpute convert spaceranger --image`")
    if scans:
        return scans[0], 1.0
    for name, key in DOWNSCALED_IMAGES:
        path = outs / "spatial" / name
        if path.is_file():
            factor = positive(factors.get(key))
            if not factor:
                raise InputError(factors_path, f"no {key}: cannot place the spots on spatial/{name}")
            warnings.warn(f"{outs}: no full-resolution image in outs/; using spatial/{name} ({factor:g}× of full resolution): "
                          "put the scanned image (or a link to it) in outs/ for better features", StimputeWarning, stacklevel=4)
            return path, factor
    raise InputError(outs, "no image: put the full-resolution scan in outs/ (spatial/ has no tissue_hires_image.png either)")
