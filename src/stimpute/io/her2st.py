"""Reader for HER2-ST raw section folders (Andersson et al. 2021, legacy ST arrays).

A folder holds `<name>.tsv.gz` (counts: spot id `XxY`, one column per gene),
`<name>_selection.tsv` (spots under tissue with pixel centres) and one H&E JPEG.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from stimpute.data import Section
from stimpute.errors import InputError
from stimpute.image import IMAGE_SUFFIXES, SectionImage
from stimpute.io.validate import validate_section

SPOT_PITCH_UM = 200.0  # centre-to-centre distance of legacy ST array spots
SPOT_DIAMETER_UM = 100.0
SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y", "selected")
MIN_MATCHED_FRACTION = 0.5  # below this, counts and spot table belong to different sections


def is_her2st_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_selection.tsv"))


def read_her2st(folder: str | Path) -> Section:
    """Read one HER2-ST section folder into a Section (counts joined to selected spots)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "HER2-ST section folder not found")
    selection_path = _one(folder, "*_selection.tsv", "spot table (*_selection.tsv)")
    name = selection_path.name[: -len("_selection.tsv")]
    counts_path = _one(folder, "*.tsv.gz", "counts file (*.tsv.gz)")
    image_path = _one_image(folder)

    spots = _read_selection(selection_path)
    counts = _read_counts(counts_path)
    matched = spots.index.intersection(counts.index, sort=False)
    if len(matched) < MIN_MATCHED_FRACTION * len(spots):
        raise InputError(
            counts_path,
            f"spot ids do not match the spot table {selection_path.name}: only {len(matched)} of "
            f"{len(spots)} selected spots have a counts row (expected ids like '{spots.index[0]}')",
        )
    report = {
        "spots_selected": int(len(spots)),
        "spots_kept": int(len(matched)),
        "dropped_spots_without_counts": int(len(spots) - len(matched)),
        "dropped_counts_without_spot": int(len(counts.index.difference(spots.index))),
    }
    spots, counts = spots.loc[matched], counts.loc[matched]

    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(
            {"array_col": spots["x"].astype(int).to_numpy(), "array_row": spots["y"].astype(int).to_numpy()},
            index=pd.Index(matched.astype(str), name="spot"),
        ),
        var=pd.DataFrame(index=pd.Index(counts.columns.astype(str), name="gene")),
    )
    adata.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    adata.var_names_make_unique()
    image = SectionImage.open(image_path)
    section = Section(
        name=name,
        adata=adata,
        image=image,
        um_per_px=array_um_per_px(spots),
        spot_diameter_um=SPOT_DIAMETER_UM,
        source=str(folder),
        report=report,
    )
    return validate_section(section)


def array_um_per_px(spots: pd.DataFrame) -> float:
    """Image scale from the spot lattice: pixels per array step fitted by least squares."""
    A = np.c_[spots["x"].to_numpy(float), spots["y"].to_numpy(float), np.ones(len(spots))]
    P = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    coef, *_ = np.linalg.lstsq(A, P, rcond=None)
    px_per_step = np.sqrt(abs(np.linalg.det(coef[:2, :2])))
    return SPOT_PITCH_UM / px_per_step


def _read_selection(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t")
    except Exception as exc:
        raise InputError(path, f"cannot read spot table ({exc})") from None
    missing = [c for c in SELECTION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, f"spot table lacks columns {', '.join(missing)} (expected {' '.join(SELECTION_COLUMNS)})")
    table = table[table["selected"] == 1]
    if table.empty:
        raise InputError(path, "no spots with selected == 1")
    table.index = table["x"].astype(int).astype(str) + "x" + table["y"].astype(int).astype(str)
    if table.index.has_duplicates:
        raise InputError(path, f"duplicated spot positions: {', '.join(table.index[table.index.duplicated()][:5])}")
    return table


def _read_counts(path: Path) -> pd.DataFrame:
    try:
        counts = pd.read_csv(path, sep="\t", index_col=0)
    except Exception as exc:
        raise InputError(path, f"cannot read counts table ({str(exc).splitlines()[0]})") from None
    if counts.empty:
        raise InputError(path, "counts table has no spots or no genes")
    counts.index = counts.index.astype(str)
    if counts.index.has_duplicates:
        raise InputError(path, f"duplicated spot ids: {', '.join(counts.index[counts.index.duplicated()][:5])}")
    values = counts.select_dtypes(include="number")
    if values.shape[1] != counts.shape[1]:
        bad = [c for c in counts.columns if c not in values.columns][:5]
        raise InputError(path, f"non-numeric counts in gene columns {', '.join(map(str, bad))}")
    return counts


def _one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise InputError(folder, f"no {what} found")
    if len(found) > 1:
        raise InputError(folder, f"several {what} found: {', '.join(p.name for p in found)}")
    return found[0]


def _one_image(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise InputError(folder, "no H&E image found (expected one .jpg/.png/.tif)")
    if len(found) > 1:
        raise InputError(folder, f"several images found: {', '.join(p.name for p in found)}")
    return found[0]
