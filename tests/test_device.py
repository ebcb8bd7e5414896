"""The device policy (`--device auto|cpu|cuda`) and Lightning's own callbacks and datamodules in training."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from stimpute.device import resolve_device
from stimpute.errors import StimputeError
from stimpute.expression import panel_expression
from stimpute.prepare import PreparedStack
from stimpute.models import get_method, load_methods
from stimpute.models import nh2st
from stimpute.models.nh2st import NH2STConfig, NH2STData, train_nh2st
from stimpute.models.msagnet_training import GraphData

from .helpers import one_error_line, run_cli
from .test_impute import _tiny_batch
from .test_nh2st import colour_features

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


@no_gpu
def test_auto_and_cpu_resolve_to_the_cpu_without_a_gpu():
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_auto_and_cuda_pick_the_gpu_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


@no_gpu
def test_cuda_without_a_gpu_and_unknown_devices_are_refused():
    with pytest.raises(StimputeError, match="--device: cuda was asked for but no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(StimputeError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@no_gpu
@pytest.mark.parametrize("command", [["train", "--out"], ["impute", "--known", "S0", "--out"], ["benchmark", "--out"]])
def test_every_training_command_refuses_cuda_without_a_gpu_in_one_line(command, tmp_path):
    out = tmp_path / "out"
    result = run_cli(command[0], tmp_path / "S0", tmp_path / "S1", *command[1:], out, "--device", "cuda")
    one_error_line(result, "--device", "cuda")
    assert not out.exists()  # refused before anything is written


def test_on_device_sets_the_accelerator_of_every_lightning_model():
    load_methods()
    for name in ("msagnet_2d", "msagnet_3d", "nh2st", "moe3d"):
        method = get_method(name)
        assert method.config.accelerator == "cpu"
        assert method.on_device("cuda").config.accelerator == "cuda", name
    assert not hasattr(get_method("mean").on_device("cuda"), "config")  # CPU-only methods are unchanged


@pytest.fixture(scope="module")
def prepared(synthetic):
    panel = synthetic[0].genes[:20]
    return PreparedStack(stack=synthetic, panel=panel, expression=[panel_expression(s, panel) for s in synthetic],
                         features=[colour_features(s) for s in synthetic])


def test_nh2st_keeps_its_best_epoch_with_lightning_callbacks(prepared, tmp_path, monkeypatch):
    made = []

    class Recorded(ModelCheckpoint):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(nh2st, "ModelCheckpoint", Recorded)
    cfg = NH2STConfig(emb_dim=32, num_heads=4, max_epochs=12, patience=2)
    module = train_nh2st(prepared, [0, 1], seed=0, cfg=cfg, checkpoint=tmp_path / "m.ckpt")
    (best,) = made
    trainer = module.trainer
    assert trainer.checkpoint_callback is best and isinstance(trainer.early_stopping_callback, EarlyStopping)
    assert isinstance(trainer.datamodule, NH2STData)
    # the written checkpoint is ModelCheckpoint's best epoch, and its weights are the ones returned
    saved = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] <= trainer.current_epoch and best.best_model_score is not None
    state = module.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    assert all(torch.equal(state[k], saved["state_dict"][k]) for k in state)
    assert not hasattr(module, "table")  # the data live in the datamodule, not on the module


def test_msagnet_best_checkpoint_is_written_by_model_checkpoint_and_restored(tmp_path):
    from stimpute.models.msagnet import MSAGNetConfig
    from stimpute.models.msagnet_training import TrainConfig, fit

    batch = _tiny_batch()
    config = TrainConfig(max_epochs=8, patience=2, model=MSAGNetConfig(width=16, heads=2, transformer_layers=1))
    module = fit(batch, config, ckpt_dir=tmp_path)
    trainer = module.trainer
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint) and isinstance(trainer.datamodule, GraphData)
    assert isinstance(trainer.early_stopping_callback, EarlyStopping)
    assert trainer.checkpoint_callback.best_model_path == str(tmp_path / "best.ckpt")
    saved = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
