"""A run owns its --out (`stimpute.files`): inputs are never results, files no run wrote are
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
from stimpute.files import write_text_atomic
from stimpute.files import LOCK_FILE, MANIFEST_FILE, read_manifest, run_ownership
from tests.helpers import heavy_after, one_error_line, run_cli, write_her2st_folder, write_spaceranger_outs

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
        write_text_atomic(out / "a.txt", "result")
    assert not (out / LOCK_FILE).exists()
    assert read_manifest(out)["files"] == ["a.txt"] and read_manifest(out)["status"] == "finished"


@pytest.mark.parametrize("inside", [False, True])
def test_a_busy_out_is_refused_before_the_heavy_imports(stack_dir, tmp_path, inside):
    """Issue 26: a refused run cost 7.9 CPU s (torch, anndata, scanpy loaded first). The
    command line now says so, one line and exit code 2, with no heavy library imported;
    also for an --out inside a folder that a live run holds."""
    held = tmp_path / "held"
    out = held / "inner" if inside else held
    probe = ("from typer.testing import CliRunner\nfrom stimpute.cli import app\n"
             f"r = CliRunner().invoke(app, ['impute', {str(stack_dir / 'S0')!r}, {str(stack_dir / 'S1')!r}, "
             f"'--known', 'S0', '--out', {str(out)!r}])\n"
             "assert r.exit_code == 2 and r.output.startswith('error:') and len(r.output.strip().splitlines()) == 1, r.output\n"
             f"assert {'lies inside' if inside else 'is in use by stimpute impute'!r} in r.output, r.output")
    with run_ownership(held, "impute"):
        assert heavy_after(probe) == []
    assert not out.exists()


def test_manifest_names_exactly_the_files_written_and_a_failed_run_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with run_ownership(out, "register") as run:
        run.claim(["t.json", "figures/"])
        write_text_atomic(out / "t.json", "{}")
        write_text_atomic(out / "figures" / "a.png", "png")
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
        write_text_atomic(out / "cache" / "S0.features.h5", "h5")
    with run_ownership(out, "impute") as run:
        run.claim(["S1.h5ad"], caches=["cache/"])
    (out / "cache" / "mine.txt").write_text("the user's")
    with pytest.raises(StimputeError, match="cache/mine.txt, which no stimpute run wrote"):
        with run_ownership(out, "impute", force=True) as run:
            run.claim(["S1.h5ad"], caches=["cache/"])


# --- issue 30, part A: one guard for every written path, a manifest of files, an atomic lock


def _weights(tmp_path):
    """A real ResNet-18 weight file (random weights): commands check it before any work."""
    import torch

    from stimpute.features.resnet import resnet18
    from tests.test_features import random_state

    path = tmp_path / "w" / "w18.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state(resnet18(), seed=1), path)
    return path


def test_panel_out_never_replaces_an_input(tmp_path):
    """Case 1: `panel data/C3 --out data/C3/C3_selection.tsv` replaced the spot table."""
    folder = write_her2st_folder(tmp_path / "data" / "X1")
    genes = tmp_path / "genes.txt"
    genes.write_text("G0\nG1\nG2\n")
    before = _snapshot(tmp_path)
    for out in (folder / "X1_selection.tsv", folder, genes):
        _one_error_line(_run("panel", folder, "--n-top", "5", "--out", out, "--genes", genes), "results never go where inputs are")
    assert _snapshot(tmp_path) == before


def test_convert_to_moest_h5_never_replaces_its_weights(stack_dir, tmp_path):
    """Case 2: `convert to-moest-h5 ... --weights w/w18.pth --out w/w18.pth --force` left an HDF5 file there."""
    weights = _weights(tmp_path)
    before = weights.read_bytes()
    result = _run("convert", "to-moest-h5", stack_dir / "S0", stack_dir / "S1", "--encoder", "resnet18",
                  "--weights", weights, "--out", weights, "--force")
    _one_error_line(result, f"is the input {weights}")
    assert weights.read_bytes() == before


def test_every_command_refuses_to_write_where_it_reads(stack_dir, tmp_path):
    """The one guard: each command's written paths against each path it reads (sections,
    --genes, --weights, --model, --image), with and without --force."""
    weights = _weights(tmp_path)
    genes = tmp_path / "genes" / "panel.txt"
    genes.parent.mkdir()
    genes.write_text("G0\nG1\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").write_text("method: msagnet\n")
    image = next((stack_dir / "S1").glob("image.*"))
    s0, s1 = stack_dir / "S0", stack_dir / "S1"
    raw = write_her2st_folder(tmp_path / "raw" / "X1")
    result = tmp_path / "result"  # an impute's output, as far as `view` checks before reading it
    result.mkdir()
    (result / "block.h5ad").write_text("the block")
    outs = write_spaceranger_outs(tmp_path / "sr" / "A1", synthetic_stack(1, seed=2, n_genes=10, tissue_radius_um=200.0, image_size=300)[0])
    cases = [
        ["panel", s0, "--genes", genes, "--out", genes],
        ["convert", "her2st", raw.parent, raw / "out"],
        ["convert", "h5ad", s1 / "section.h5ad", s1, "--image", image],
        ["convert", "spaceranger", outs, outs / "spatial"],
        ["convert", "to-moest-h5", s0, s1, "--genes", genes, "--out", genes],
        ["features", s0, "--encoder", "resnet18", "--weights", weights, "--out", weights.parent],
        ["register", s0, s1, "--out", s1],
        ["train", s0, "--genes", genes, "--out", genes.parent],
        ["predict", s1, "--model", model, "--out", model / "pred"],
        ["impute", s0, s1, "--known", "S0", "--encoder", "resnet18", "--weights", weights, "--out", weights.parent],
        ["advise", s0, s1, "--budget", "1", "--out", s0],
        ["benchmark", s0, s1, "--encoder", "resnet18", "--weights", weights, "--out", weights.parent],
        ["view", result, "--html", result / "block.h5ad"],
    ]
    before = _snapshot(tmp_path), _snapshot(stack_dir)
    for args in cases:
        for force in ([], ["--force"]) if args[0] not in ("panel", "features", "view") else ([],):
            _one_error_line(_run(*args, *force), "results never go where inputs are")
    assert (_snapshot(tmp_path), _snapshot(stack_dir)) == before


def test_an_input_reached_through_a_symlink_inside_out_is_refused(stack_dir, tmp_path):
    """Case 17a: `out/link -> S1`, then `register S0 out/link --out out`."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(stack_dir / "S1")
    _one_error_line(_run("register", stack_dir / "S0", out / "link", "--out", out), "holds the input")
    with run_ownership(tmp_path / "o2", "convert", [stack_dir / "S1"]) as run:  # a claimed name that links to an input
        (tmp_path / "o2" / "S1").symlink_to(stack_dir / "S1")
        with pytest.raises(StimputeError, match="is the input"):
            run.claim(["S1/"])


