"""A run owns its --out (`stimpute.io.run`): inputs are never results, files no run wrote are
never replaced, a second run on a folder is refused, a killed run is resumed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from stimpute.datasets import synthetic_stack
from stimpute.errors import StimputeError
from stimpute.io import write_section
from stimpute.io.run import LOCK_FILE, MANIFEST_FILE, read_manifest, run_ownership
from tests.helpers import one_error_line, run_cli, write_her2st_folder

_run, _one_error_line = run_cli, one_error_line


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    """A folder holding two small synthetic section folders, S0 (known) and S1."""
    root = tmp_path_factory.mktemp("d")
    for s in synthetic_stack(2, seed=4, n_genes=20, tissue_radius_um=300.0, image_size=400):
        write_section(s, root)
    return root


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_impute_into_the_folder_of_its_inputs_refuses_and_leaves_them(stack_dir, force):
    before = _snapshot(stack_dir)
    result = _run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", stack_dir, *force)
    _one_error_line(result, "holds the input", "choose another --out")
    assert _snapshot(stack_dir) == before
    _one_error_line(_run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", stack_dir / "S1" / "r"),
                    "lies inside the input folder")


def test_convert_her2st_into_its_source_refuses(tmp_path):
    src = write_her2st_folder(tmp_path / "raw" / "X1").parent
    before = _snapshot(src)
    for out in (src, src / "X1"):
        _one_error_line(_run("convert", "her2st", src, out, "--force"), "choose another --out")
    assert _snapshot(src) == before


def test_files_no_run_wrote_are_never_replaced_even_with_force(stack_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_text("a killed `stimpute train`, or the user's own file")
    (out / "S1.h5ad").write_text("the user's own file")
    before = _snapshot(out)
    for force in ([], ["--force"]):
        result = _run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", out, *force)
        _one_error_line(result, "which no stimpute run wrote", "never replaced")
    assert _snapshot(out) == before  # no lock, no manifest, nothing replaced


def test_a_killed_train_is_not_this_commands_unfinished_run(stack_dir, tmp_path):
    """checkpoints/ left by a killed `stimpute train` (manifest: train, running): impute
    refuses without --force instead of taking it for its own unfinished run."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_text("train's weights")
    (out / MANIFEST_FILE).write_text(json.dumps({"command": "train", "status": "running", "files": ["checkpoints/", "config.yaml"]}))
    before = _snapshot(out)
    result = _run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", out)
    _one_error_line(result, "already holds results (checkpoints/last.ckpt)", "--force")
    assert _snapshot(out) == before


def test_unwritable_out_or_a_file_as_out_is_one_line(stack_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_error_line(_run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", afile), "is a file, not a folder")
    _one_error_line(_run("register", stack_dir / "S0", stack_dir / "S1", "--out", afile / "sub"), "cannot create the output folder (Not a directory)")
    if os.geteuid() == 0:
        return  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_error_line(_run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", locked / "out"), "cannot create")
    _one_error_line(_run("impute", stack_dir / "S0", stack_dir / "S1", "--known", "S0", "--out", locked), "cannot write")


def test_a_live_lock_refuses_at_once_and_a_stale_one_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "command": "impute"}))
        with pytest.raises(StimputeError, match=f"in use by stimpute impute \\(pid {sleeper.pid}"):
            with run_ownership(out, "impute", force=True):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with run_ownership(out, "impute") as run:  # the holder is gone: stale
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        run.claim(["a.txt"])
        (out / "a.txt").write_text("result")
    assert not (out / LOCK_FILE).exists()
    assert read_manifest(out)["files"] == ["a.txt"] and read_manifest(out)["status"] == "finished"


def test_manifest_names_exactly_the_files_written_and_a_failed_run_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with run_ownership(out, "register") as run:
        run.claim(["t.json", "figures/"])
        (out / "t.json").write_text("{}")
        (out / "figures").mkdir()
        (out / "figures" / "a.png").write_bytes(b"png")
    assert read_manifest(out)["files"] == ["figures/a.png", "t.json"]
    with pytest.raises(StimputeError, match="already holds results"):
        with run_ownership(out, "register") as run:
            run.claim(["t.json"])
    with pytest.raises(StimputeError, match="bad input"):  # fails after claiming, before writing
        with run_ownership(out, "register", force=True) as run:
            run.claim(["t.json", "figures/"])
            raise StimputeError(None, "bad input")
    assert read_manifest(out)["status"] == "finished"  # not mistaken later for an unfinished run
    fresh = tmp_path / "fresh"
    with pytest.raises(StimputeError):
        with run_ownership(fresh, "impute") as run:
            run.claim(["x.h5ad"])
            raise StimputeError(None, "bad input")
    assert not fresh.exists()


def test_a_cache_folder_written_by_another_run_is_owned_through_its_own_manifest(tmp_path):
    out = tmp_path / "out"
    with run_ownership(out / "cache", "features") as run:  # `stimpute features --out out/cache`
        run.claim(caches=["S0.features.h5"])
        (out / "cache" / "S0.features.h5").write_bytes(b"h5")
    with run_ownership(out, "impute") as run:
        run.claim(["S1.h5ad"], caches=["cache/"])
    (out / "cache" / "mine.txt").write_text("the user's")
    with pytest.raises(StimputeError, match="cache/mine.txt, which no stimpute run wrote"):
        with run_ownership(out, "impute", force=True) as run:
            run.claim(["S1.h5ad"], caches=["cache/"])
