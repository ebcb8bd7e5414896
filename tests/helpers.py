"""Small on-disk inputs for tests (HER2-ST-like raw folders, Space Ranger outs/ folders,
HEST-like .h5ad samples), the command line run in-process, and refusals of edited 3DMoEST
H5 files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stimpute

HEAVY = ("torch", "scanpy", "anndata", "sklearn", "lightning")
SRC = Path(stimpute.__file__).parents[1]  # the tree under test, also in the subprocess
IMAGE_SECTION_STACK = dict(n_sections=3, seed=0, n_genes=20, tissue_radius_um=300.0, image_size=600)  # conftest.image_section_impute


def write_her2st_folder(folder: Path, name: str = "X1", n_side: int = 6, pitch: float = 40.0, seed: int = 0,
                        extra_counts_rows: int = 1, missing_counts_rows: int = 1) -> Path:
    """A tiny HER2-ST raw folder: selection table, gzipped counts, JPEG; ids join on `XxY`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = np.meshgrid(np.arange(1, n_side + 1), np.arange(1, n_side + 1))
    sel = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel()})
    sel["new_x"], sel["new_y"] = sel.x, sel.y
    sel["pixel_x"], sel["pixel_y"] = sel.x * pitch, sel.y * pitch
    sel["selected"] = 1
    sel.to_csv(folder / f"{name}_selection.tsv", sep="\t", index=False)
    ids = [f"{x}x{y}" for x, y in zip(sel.x, sel.y)]
    ids = ids[missing_counts_rows:] + [f"{99 + i}x{99 + i}" for i in range(extra_counts_rows)]
    counts = pd.DataFrame(rng.poisson(3, size=(len(ids), 8)), index=ids, columns=[f"G{i}" for i in range(8)])
    with gzip.open(folder / f"{name}.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    size = int(pitch * (n_side + 1))
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"HE_{name}.jpg")
    return folder


def heavy_after(code: str, printed: list[str] | None = None) -> list[str]:
    """The heavy libraries in `sys.modules` after a fresh interpreter runs `code` (`printed`,
    if given, receives what it printed)."""
    probe = f"{code}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    if printed is not None:
        printed.append(done.stdout)
    return eval(done.stdout.strip().splitlines()[-1])


def run_cli(*args):
    """`stimpute ARGS...` in-process (typer's CliRunner); returns its Result."""
    from typer.testing import CliRunner

    from stimpute.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *needles) -> None:
    """Exit code 2 and exactly one line, an error containing every needle."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], result.output


def refuses_moest_h5(path: Path, match: str, delete=(), put=None) -> None:
    """After deleting the `delete` datasets/groups and writing `put` ({key: array}) into the
    3DMoEST file at `path`, reading it raises InputError matching `match`."""
    from stimpute.errors import InputError
    from stimpute.io.moest_h5 import read_moest_h5

    with h5py.File(path, "a") as f:
        for key in delete:
            del f[key]
        for key, value in (put or {}).items():
            f[key] = value
    with pytest.raises(InputError, match=match):
        read_moest_h5(path)


def write_10x_h5(path: Path, counts, barcodes, genes, feature_types=None) -> Path:
    """A 10x feature-barcode matrix HDF5 file (Space Ranger layout: features × barcodes CSC)."""
    from scipy import sparse

    X = sparse.csr_matrix(counts)  # barcodes × features: its CSR arrays are the features × barcodes CSC arrays
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"], m["indices"], m["indptr"] = X.data.astype(np.int32), X.indices.astype(np.int64), X.indptr.astype(np.int64)
        m["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(feature_types or ["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
    return path


def write_spaceranger_outs(folder: Path, section, layout: str = "v2", fullres: bool = True, hires_scalef: float = 0.5,
                           off_tissue: int = 5, antibodies: int = 0) -> Path:
    """A Space Ranger `outs/` folder of `section` (a synthetic Section, counts on spots):
    `layout` v1 (spatial/tissue_positions_list.csv, no header), v2 (tissue_positions.csv,
    header) or parquet; `off_tissue` extra spots with in_tissue 0 and no counts;
    `antibodies` extra non-gene features (CytAssist protein panels); the full-resolution
    image as `outs/<name>_HE.tif` when `fullres`, and spatial/tissue_hires_image.png."""
    outs = folder / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    barcodes = [f"AAAC{i:08d}-1" for i in range(section.n_spots)]
    counts = section.adata.X.toarray().astype(int)
    genes = list(section.genes) + [f"CD{i}_TotalSeqC" for i in range(antibodies)]
    counts = np.c_[counts, np.full((len(counts), antibodies), 7)]
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, genes,
                 ["Gene Expression"] * section.adata.n_vars + ["Antibody Capture"] * antibodies)
    xy = section.xy
    table = pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": section.adata.obs["array_row"].to_numpy(),
                          "array_col": section.adata.obs["array_col"].to_numpy(),
                          "pxl_row_in_fullres": np.round(xy[:, 1]).astype(int), "pxl_col_in_fullres": np.round(xy[:, 0]).astype(int)})
    glass = pd.DataFrame({"barcode": [f"TTTG{i:08d}-1" for i in range(off_tissue)], "in_tissue": 0, "array_row": 0,
                          "array_col": np.arange(off_tissue) * 2, "pxl_row_in_fullres": 5, "pxl_col_in_fullres": 5})
    table = pd.concat([glass, table], ignore_index=True)
    if layout == "v1":
        table.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif layout == "v2":
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        table.to_parquet(spatial / "tissue_positions.parquet", index=False)
    factors = {"spot_diameter_fullres": section.spot_diameter_um / section.um_per_px,
               "fiducial_diameter_fullres": 65.0 / section.um_per_px, "tissue_hires_scalef": hires_scalef,
               "tissue_lowres_scalef": hires_scalef / 4}
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    W, H = section.image.size
    full = Image.fromarray(section.image.read_region(0, 0, W, H))
    full.resize((round(W * hires_scalef), round(H * hires_scalef))).save(spatial / "tissue_hires_image.png")
    if fullres:
        full.save(outs / f"{folder.name}_HE.tif")
    return outs