def _h5ad_named(stack_dir, tmp_path, name):
    """S1's section.h5ad with `uns["stimpute"]["section"] = name`, as a file beside a copy of its image."""
    import anndata as ad

    from stimpute.io.anndata_io import write_h5ad_atomic

    adata = ad.read_h5ad(stack_dir / "S1" / "section.h5ad")
    adata.uns["stimpute"]["section"] = name
    adata.uns["stimpute"].pop("report", None)  # read back as arrays, which convert cannot store yet
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    image = next((stack_dir / "S1").glob("image.*"))
    (folder / f"x{image.suffix}").write_bytes(image.read_bytes())
    return write_h5ad_atomic(adata, folder / "x.h5ad", force=True), folder / f"x{image.suffix}"


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE", "a/../../b", "..", ""])
def test_section_names_never_lead_outside_out(stack_dir, tmp_path, name):
    """Case 3: a section named `../escaped` wrote outside --out; an absolute name into another input's folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    name = str(victim / "C2") if name == "ABSOLUTE" else name
    h5ad, image = _h5ad_named(stack_dir, tmp_path, name)
    out = tmp_path / "o" / "out"
    result = _run("convert", "h5ad", h5ad, out, "--image", image)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o", "victim"] and not list(victim.iterdir())
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["out"]
    written = [p for p in out.iterdir() if p.is_dir()]
    assert len(written) == 1 and (written[0] / "section.h5ad").is_file() and not written[0].name.startswith(".")


def test_names_are_unique_within_a_run(tmp_path):
    from stimpute.data import Stack
    from stimpute.datasets import synthetic_stack

    a, b = synthetic_stack(2, seed=1, n_genes=5, tissue_radius_um=200.0, image_size=200)
    with pytest.warns(Warning, match="no safe file name"):
        a.name, b.name = "x/y", "x_y"
        from stimpute.data import Section
        a, b = (Section(s.name, s.adata, s.image, s.um_per_px) for s in (a, b))
    with pytest.raises(StimputeError, match="unique"):
        Stack([a, b])
    with run_ownership(tmp_path / "out", "convert") as run:
        run.claim(["x_y/"])
        with pytest.raises(StimputeError, match="written twice"):
            run.claim(["x_y/"])


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from stimpute.files import atomic_write
from stimpute.files import run_ownership
out = Path(sys.argv[1])
with run_ownership(out, "train") as run:
    run.claim(["checkpoints/", "config.yaml"], caches=["cache/"])
    atomic_write(out / "checkpoints" / "fold0.txt", lambda tmp: Path(tmp).write_text("a checkpoint"))
    atomic_write(out / "config.yaml", lambda tmp: (Path(tmp).write_text("half"), os.kill(os.getpid(), signal.SIGKILL)))
"""


