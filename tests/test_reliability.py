"""Reliability of `stimpute impute`: bit-identical reruns, SIGKILL and resume, provenance."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from stimpute.datasets import synthetic_stack
from stimpute.io import write_section
from stimpute.pipeline import run_impute
from stimpute.train import TrainConfig

EPOCHS = 40  # short training: a few seconds, long enough to be killed part-way


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Two small synthetic sections written as section folders (S0 known, S1 imputed)."""
    root = tmp_path_factory.mktemp("in")
    return [write_section(s, root) for s in synthetic_stack(2, seed=4, n_genes=20, tissue_radius_um=300.0, image_size=700)]


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory) -> Path:
    """One uninterrupted run (what the CLI does with `--seed 0 --epochs EPOCHS`)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_impute(folders, "S0", out, seed=0, config=TrainConfig(seed=0, max_epochs=EPOCHS))
    return out


def assert_same_results(a: Path, b: Path) -> None:
    """Every `.h5ad` of `a` exists in `b` with bit-identical X and layers; same metrics.csv."""
    names = sorted(p.name for p in a.glob("*.h5ad"))
    assert names and names == sorted(p.name for p in b.glob("*.h5ad"))
    for name in names:
        x, y = ad.read_h5ad(a / name), ad.read_h5ad(b / name)
        assert np.array_equal(x.X, y.X), name
        assert set(x.layers) == set(y.layers)
        for layer in x.layers:
            assert np.array_equal(x.layers[layer], y.layers[layer]), (name, layer)
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()


def test_impute_is_bit_identical_on_rerun(folders, reference, tmp_path):
    run_impute(folders, "S0", tmp_path / "again", seed=0, config=TrainConfig(seed=0, max_epochs=EPOCHS))
    assert_same_results(reference, tmp_path / "again")
