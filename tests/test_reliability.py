"""Reliability of `stimpute impute`: bit-identical reruns, SIGKILL and resume, provenance."""

from __future__ import annotations

import json
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
from PIL import Image

from stimpute.datasets import synthetic_stack
from stimpute.image import SectionImage
from stimpute.io import write_section
from stimpute.pipeline import run_impute
from stimpute.models.msagnet_training import TrainConfig
from tests.helpers import run_cli

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}  # this checkout's code
EPOCHS = 20  # short training: a few seconds, long enough to be killed part-way
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
    """Two small synthetic sections written as section folders (S0 known, S1 imputed), with
    JPEG images: thumbnails are decoded at reduced scale, region reads in full."""
    root = tmp_path_factory.mktemp("in")
    stack = synthetic_stack(2, seed=4, n_genes=20, tissue_radius_um=300.0, image_size=700)
    for section in stack:
        jpeg = root / f"{section.name}.jpg"
        Image.fromarray(section.image.read_region(0, 0, *section.image.size)).save(jpeg, quality=90)
        section.image = SectionImage.open(jpeg)
    return [write_section(s, root) for s in stack]


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


def _impute_process(args: list[str], out: Path, log: Path, prefix: list[str], kill_when=None, meanwhile=None) -> int:
    """Run `stimpute impute` in a subprocess, SIGKILL it once `kill_when()` holds, and check at
    every poll that each `.h5ad` visible in `out` is a complete file. `meanwhile(pid)` is
    called at every poll until it returns True (it must, before the process ends)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, *prefix, "impute", *args], stdout=fh, stderr=fh, env=ENV)
        while proc.poll() is None:
            for f in out.glob("*.h5ad"):
                with h5py.File(f, "r") as h5:  # raises on a half-written file
                    assert "X" in h5 and "layers" in h5, f
            if meanwhile is not None and meanwhile(proc.pid):
                meanwhile = None
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        assert meanwhile is None, "the process ended before `meanwhile` was done"
        return proc.wait()


def _processes_writing(out: Path, wait_s: float) -> list[int]:
    """Pids of live processes whose command line names `out`, after waiting up to `wait_s`."""
    deadline = time.time() + wait_s
    while True:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(out).encode() in (proc / "cmdline").read_bytes() and "Z" not in (proc / "stat").read_text().split(")")[-1][:3]:
                    pids.append(int(proc.name))
            except OSError:
                continue
        if not pids or time.time() > deadline:
            return pids
        time.sleep(0.1)


def _second_runs_refused(out: Path, args: list[str]):
    """`meanwhile` for `_impute_process`: once the running process holds the lock of `out`, a
    second `stimpute impute` on it, with or without --force, is refused at once in one line and
    leaves the running one's feature cache alone."""
    from typer.testing import CliRunner

    from stimpute.cli import app
    from stimpute.files import LOCK_FILE

    def refuse(pid: int) -> bool:
        try:
            if json.loads((out / LOCK_FILE).read_text())["pid"] != pid:
                return False  # not yet taken (a killed run's stale lock is still there)
        except (OSError, ValueError, KeyError):
            return False
        cache = {f: f.stat().st_mtime_ns for f in (out / "cache").glob("*.features.h5")}
        for force in ([], ["--force"]):
            start = time.perf_counter()
            second = CliRunner().invoke(app, ["impute", *args, *force])
            lines = [ln for ln in second.output.splitlines() if ln.strip()]
            assert second.exit_code == 2 and len(lines) == 1 and "in use by stimpute impute" in lines[0], second.output
            assert time.perf_counter() - start < 5
        assert {f: f.stat().st_mtime_ns for f in (out / "cache").glob("*.features.h5")} == cache
        return True

    return refuse