def test_a_rerun_after_a_kill_leaves_the_users_files(stack_dir, tmp_path):
    """Case 4: a killed run's manifest listed whole folders, so a rerun took the user's files in
    OUT/checkpoints/ for its own; user `*.part` files were deleted by pattern."""
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -9
    manifest = read_manifest(out)
    assert manifest["status"] == "running" and manifest["files"] == ["checkpoints/fold0.txt"]  # files, not folders
    killed_temp = [p.name for p in out.glob(".config.yaml.*.part")]
    assert len(killed_temp) == 1
    (out / "checkpoints" / "mine.ckpt").write_text("the user's")
    (out / "checkpoints" / ".notes.part").write_text("the user's")
    (out / ".config.yaml.mine.part").write_text("the user's")
    user = {p: p.read_bytes() for p in [out / "checkpoints" / "mine.ckpt", out / "checkpoints" / ".notes.part", out / ".config.yaml.mine.part"]}
    for force in ([], ["--force"]):
        result = _run("train", stack_dir / "S0", "--out", out, "--epochs", "2", *force)
        _one_error_line(result, "checkpoints/mine.ckpt, which no stimpute run wrote")
    assert {p: p.read_bytes() for p in user} == user
    (out / "checkpoints" / "mine.ckpt").unlink()  # moved away: the killed run is resumed
    del user[out / "checkpoints" / "mine.ckpt"]
    result = _run("train", stack_dir / "S0", "--out", out, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in user} == user  # the user's *.part files stay
    assert not (out / killed_temp[0]).exists()  # the killed run's own temporary file went
    manifest = read_manifest(out)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and not p.name.endswith(".part") and p.name != MANIFEST_FILE)
    assert manifest["status"] == "finished" and manifest["files"] == on_disk
    assert "checkpoints/best.ckpt" in on_disk


