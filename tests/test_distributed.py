"""Several training processes through Lightning's `--devices/--num-nodes/--strategy`: a
real two-process DDP run on the CPU (gloo), checked flags, and rank 0 alone writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import yaml

import stimpute
from stimpute.device import parallel_options
from stimpute.distributed import RANK_VARIABLES, global_rank, launch, rank_output
from stimpute.errors import StimputeError
from stimpute.features import spot_features
from stimpute.io import read_section
from stimpute.patches import SCALE_NAMES

from .helpers import one_error_line, run_cli, write_her2st_folder


@pytest.fixture
def no_rank(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_global_rank_is_zero_only_where_every_launcher_variable_is(no_rank):
    assert global_rank() == 0
    no_rank.setenv("LOCAL_RANK", "0")
    no_rank.setenv("NODE_RANK", "1")  # local rank 0 of the second machine
    with launch(devices=1, num_nodes=2):
        assert global_rank() > 0
    no_rank.setenv("NODE_RANK", "0")
    assert global_rank() == 0


def test_other_ranks_read_the_caches_and_checkpoints_of_out_and_write_elsewhere(no_rank, tmp_path):
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "S0.features.h5").write_text("features")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_text("weights")
    with rank_output(out) as folder:
        assert folder == out
    no_rank.setenv("LOCAL_RANK", "1")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with launch(devices=2), rank_output(out) as scratch:
        assert scratch != out and (scratch / "cache" / "S0.features.h5").read_text() == "features"
        (scratch / "result.h5ad").write_text("x")
        tmp = scratch / "checkpoints" / "last.ckpt.part"
        tmp.write_text("new")
        os.replace(tmp, scratch / "checkpoints" / "last.ckpt")  # an atomic write replaces the link only
    assert not scratch.exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "checkpoints" / "last.ckpt").read_text() == "weights"


FLAGS = [(["--devices", "0"], "--devices"), (["--devices", "two"], "--devices"), (["--num-nodes", "0"], "--num-nodes"),
         (["--strategy", "ring"], "--strategy: unknown strategy 'ring'")]
COMMANDS = [["train", "--out"], ["impute", "--known", "S0", "--out"], ["benchmark", "--out"], ["features", "--out"]]
CASES = [(c, *f) for c in COMMANDS for f in FLAGS] + [(c, ["--batch-nodes", "0"], "--batch-nodes") for c in COMMANDS[:2]]


@pytest.mark.parametrize("command, args, needle", CASES)
def test_bad_parallel_flags_are_one_line_before_anything_is_written(command, args, needle, tmp_path):
    out = tmp_path / "out"
    result = run_cli(command[0], tmp_path / "S0", tmp_path / "S1", *command[1:], out, "--device", "cpu", *args)
    one_error_line(result, needle)
    assert not out.exists()


def test_lightning_refusals_of_a_combination_are_one_line():
    with pytest.raises(StimputeError, match="--devices/--num-nodes/--strategy: Lightning refuses"):
        parallel_options("cpu", "0,1", 1, "ddp")  # GPU ids on the CPU
    assert parallel_options("cpu", "2", 1, "ddp") == {"devices": 2, "num_nodes": 1, "strategy": "ddp"}


def test_a_real_two_process_ddp_training_writes_one_model_that_predicts(no_rank, tmp_path):
    """`stimpute train --devices 2 --strategy ddp` on the CPU: Lightning starts the command
    again as rank 1 at the first Lightning run (the handcrafted features take one pass over
    each image in rank 0, `stimpute.features.dense`), the two processes train (gloo), rank
    0 alone writes the model folder and its feature caches."""
    for i in range(2):
        write_her2st_folder(tmp_path / f"S{i}", name=f"S{i}", n_side=8, seed=i)
    model = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(stimpute.__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "stimpute", "train", str(tmp_path / "S0"), str(tmp_path / "S1"), "--out", str(model),
           "--device", "cpu", "--devices", "2", "--strategy", "ddp", "--epochs", "2", "--seed", "1"]
    # its own process group: on a timeout, rank 0 and the rank it started are stopped together
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"two-process training did not finish in 900 s:\n{proc.communicate()[0]}")
    assert proc.returncode == 0, log
    assert "MEMBER: 2/2" in log  # the second process joined the process group
    assert log.count("model written to") == 1  # rank 1 reports nothing
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert files == ["cache/S0.features.h5", "cache/S1.features.h5", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                     "config.yaml", "stimpute-run.json"]
    for name in ("S0", "S1"):  # the handcrafted descriptors: one pass over the image, in one process
        with h5py.File(model / "cache" / f"{name}.features.h5") as f:
            assert list(f["handcrafted"].attrs["spots_per_process"]) == [63]
    with h5py.File(model / "cache" / "S0.features.h5") as f:  # gathered, they equal one process's features
        cached = np.stack([f["handcrafted"][scale][()] for scale in SCALE_NAMES], axis=1)
    np.testing.assert_allclose(cached, spot_features(read_section(tmp_path / "S0")), rtol=1e-5, atol=1e-6)
    train = yaml.safe_load((model / "config.yaml").read_text())["train"]
    assert (train["devices"], train["num_nodes"], train["strategy"], train["accelerator"]) == (2, 1, "ddp", "cpu")
    predicted = tmp_path / "predicted"
    result = run_cli("predict", tmp_path / "S1", "--model", model, "--out", predicted)
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(predicted / "S1.h5ad")
    assert adata.n_obs == 63 and np.isfinite(np.asarray(adata.X)).all() and np.asarray(adata.X).std(0).max() > 0


def test_every_lightning_model_records_the_parallel_flags():
    from stimpute.models import get_method, load_methods
    from stimpute.trainer import lightning_flags

    load_methods()
    flags = {"devices": 2, "num_nodes": 3, "strategy": "ddp"}
    for name in ("msagnet_2d", "msagnet_3d", "nh2st", "moe3d"):
        assert lightning_flags(get_method(name).on_device("cpu", **flags).config) == {"accelerator": "cpu", **flags}, name
    assert lightning_flags(get_method("asign").on_device("cpu", **flags).config.train) == {"accelerator": "cpu", **flags}
