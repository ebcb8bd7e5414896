"""ASIGN as a saveable `Model`: fit on known sections, save, load, impute sections scanned later."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from stimpute import Stack
from stimpute.datasets import synthetic_stack
from stimpute.expression import panel_expression
from stimpute.io import read_section, write_section
from stimpute.metrics import pearson_columns
from stimpute.models.asign import Asign, AsignConfig
from stimpute.models.msagnet import MSAGNetConfig
from stimpute.prepare import prepare_stack
from stimpute.models.msagnet_training import TrainConfig
from tests.helpers import run_cli

SMALL = {"n_genes": 30, "tissue_radius_um": 350.0, "image_size": 800}


@pytest.fixture(scope="module")
def fitted():
    """A synthetic 3-section stack and an ASIGN model fitted on its first two sections alone."""
    stack = synthetic_stack(3, seed=0, **SMALL)
    prepared = prepare_stack(Stack(stack.sections[:2]))
    config = AsignConfig(TrainConfig(max_epochs=5, model=MSAGNetConfig(width=32)))
    return stack, Asign(config).fit(prepared, [0, 1], seed=0)


def _predict(model, sections, order=None) -> dict:
    def prepare(new):
        return prepare_stack(new, known=[], panel=model.panel_, register=False)

    return {s.name: (s, pred) for s, _, pred in model.predict_sections(Stack(sections), prepare, order=order)}


def _image_only(section, folder):
    path = folder / "he_2.png"
    Image.fromarray(section.image.read_region(0, 0, *section.image.size)).save(path)
    return read_section(path, um_per_px=section.um_per_px)


def test_a_saved_and_loaded_asign_predicts_a_new_section_bit_identically(fitted, tmp_path):
    stack, model = fitted
    before = _predict(model, [stack[2]])["S2"][1]
    model.save(tmp_path / "model")
    loaded = Asign.load(tmp_path / "model")
    assert loaded.known_.names == ["S0", "S1"] and loaded.panel_ == model.panel_
    after = _predict(loaded, [stack[2]])["S2"][1]
    assert before.shape == (stack[2].n_spots, 30) and np.array_equal(before, after)
    truth = panel_expression(stack[2], model.panel_)
    assert np.nanmean(pearson_columns(after, truth)) > 0.3  # a section never seen at fit time, imputed


def test_an_he_image_alone_is_registered_onto_the_known_sections_and_imputed(fitted, tmp_path):
    """The virtual spots of S2's image alone get what S2's own spots get at the same place:
    registration onto S1 worked and the known spots were transferred there."""
    stack, model = fitted
    measured = _predict(model, [stack[2]])["S2"][1]
    he, pred = _predict(model, [_image_only(stack[2], tmp_path)])["he_2"]
    assert he.n_spots >= 10 and pred.shape == (he.n_spots, 30) and np.isfinite(pred).all()
    near = cKDTree(stack[2].xy).query(he.xy)[1]  # same image, same pixels
    assert np.nanmean(pearson_columns(pred, measured[near])) > 0.7


def test_order_places_new_sections_among_the_known_ones(fitted):
    stack, model = fitted
    with pytest.raises(Exception, match="name every section once"):
        _predict(model, [stack[2]], order=["S0", "S2"])


def test_train_asign_then_predict_a_section_through_the_cli(tmp_path):
    stack = synthetic_stack(3, seed=0, **SMALL)
    folders = [write_section(s, tmp_path / "in") for s in stack]
    trained = run_cli("train", *folders[:2], "--method", "asign", "--out", tmp_path / "model", "--epochs", "5")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "model" / "asign" / "state.npz").is_file() and (tmp_path / "model" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "model" / "asign" / "sections").iterdir()) == ["S0", "S1"]
    predicted = run_cli("predict", folders[2], "--model", tmp_path / "model", "--out", tmp_path / "pred")
    assert predicted.exit_code == 0, predicted.output
    adata = ad.read_h5ad(tmp_path / "pred" / "S2.h5ad")
    assert list(adata.obs_names) == list(stack[2].adata.obs_names) and adata.n_vars == 30
    assert pd.read_csv(tmp_path / "pred" / "metrics.csv").pcc.mean() > 0.3
    # the layout `stimpute impute` writes (`io.results.asign_results`), not X alone
    assert {"stimpute", "stimpute_model", "stimpute_propagated", "stimpute_weight", "measured"} <= set(adata.layers)
    assert np.array_equal(adata.X, adata.layers["stimpute"]) and not adata.obs["measured"].any()
    assert 0 < adata.obs["stimpute_reach"].min() <= adata.obs["stimpute_reach"].max() < 1
    assert adata.obs["stimpute_confidence"].between(-1, 1).all() and adata.obs["stimpute_confidence"].std() > 0
    assert adata.var["stimpute_confidence"].shape == (30,) and "confidence" not in adata.uns["stimpute"]
    assert set(adata.uns["spatial"]["S2"]["images"]) == {"hires", "lowres"}
    assert list(adata.uns["stimpute"]["known"]) == ["S0", "S1"] and list(adata.uns["stimpute"]["targets"]) == ["S2"]
    assert adata.uns["stimpute"]["registration"]["reference"] == "S0"
    np.testing.assert_allclose(adata.obsm["spatial_3d"][:, 2], 2 * 10.0)  # third in cutting order
    import stimpute

    assert stimpute.pl.imputed(adata, ["GENE000"], layer="stimpute_propagated") is not None
    assert len(stimpute.pl.block_3d(adata).axes[0].collections) == 1
    # S2's image alone, whose file says no scale: it takes the model's sections' scale, said in one line
    png = tmp_path / "bare" / "he_2.png"
    png.parent.mkdir()
    Image.fromarray(stack[2].image.read_region(0, 0, *stack[2].image.size)).save(png)
    bare = run_cli("predict", png, "--model", tmp_path / "model", "--out", tmp_path / "pred_bare")
    assert bare.exit_code == 0, bare.output
    assert "as the model's sections" in bare.output
    he = ad.read_h5ad(tmp_path / "pred_bare" / "he_2.h5ad")
    assert he.n_obs >= 10 and he.uns["stimpute"]["registration"]["reference"] == "S0"


def test_old_msagnet_names_still_work_with_one_deprecation_line(recwarn):
    from stimpute.models import get_method, get_model
    from stimpute.models.msagnet_model import MSAGNet2D, MSAGNet3D

    assert isinstance(get_method("msagnet"), MSAGNet3D)  # the benchmark's name: the 3D net
    assert get_model("msagnet") is MSAGNet2D  # `stimpute train --method msagnet`, old model folders
    assert isinstance(get_method("msagnet2d"), MSAGNet2D)
    lines = [str(w.message) for w in recwarn if "deprecated" in str(w.message)]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert isinstance(get_method("asign"), Asign) and isinstance(get_method("asign_model"), Asign)