def test_force_removes_the_earlier_outputs_it_does_not_write_again(tmp_path):
    """Case 5 (the run layer): a --force rerun keeps caches, removes the earlier run's other
    outputs it does not write again, says so in one warning, and lists only what is there."""
    from stimpute.errors import StimputeWarning

    out = tmp_path / "out"
    with run_ownership(out, "impute") as run:
        run.claim(["C2.h5ad", "C4.h5ad", "figures/", "metrics.csv"], caches=["cache/"])
        for name in ("C2.h5ad", "C4.h5ad", "figures/C2.png", "figures/C4.png", "metrics.csv", "cache/C3.features.h5"):
            write_text_atomic(out / name, "first")
    with pytest.warns(StimputeWarning, match=r"--force removed 3 earlier output\(s\).*C2.h5ad, figures/C2.png, metrics.csv"):
        with run_ownership(out, "impute", force=True) as run:
            run.claim(["C4.h5ad", "figures/"], caches=["cache/"])
            for name in ("C4.h5ad", "figures/C4.png", "cache/C3.features.h5"):
                write_text_atomic(out / name, "second")
    assert read_manifest(out)["files"] == ["C4.h5ad", "cache/C3.features.h5", "figures/C4.png"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "C4.h5ad", "cache/C3.features.h5", "figures/C4.png", MANIFEST_FILE]


def test_convert_force_removes_the_section_folders_it_no_longer_writes(tmp_path):
    src = tmp_path / "raw"
    write_her2st_folder(src / "X1")
    write_her2st_folder(src / "X2", name="X2", seed=1)
    out = tmp_path / "out"
    assert _run("convert", "her2st", src, out).exit_code == 0
    result = _run("convert", "her2st", src / "X1", out, "--force")
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "--force removed 2 earlier output(s)" in warned[0] and "X2/section.h5ad" in warned[0]
    assert sorted(p.name for p in out.iterdir()) == ["X1", MANIFEST_FILE]


def _race(out, rounds, start, done, released, wins):
    for r in range(rounds):
        start.wait()
        try:
            with run_ownership(out, "impute"):
                with wins.get_lock():
                    wins[r] += 1
                done.wait()
        except StimputeError:
            done.wait()
        released.wait()


def test_a_stale_lock_is_taken_over_by_exactly_one_of_two_racing_runs(tmp_path):
    """Case 9: 200 takeovers of a stale lock by two processes at once: one gets it each time."""
    import multiprocessing

    rounds, ctx = 200, multiprocessing.get_context("fork")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": 1, "command": "impute"})
    start, done, released = (ctx.Barrier(3, timeout=30) for _ in range(3))
    wins = ctx.Array("i", rounds)
    workers = [ctx.Process(target=_race, args=(out, rounds, start, done, released, wins)) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for _ in range(rounds):
            (out / LOCK_FILE).write_text(stale)
            start.wait()
            done.wait()
            released.wait()
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert all(w.exitcode == 0 for w in workers)
    assert list(wins) == [1] * rounds, f"{sum(n > 1 for n in wins)} of {rounds} takeovers went to both runs"


def test_a_lock_path_that_is_a_folder_is_one_line(stack_dir, tmp_path):
    """Case 15: `OUT/stimpute.lock` a folder gave IsADirectoryError."""
    out = tmp_path / "out"
    (out / LOCK_FILE).mkdir(parents=True)
    _one_error_line(_run("register", stack_dir / "S0", stack_dir / "S1", "--out", out), "stimpute.lock: is a folder")


def test_a_run_holding_a_folder_owns_the_folders_inside_it(stack_dir, tmp_path):
    """Case 17b: `features --out X/cache` ran while `impute --out X` held X (and the reverse)."""
    out = tmp_path / "X"
    with run_ownership(out, "impute"):
        _one_error_line(_run("features", stack_dir / "S0", "--out", out / "cache"), f"lies inside {out}", "stimpute impute")
    assert not (out / "cache").exists()
    with run_ownership(out / "cache", "features"):
        with run_ownership(out, "impute") as run:
            with pytest.raises(StimputeError, match="cache: is in use by stimpute features"):
                run.claim(["S1.h5ad"], caches=["cache/"])


def test_an_old_manifest_still_reads(tmp_path):
    """A manifest of the format 9be9671 wrote (no run id, no caches): its files stay owned;
    a killed run's folder entries own their files (reused), and a finished run lists files."""
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "S0.features.h5").write_text("h5")
    (out / "S1.h5ad").write_text("h5ad")
    (out / MANIFEST_FILE).write_text(json.dumps({"format": 1, "command": "impute", "status": "running",
                                                 "files": ["S1.h5ad", "cache/", "config.yaml"]}))
    with run_ownership(out, "impute") as run:  # the killed run resumed, no --force
        run.claim(["S1.h5ad", "config.yaml"], caches=["cache/"])
        write_text_atomic(out / "config.yaml", "done")
    assert read_manifest(out)["files"] == ["S1.h5ad", "cache/S0.features.h5", "config.yaml"]


