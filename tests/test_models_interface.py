"""One model interface: a model defined in one place and registered is trained, cross-validated
and used by `stimpute train` / `stimpute predict` (run in-process) with no other edit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from stimpute.datasets import synthetic_stack
from stimpute.expression import panel_expression
from stimpute.io import write_section
from stimpute.models import METHODS, MODELS, Model, get_model, register_method
from tests.helpers import one_error_line, run_cli


@dataclass
class ShrunkMeanConfig:
    shrink: float = 1.0


class ShrunkMean(Model):
    """Every spot gets the training spots' mean expression of each gene, times `shrink`."""

    name = "shrunk_mean"
    config_class = ShrunkMeanConfig
    saved = "shrunk_mean.npz"

    def fit(self, prepared, train, seed=0, checkpoints=None, progress=False):
        self.mean_ = np.concatenate([prepared.known_expression(i) for i in train]).mean(axis=0) * self.config.shrink
        return self

    def predict(self, prepared, targets):
        return {i: np.tile(self.mean_, (prepared.stack[i].n_spots, 1)).astype(np.float32) for i in targets}

    def save(self, folder):
        path = Path(folder) / self.saved
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mean=self.mean_, **asdict(self.config))
        return path

    @classmethod
    def load(cls, folder):
        saved = np.load(Path(folder) / cls.saved)
        model = cls(shrink=float(saved["shrink"]))
        model.mean_ = saved["mean"]
        return model


@pytest.fixture
def registered():
    """The one line a new model's file adds (`@register_method`), undone after the test."""
    register_method(ShrunkMean)
    yield ShrunkMean
    METHODS.pop(ShrunkMean.name)
    MODELS.pop(ShrunkMean.model_name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    stack = synthetic_stack(3, seed=0, n_genes=30, tissue_radius_um=350.0, image_size=800)
    return [write_section(s, root) for s in stack], stack


def test_a_registered_model_trains_and_predicts_through_the_cli(registered, folders, tmp_path):
    paths, stack = folders
    assert get_model("shrunk_mean") is ShrunkMean and METHODS["shrunk_mean"] is ShrunkMean
    result = run_cli("train", *paths[:2], "--out", tmp_path / "model", "--method", "shrunk_mean")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "shrunk_mean.npz").is_file()
    config = yaml.safe_load((tmp_path / "model" / "config.yaml").read_text())
    assert config["method"] == "shrunk_mean" and config["train"] == {"mode": "train", "folds": None, "shrink": 1.0}

    result = run_cli("predict", paths[2], "--model", tmp_path / "model", "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    predicted = ad.read_h5ad(tmp_path / "pred" / f"{stack[2].name}.h5ad")
    genes = list(predicted.var_names)
    expected = np.concatenate([panel_expression(s, genes) for s in stack[:2]]).mean(axis=0)
    np.testing.assert_allclose(np.asarray(predicted.X), np.tile(expected, (stack[2].n_spots, 1)), rtol=1e-5, atol=1e-5)
    # an image-only model writes the prediction alone (README Outputs): no parts, no reach, confidence undefined
    assert set(predicted.layers) == {"stimpute"} and "stimpute_reach" not in predicted.obs
    assert (predicted.obs["stimpute_confidence"] == 0).all() and "obs['stimpute_confidence'] is 0" in predicted.uns["stimpute"]["confidence"]
    assert list(predicted.uns["stimpute"]["targets"]) == [stack[2].name] and predicted.uns["stimpute"]["settings"]["method"] == "shrunk_mean"
    assert yaml.safe_load((tmp_path / "pred" / "config.yaml").read_text())["method"] == "shrunk_mean"

    result = run_cli("predict", paths[2], "--model", tmp_path / "model", "--out", tmp_path / "other", "--method", "nh2st")
    one_error_line(result, "trained with --method shrunk_mean, not nh2st")


def test_a_registered_model_is_cross_validated_by_section(registered, folders, tmp_path):
    paths, stack = folders
    result = run_cli("train", *paths, "--out", tmp_path / "cv", "--method", "shrunk_mean", "--mode", "cv", "--folds", "3")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "cv" / "cv_metrics.csv")
    assert list(rows.columns) == ["fold", "section", "gene", "pcc", "mse", "mae"]
    assert sorted(rows.section.unique()) == sorted(s.name for s in stack) and sorted(rows.fold.unique()) == [0, 1, 2]
    for k in range(3):  # each fold's model, saved by the model itself
        assert ShrunkMean.load(tmp_path / "cv" / "checkpoints" / f"fold{k}").mean_.shape == (len(rows.gene.unique()),)


def test_unknown_model_names_the_registered_ones(folders, tmp_path):
    result = run_cli("train", *folders[0][:1], "--out", tmp_path / "m", "--method", "no_such_model")
    one_error_line(result, "--method", "no_such_model", "asign", "moe3d", "msagnet_2d", "nh2st")


def test_builtin_models_share_the_interface():
    """Each built-in model: a config dataclass, the file `save` writes, and what `train` calls it."""
    get_model("msagnet_2d")
    assert {name: cls.saved for name, cls in MODELS.items() if name != "shrunk_mean"} == {
        "msagnet_2d": "checkpoints/best.ckpt", "msagnet_3d": "checkpoints/best.ckpt", "nh2st": "checkpoints/nh2st.ckpt",
        "moe3d": "moe3d.pt", "asign": "asign/", "asign_model": "asign/"}
    assert get_model("msagnet_2d").train_config(epochs=7).max_epochs == 7
    assert get_model("msagnet_2d").train_config().model.variant == "2d"
    assert get_model("msagnet_3d").train_config().model.variant == "3d"
    assert get_model("asign").train_config(epochs=7).train.max_epochs == 7
    assert get_model("nh2st").train_config(epochs=7).max_epochs == 7
    assert get_model("moe3d").train_config(epochs=7).use_coords is False