def test_impute_killed_after_features_during_training_and_writing_then_rerun_equals_an_uninterrupted_run(folders, reference, tmp_path):
    """One run killed at each stage in turn, resumed each time without --force; while one of
    them runs, a second run on the same --out is refused at once and the first goes on."""
    from stimpute.files import LOCK_FILE

    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = [*map(str, folders), "--known", "S0", "--out", str(out), "--seed", "0", "--epochs", str(EPOCHS)]
    rc = _impute_process(args, out, log, ["-m", "stimpute"], kill_when=lambda: any((out / "cache").glob("*.features.h5")))
    assert rc == -signal.SIGKILL, log.read_text()
    assert not (out / "checkpoints" / "best.ckpt").exists()  # killed before training
    assert not _processes_writing(out, wait_s=5)  # no feature worker outlives the killed run

    last = out / "checkpoints" / "last.ckpt"
    rc = _impute_process(args, out, log, ["-m", "stimpute"], kill_when=last.exists)  # no --force: never finished
    assert rc == -signal.SIGKILL, log.read_text()
    assert not list(out.glob("*.h5ad")) and not (out / "config.yaml").exists()  # killed while training
    cache = {f: f.stat().st_mtime_ns for f in (out / "cache").glob("*.features.h5")}
    assert len(cache) == 2

    rc = _impute_process(args, out, log, ["-c", KILL_ON_WRITE], meanwhile=_second_runs_refused(out, args))
    assert rc == -signal.SIGKILL, log.read_text()  # resumed training, died inside the first write
    assert list(out.glob(".S1.h5ad.*.part")) and not (out / "S1.h5ad").exists()

    rc = _impute_process(args, out, log, ["-m", "stimpute"])
    assert rc == 0, log.read_text()
    assert_same_results(reference, out)
    assert not list(out.rglob("*.part")) and (out / "config.yaml").is_file() and not (out / LOCK_FILE).exists()
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


def test_rerun_with_force_into_a_copy_of_a_finished_folder_is_bit_identical(folders, reference, tmp_path):
    """The copy's feature cache and checkpoints are reused; registration sees the same thumbnails
    as the first run, which decoded the images in full for the features first."""
    out = shutil.copytree(reference, tmp_path / "copy")
    run_impute(folders, "S0", out, seed=0, force=True, config=TrainConfig(seed=0, max_epochs=EPOCHS))
    assert_same_results(reference, out)
    transforms = [yaml.safe_load((f / "config.yaml").read_text())["registration"]["sections"] for f in (reference, out)]
    assert transforms[0] == transforms[1]


def test_a_killed_train_is_resumed_without_force(folders, tmp_path):
    out, log = tmp_path / "model", tmp_path / "log.txt"
    args = [str(folders[0]), "--out", str(out), "--epochs", str(EPOCHS)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "stimpute", "train", *args], stdout=fh, stderr=fh, env=ENV)
        while proc.poll() is None:
            if (out / "checkpoints" / "last.ckpt").exists():
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL and not (out / "config.yaml").exists()
    resumed = run_cli("train", *args)  # in this process: the resume needs no second interpreter start
    assert resumed.exit_code == 0, resumed.output
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "best.ckpt").is_file()


def test_impute_rerun_on_a_cache_filled_by_stimpute_features_is_bit_identical(folders, reference, tmp_path):
    """A second run in this process (training from scratch) gives the first one's results,
    with the features `stimpute features` computed and left as they were."""
    from typer.testing import CliRunner

    from stimpute.cli import app

    out = tmp_path / "out"
    filled = CliRunner().invoke(app, ["features", *map(str, folders), "--out", str(out / "cache")])
    assert filled.exit_code == 0, filled.output
    cache = {f: f.stat().st_mtime_ns for f in (out / "cache").glob("*.features.h5")}
    assert len(cache) == 2
    run_impute(folders, "S0", out, seed=0, config=TrainConfig(seed=0, max_epochs=EPOCHS))
    assert_same_results(reference, out)
    assert {f: f.stat().st_mtime_ns for f in cache} == cache


def test_force_rerun_with_another_known_leaves_no_earlier_output(folders, reference, tmp_path):
    """Issue 30, case 5: a `--force` rerun with another `--known` kept the old `S1.h5ad` and
    `figures/S1.png` and listed them as its own, against its config.yaml."""
    from stimpute.errors import StimputeWarning
    from stimpute.files import MANIFEST_FILE, read_manifest

    out = shutil.copytree(reference, tmp_path / "out")
    with pytest.warns(StimputeWarning, match=r"--force removed .*S1\.h5ad, figures/S1\.png"):
        run_impute(folders, "S1", out, seed=0, force=True, config=TrainConfig(seed=0, max_epochs=3))
    assert (out / "S0.h5ad").is_file() and not (out / "S1.h5ad").exists() and not (out / "figures" / "S1.png").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["targets"] == ["S0"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    assert read_manifest(out)["files"] == on_disk