def test_safe_names_fuzz(tmp_path):
    """Any section name (separators, dots, control characters, undecodable bytes, any length)
    gives a file name that stays inside the folder, is not hidden, and is stable."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from stimpute.data import MAX_NAME_BYTES, safe_name

    parts = st.sampled_from(["/", "\\", "..", ".", "\x00", "\n", "\udcff", "~", "C2", " ", "é", "\u202e"])
    names = st.one_of(st.text(max_size=300), st.lists(st.one_of(parts, st.text(max_size=5)), max_size=40).map("".join))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(names)
    def check(name):
        safe = safe_name(name)
        assert safe and "/" not in safe and "\\" not in safe and "\x00" not in safe and not safe.startswith(".")
        assert len(safe.encode()) <= MAX_NAME_BYTES and safe_name(safe) == safe
        path = tmp_path / f"{safe}.h5ad"
        assert path.resolve().parent == tmp_path.resolve()
        write_text_atomic(path, "x")
        assert path.read_text() == "x"
        path.unlink()

    check()
    assert safe_name("C2") == "C2" and safe_name("TENX95 left_1-a") == "TENX95 left_1-a"


def test_a_run_that_only_reads_its_caches_finishes(tmp_path):
    out = tmp_path / "cache"
    with run_ownership(out, "features") as run:
        run.claim(caches=["S0.features.h5"])
        write_text_atomic(out / "S0.features.h5", "h5")
    with run_ownership(out, "features") as run:
        run.claim(caches=["S0.features.h5"])
        run.claim(caches=["S0.features.h5"])  # the same section given twice reads one cache
    assert read_manifest(out)["status"] == "finished" and read_manifest(out)["caches"] == ["S0.features.h5"]


FORKS_THEN_DIES = """
import os, signal, sys, time
from stimpute.files import run_ownership
with run_ownership(sys.argv[1], "impute"):
    child = os.fork()
    if child == 0:  # a feature worker, forked while the run holds its lock
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)  # the test reads the parent's output to its end
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_ends_with_the_runs_process_not_with_its_forked_workers(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", FORKS_THEN_DIES, str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    child = int(proc.stdout.split()[0])
    try:
        assert proc.returncode == -9 and os.path.exists(f"/proc/{child}")
        with run_ownership(out, "impute") as run:  # taken over at once, the worker still alive
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid() and run.previous == {}
    finally:
        os.kill(child, 9)


def test_a_derived_file_is_redrawn_without_force_and_keeps_the_runs_outputs(tmp_path):
    """`stimpute view OUT` redraws view.html into a finished run's folder: no --force needed,
    the run's outputs stay; a later --force run that does not draw it again removes it."""
    out = tmp_path / "out"
    with run_ownership(out, "impute") as run:
        run.claim(["block.h5ad", "view.html"])
        write_text_atomic(out / "block.h5ad", "block")
        write_text_atomic(out / "view.html", "first")
    for _ in range(2):
        with run_ownership(out, "impute") as run:
            run.claim(derived=["view.html"])
            write_text_atomic(out / "view.html", "redrawn")
    assert read_manifest(out)["files"] == ["block.h5ad", "view.html"] and read_manifest(out)["command"] == "impute"
    with pytest.warns(Warning, match="removed 1 earlier output.*view.html"):
        with run_ownership(out, "impute", force=True) as run:
            run.claim(["block.h5ad"])
            write_text_atomic(out / "block.h5ad", "block 2")
    assert read_manifest(out)["files"] == ["block.h5ad"] and not (out / "view.html").exists()
