"""Small on-disk inputs for tests (HER2-ST-like raw folders, HEST-like .h5ad samples), the
command line run in-process, and refusals of edited 3DMoEST H5 files."""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image


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
