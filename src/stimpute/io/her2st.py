"""Reader for HER2-ST raw section folders (Andersson et al. 2021, legacy ST arrays).

A folder holds `<name>.tsv.gz` (counts: spot id `XxY`, one column per gene),
`<name>_selection.tsv` (spots under tissue with pixel centres) and one H&E JPEG.
"""

from __future__ import annotations

import csv
import gzip
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from stimpute.data import Section
from stimpute.errors import InputError, StimputeWarning
from stimpute.image import IMAGE_SUFFIXES, SectionImage
from stimpute.io.validate import validate_section

SPOT_PITCH_UM = 200.0  # centre-to-centre distance of legacy ST array spots
SPOT_DIAMETER_UM = 100.0
SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y", "selected")
MIN_MATCHED_FRACTION = 0.5  # below this, counts and spot table belong to different sections
WARN_MATCHED_FRACTION = 0.9  # below this, they may not: a warning


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
        X=sparse.csr_matrix(_float32(counts.to_numpy())),
        obs=pd.DataFrame(
            {"array_col": spots["x"].astype(int).to_numpy(), "array_row": spots["y"].astype(int).to_numpy()},
            index=pd.Index(matched.astype(str), name="spot"),
        ),
        var=pd.DataFrame(index=pd.Index(counts.columns.astype(str), name="gene")),
    )
    adata.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    _check_join(spots, report, selection_path, counts_path)
    image = SectionImage.open(image_path)
    section = Section(
        name=name,
        adata=adata,
        image=image,
        um_per_px=array_um_per_px(spots),
        spot_diameter_um=SPOT_DIAMETER_UM,
        pitch_um=SPOT_PITCH_UM,
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


def _float32(values: np.ndarray) -> np.ndarray:
    """Counts as float32; values beyond its range become inf, which validation reports."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def _check_join(spots: pd.DataFrame, report: dict, selection_path: Path, counts_path: Path) -> None:
    """Warn where counts may be joined to the wrong spots: array x/y that do not follow
    pixel x/y (swapped columns), or many selected spots without a counts row."""
    A = np.c_[spots["x"].to_numpy(float), spots["y"].to_numpy(float), np.ones(len(spots))]
    coef, *_ = np.linalg.lstsq(A, spots[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)
    if len(spots) >= 3 and abs(coef[0, 1]) + abs(coef[1, 0]) > abs(coef[0, 0]) + abs(coef[1, 1]):
        warnings.warn(f"{selection_path}: pixel_x follows array y and pixel_y array x: are columns x and y swapped? "
                      f"Counts join on the ids 'XxY' of {counts_path.name}, so they may sit on the wrong spots",
                      StimputeWarning, stacklevel=3)
    if report["dropped_spots_without_counts"] > (1 - WARN_MATCHED_FRACTION) * report["spots_selected"]:
        warnings.warn(f"{counts_path}: only {report['spots_kept']} of {report['spots_selected']} selected spots have a "
                      f"counts row (ids of {selection_path.name} and the counts may not belong together)",
                      StimputeWarning, stacklevel=3)


def _read_selection(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t")
    except Exception as exc:
        raise InputError(path, f"cannot read spot table ({exc})") from None
    missing = [c for c in SELECTION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, f"spot table lacks columns {', '.join(missing)} (expected {' '.join(SELECTION_COLUMNS)})")
    table = table[pd.to_numeric(table["selected"], errors="coerce") == 1].copy()
    if table.empty:
        raise InputError(path, "no spots with selected == 1")
    for column in SELECTION_COLUMNS[:4]:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(float))
        if bad.any():
            first = table[column].iloc[np.flatnonzero(bad)[0]]
            raise InputError(path, f"column {column}: {int(bad.sum())} selected spot(s) without a number (e.g. {first!r})")
        table[column] = values
    table.index = table["x"].astype(int).astype(str) + "x" + table["y"].astype(int).astype(str)
    if table.index.has_duplicates:
        raise InputError(path, f"duplicated spot positions: {', '.join(table.index[table.index.duplicated()][:5])}")
    return table


def _read_counts(path: Path) -> pd.DataFrame:
    """The counts table with its gene names as written: pandas would rename duplicated
    headers (`G.1`); `validate_section` makes them unique as `NAME-1` with a warning."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", newline="") as f:  # pandas builds a Series per gene
            header = np.asarray(next(csv.reader(f, delimiter="\t"), []), dtype=object)
        counts = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0, low_memory=False)  # one chunk: no per-column concatenation of ~15,000 genes
    except pd.errors.EmptyDataError:
        raise InputError(path, "counts table has no spots or no genes") from None
    except Exception as exc:
        raise InputError(path, f"cannot read counts table ({str(exc).splitlines()[0]})") from None
    extra = len(header) - counts.shape[1]  # 1 where the header names the spot id column, 0 where it does not
    if extra not in (0, 1):
        raise InputError(path, f"the header has {len(header)} fields but the rows hold {counts.shape[1]} counts after the spot id")
    counts.columns = header[extra:]
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
