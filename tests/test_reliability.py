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
# One interpreter that imports what `stimpute impute` and `train` import, once, then forks a
# child per command line read from stdin: the child runs as `python -m stimpute ARGS` would (an
# interpreter's ordinary end through SystemExit), its output appended to its log, and
# "kill_on_write" makes it die inside its first `.h5ad` write, after the temporary file is
# complete and before the rename. The server prints each child's pid and, once it is reaped,
# writes its exit code (negative: the signal) to the child's status file. Each start of a fresh
# interpreter costs ~10 CPU s of imports; the killed runs below would pay it five times.
FORK_SERVER = """
import json, os, signal, sys
import anndata
import stimpute.cli, stimpute.pipeline
from stimpute.preload import preloading
from stimpute.view import warm_plotly
with preloading(warm=[warm_plotly]):  # what a run preloads, imported here once for every child
    pass
print("ready", flush=True)
for line in sys.stdin:
    run = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(run["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if run["kill_on_write"]:
            write = anndata.AnnData.write_h5ad
            def write_then_die(self, *args, **kwargs):
                write(self, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            anndata.AnnData.write_h5ad = write_then_die
        raise SystemExit(stimpute.cli.app(run["args"], prog_name="stimpute"))
    print(pid, flush=True)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    with open(run["status"] + ".part", "w") as fh:
        fh.write(str(code))
    os.replace(run["status"] + ".part", run["status"])
os._exit(0)  # stdin closed: the server ran nothing of its own, so no interpreter teardown (seconds of it)
"""


class Child:
    """A command run by the fork server: its pid, and `poll()` its exit code once it ended (else None)."""

    def __init__(self, pid: int, status: Path):
        self.pid, self.status = pid, status

    def poll(self) -> int | None:
        return int(self.status.read_text()) if self.status.is_file() else None


class ForkServer:
    """The `FORK_SERVER` interpreter; `folder` is on its command line, and so on every child's."""

    def __init__(self, folder: Path):
        self.folder, self.runs = folder, 0
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(folder / "server.log", "ab"), text=True, env=ENV)
        assert self.proc.stdout.readline().strip() == "ready", (folder / "server.log").read_text()

    def start(self, args: list[str], log: Path, kill_on_write: bool = False) -> Child:
        self.runs += 1
        status = self.folder / f"run{self.runs}.status"
        self.proc.stdin.write(json.dumps({"args": args, "log": str(log), "kill_on_write": kill_on_write, "status": str(status)}) + "\n")
        self.proc.stdin.flush()
        pid = self.proc.stdout.readline().strip()
        assert pid, (self.folder / "server.log").read_text()
        return Child(int(pid), status)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield server
    server.proc.stdin.close()
    assert server.proc.wait(timeout=60) == 0


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


def _impute_process(server: ForkServer, args: list[str], out: Path, log: Path, kill_on_write=False, kill_when=None,
                    meanwhile=None) -> int:
    """Run `stimpute impute` in a child of `server`, SIGKILL it once `kill_when()` holds, and
    check at every poll that each `.h5ad` visible in `out` is a complete file. `meanwhile(pid)`
    is called at every poll until it returns True (it must, before the process ends)."""
    child = server.start(["impute", *args], log, kill_on_write)
    while child.poll() is None:
        for f in out.glob("*.h5ad"):
            with h5py.File(f, "r") as h5:  # raises on a half-written file
                assert "X" in h5 and "layers" in h5, f
        if meanwhile is not None and meanwhile(child.pid):
            meanwhile = None
        if kill_when is not None and kill_when():
            os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.02)
    assert meanwhile is None, "the process ended before `meanwhile` was done"
    return child.poll()


def _processes_of(server: ForkServer, wait_s: float) -> list[int]:
    """Pids of live processes forked from `server` (their command line names its folder), after
    waiting up to `wait_s`."""
    deadline = time.time() + wait_s
    while True:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(server.folder).encode() in (proc / "cmdline").read_bytes() and "Z" not in (proc / "stat").read_text().split(")")[-1][:3]:
                    pids.append(int(proc.name))
            except OSError:
                continue
        pids = [pid for pid in pids if pid != server.proc.pid]
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


def test_impute_killed_after_features_during_training_and_writing_then_rerun_equals_an_uninterrupted_run(server, folders, reference, tmp_path):
    """One run killed at each stage in turn, resumed each time without --force; while one of
    them runs, a second run on the same --out is refused at once and the first goes on."""
    from stimpute.files import LOCK_FILE

    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = [*map(str, folders), "--known", "S0", "--out", str(out), "--seed", "0", "--epochs", str(EPOCHS)]
    rc = _impute_process(server, args, out, log, kill_when=lambda: any((out / "cache").glob("*.features.h5")))
    assert rc == -signal.SIGKILL, log.read_text()
    assert not (out / "checkpoints" / "best.ckpt").exists()  # killed before training
    assert not _processes_of(server, wait_s=5)  # no feature worker outlives the killed run

    last = out / "checkpoints" / "last.ckpt"
    rc = _impute_process(server, args, out, log, kill_when=last.exists)  # no --force: never finished
    assert rc == -signal.SIGKILL, log.read_text()
    assert not list(out.glob("*.h5ad")) and not (out / "config.yaml").exists()  # killed while training
    cache = {f: f.stat().st_mtime_ns for f in (out / "cache").glob("*.features.h5")}
    assert len(cache) == 2

    rc = _impute_process(server, args, out, log, kill_on_write=True, meanwhile=_second_runs_refused(out, args))
    assert rc == -signal.SIGKILL, log.read_text()  # resumed training, died inside the first write
    assert list(out.glob(".S1.h5ad.*.part")) and not (out / "S1.h5ad").exists()

    rc = _impute_process(server, args, out, log)
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


def test_a_killed_train_is_resumed_without_force(server, folders, tmp_path):
    out, log = tmp_path / "model", tmp_path / "log.txt"
    args = [str(folders[0]), "--out", str(out), "--epochs", str(EPOCHS)]
    child = server.start(["train", *args], log)
    while child.poll() is None:
        if (out / "checkpoints" / "last.ckpt").exists():
            os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.02)
    assert child.poll() == -signal.SIGKILL and not (out / "config.yaml").exists()
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
