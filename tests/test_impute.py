"""Cross-layer Imputation: propagation, the fusion weighting, resume, and `stimpute impute` end to end."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from typer.testing import CliRunner

from stimpute.cli import app
from stimpute.impute import FusionWeights, fit_fusion, propagate
from stimpute.io import write_section
from stimpute.models.msagnet import MSAGNetConfig
from stimpute.train import GraphBatch, TrainConfig, fit


def _chain(n):
    """Row-normalised adjacency of a path graph 0 - 1 - ... - n-1."""
    i = np.arange(n - 1)
    A = sparse.csr_matrix((np.ones(2 * (n - 1)), (np.r_[i, i + 1], np.r_[i + 1, i])), shape=(n, n))
    return sparse.diags(1 / np.asarray(A.sum(1)).ravel()) @ A


def test_propagation_resets_known_spots_and_keeps_the_measured_scale():
    values = np.array([[2.0, 5.0]])
    out, reach = propagate(_chain(4), np.array([0]), values, steps=20)
    assert np.allclose(out, values)  # one source: every reached spot gets its value, not a shrunk one
    assert reach[0] == 1.0 and 1.0 > reach[1] >= reach[2] >= reach[3] > 0.0  # farther = weaker tie


def test_propagation_averages_two_sources_and_leaves_unreached_spots_at_the_mean():
    A = sparse.block_diag([_chain(3), sparse.csr_matrix((1, 1))]).tocsr()  # node 3 isolated
    out, reach = propagate(A, np.array([0, 2]), np.array([[0.0], [4.0]]))
    assert out[1, 0] == pytest.approx(2.0)
    assert reach[3] == 0.0 and out[3, 0] == pytest.approx(2.0)


def test_fusion_weight_formula_on_hand_made_cases():
    w = FusionWeights(gene_logit=np.array([0.0, np.log(3.0)]), reach_slope=0.0).weights(np.array([0.2, 0.9]))
    assert np.allclose(w, [[0.5, 0.75], [0.5, 0.75]])  # σ(α): per gene, spot-blind
    w = FusionWeights(gene_logit=np.zeros(1), reach_slope=1.0).weights(np.array([0.5, 0.8]))
    assert np.allclose(w[:, 0], [0.5, 0.8])  # σ(logit r) = r: weight follows the reach
    fused = w * np.array([[4.0], [4.0]]) + (1 - w) * np.array([[0.0], [0.0]])
    assert np.allclose(fused[:, 0], [2.0, 3.2])


def test_fit_fusion_trusts_the_part_that_is_right():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(60, 2))
    noise = rng.normal(size=(60, 2))
    prop = np.column_stack([truth[:, 0], noise[:, 1]])  # gene 0: propagation right; gene 1: model right
    model = np.column_stack([noise[:, 0], truth[:, 1]])
    w = fit_fusion(prop, model, truth, np.full(60, 0.9), per_spot=False).weights(np.full(3, 0.9))
    assert w[0, 0] > 0.85 and w[0, 1] < 0.15


def test_fit_fusion_learns_a_per_spot_reach_term():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(200, 3))
    reach = rng.uniform(0.05, 0.95, 200)
    good = reach > 0.5  # propagation is right only where the spot is well tied to measured spots
    prop = np.where(good[:, None], truth, rng.normal(size=truth.shape))
    model = truth + rng.normal(scale=0.7, size=truth.shape)
    fitted = fit_fusion(prop, model, truth, reach)
    assert fitted.reach_slope > 0.5
    w = fitted.weights(np.array([0.1, 0.9]))
    assert (w[1] > w[0]).all()


def _tiny_batch():
    gen = torch.Generator().manual_seed(0)
    n = 40
    x = torch.randn(n, 3, 8, generator=gen)
    y = x[:, 0, :5] * 0.5 + 0.1 * torch.randn(n, 5, generator=gen)
    src = torch.arange(n)
    edge_index = torch.stack([torch.cat([src, (src + 1) % n]), torch.cat([(src + 1) % n, src])])
    val = torch.zeros(n, dtype=torch.bool)
    val[::4] = True
    return GraphBatch(x, edge_index, torch.zeros(2 * n, dtype=torch.long), torch.ones(2 * n), y, ~val, val)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    batch = _tiny_batch()
    cfg = dict(patience=100, seed=3, model=MSAGNetConfig(width=16, heads=2, transformer_layers=1))
    full = fit(batch, TrainConfig(max_epochs=8, **cfg), ckpt_dir=tmp_path / "full")
    fit(batch, TrainConfig(max_epochs=4, **cfg), ckpt_dir=tmp_path / "part")
    resumed = fit(batch, TrainConfig(max_epochs=8, **cfg), ckpt_dir=tmp_path / "part", resume=tmp_path / "part" / "last.ckpt")
    with torch.no_grad():
        assert torch.equal(full(batch), resumed(batch))
    assert TrainConfig.from_dict(TrainConfig(**cfg).to_dict()) == TrainConfig(**cfg)


def test_impute_command_end_to_end_on_a_synthetic_stack(tmp_path):
    from stimpute.datasets import synthetic_stack

    stack = synthetic_stack(3, seed=0, n_genes=30, tissue_radius_um=350.0, image_size=800)
    folders = [write_section(s, tmp_path / "in") for s in stack]
    runner = CliRunner()
    args = ["impute", *map(str, folders), "--known", "S1", "--out", str(tmp_path / "out"), "--seed", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("S0", "S2"):
        import anndata as ad

        adata = ad.read_h5ad(out / f"{name}.h5ad")
        assert list(adata.obs_names) == list(stack[name].adata.obs_names)
        assert set(adata.layers) >= {"model", "propagated"} and "spatial" in adata.obsm and "spatial" in adata.uns
        assert adata.n_vars == 30 and (out / "figures" / f"{name}.png").is_file()
    assert (out / "config.yaml").is_file() and not (out / "S1.h5ad").exists()
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["section", "gene", "pcc", "mse", "mae"]
    assert set(metrics.section) == {"S0", "S2"} and len(metrics) == 60
    assert metrics.pcc.mean() > 0.6, metrics.groupby("section").pcc.mean()
    assert "ASIGN paper's metric (PCC per spot across genes" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


def test_train_then_predict_from_images_alone(tmp_path):
    import anndata as ad

    from stimpute.datasets import synthetic_stack
    from stimpute.evaluate import gene_metrics
    from stimpute.expression import panel_expression
    from stimpute.pipeline import run_predict, run_train

    stack = synthetic_stack(3, seed=0, n_genes=30, tissue_radius_um=350.0, image_size=800)
    folders = [write_section(s, tmp_path / "in") for s in stack]
    config = TrainConfig(max_epochs=30, model=MSAGNetConfig(width=32, variant="2d"))
    run_train(folders[:2], tmp_path / "model", config=config)
    (h5ad, figure) = run_predict(folders[2:], tmp_path / "model", tmp_path / "pred")
    adata = ad.read_h5ad(h5ad)
    assert list(adata.obs_names) == list(stack[2].adata.obs_names) and figure.is_file()
    truth = panel_expression(stack[2], list(adata.var_names))
    assert np.nanmean(gene_metrics(adata.X, truth, adata.var_names).pcc) > 0.3
