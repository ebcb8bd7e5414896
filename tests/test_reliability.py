"""Reliability of `stimpute impute`: bit-identical reruns, SIGKILL and resume, provenance."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py

import anndata as ad
import numpy as np
import pytest
import yaml

from stimpute.datasets import synthetic_stack
from stimpute.io import write_section
from stimpute.pipeline import run_impute
from stimpute.train import TrainConfig

EPOCHS = 40  # short training: a few seconds, long enough to be killed part-way
KILL_ON_WRITE = """
import os, signal, sys
import anndata
write = anndata.AnnData.write_h5ad
def write_then_die(self, *args, **kwargs):  # the temporary file is complete, the rename never happens
    write(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
anndata.AnnData.write_h5ad = write_then_die
from stimpute.cli import app
app(sys.argv[1:], prog_name="stimpute")
"""


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


def _impute_process(args: list[str], out: Path, log: Path, prefix: list[str], kill_when=None) -> int:
    """Run `stimpute impute` in a subprocess, SIGKILL it once `kill_when()` holds, and check at
    every poll that each `.h5ad` visible in `out` is a complete file."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, *prefix, "impute", *args], stdout=fh, stderr=fh)
        while proc.poll() is None:
            for f in out.glob("*.h5ad"):
                with h5py.File(f, "r") as h5:  # raises on a half-written file
                    assert "X" in h5 and "layers" in h5, f
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        return proc.wait()


def test_impute_killed_during_training_and_writing_then_rerun_equals_an_uninterrupted_run(folders, reference, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = [*map(str, folders), "--known", "S0", "--out", str(out), "--seed", "0", "--epochs", str(EPOCHS)]
    last = out / "checkpoints" / "last.ckpt"
    rc = _impute_process(args, out, log, ["-m", "stimpute"], kill_when=last.exists)
    assert rc == -signal.SIGKILL, log.read_text()
    assert not list(out.glob("*.h5ad")) and not (out / "config.yaml").exists()  # killed while training
    cache = {f: f.stat().st_mtime_ns for f in (out / "cache").glob("*.features.h5")}
    assert len(cache) == 2

    rc = _impute_process(args, out, log, ["-c", KILL_ON_WRITE])  # resumes training, dies inside the first write
    assert rc == -signal.SIGKILL, log.read_text()
    assert list(out.glob(".S1.h5ad.*.part")) and not (out / "S1.h5ad").exists()

    rc = _impute_process(args, out, log, ["-m", "stimpute"])  # no --force needed: the earlier run never finished
    assert rc == 0, log.read_text()
    assert_same_results(reference, out)
    assert not list(out.rglob("*.part")) and (out / "config.yaml").is_file()
    assert {f: f.stat().st_mtime_ns for f in cache} == cache  # features came from the cache
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_force_rerun_replaces_checkpoints_in_place(folders, reference, tmp_path):
    """`--force` into the same folder with other settings: no `best-v1.ckpt` beside the old file."""
    out = shutil.copytree(reference, tmp_path / "out")
    run_impute(folders, "S0", out, seed=1, force=True, config=TrainConfig(seed=1, max_epochs=3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def _assert_provenance(config: Path, folders, seed: int) -> None:
    from stimpute import __version__
    from stimpute.pipeline import input_hash

    record = yaml.safe_load(config.read_text())
    assert record["stimpute_version"] == __version__ and record["seed"] == seed and record["encoder"] == "handcrafted"
    assert [(i["path"], i["sha256"]) for i in record["inputs"]] == [(str(f), input_hash(f)) for f in folders]
    assert record["train"]["seed"] == seed and record["panel"]


def test_every_output_records_version_settings_seed_and_input_hashes(folders, reference, tmp_path):
    from stimpute.models.msagnet import MSAGNetConfig
    from stimpute.pipeline import run_predict, run_train

    _assert_provenance(reference / "config.yaml", folders, 0)
    assert yaml.safe_load((reference / "config.yaml").read_text())["train"]["max_epochs"] == EPOCHS
    run_train(folders[:1], tmp_path / "model", seed=2, config=TrainConfig(seed=2, max_epochs=2, model=MSAGNetConfig(width=16, variant="2d")))
    _assert_provenance(tmp_path / "model" / "config.yaml", folders[:1], 2)
    run_predict(folders[1:], tmp_path / "model", tmp_path / "pred")
    _assert_provenance(tmp_path / "pred" / "config.yaml", folders[1:], 2)
