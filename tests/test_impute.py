"""Cross-layer Imputation: propagation, the fusion weighting, resume, and `stimpute impute` end to end."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from stimpute.cli import app
from stimpute.combine import zmix
from stimpute.impute import FusionWeights, fit_fusion
from stimpute.prepare import standardise_section
from stimpute.io import write_section
from stimpute.models.msagnet import MSAGNetConfig
from stimpute.models.msagnet_training import GraphBatch, TrainConfig, fit
from tests.helpers import run_cli


def _grid(n_side, z, pitch=100.0, shift=0.0):
    g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * pitch + shift
    return g


class _Stub:
    """A prepared stack's surface as `stimpute.evidence` reads it: positions, z, features, expression."""

    def __init__(self, coords, z, features, expression):
        from types import SimpleNamespace

        self.coords_ref, self.features, self.expression = coords, features, expression
        self.stack = [SimpleNamespace(um_per_px=1.0, z_um=zz) for zz in z]

    def known_expression(self, i):
        return self.expression[i]


def test_kernel_links_weight_by_distance_in_pitches_and_drop_far_spots():
    from stimpute.register.matching import kernel_links, spot_pitch_um

    known = _grid(5, 0)
    assert spot_pitch_um(known) == pytest.approx(100.0)
    w = kernel_links(np.array([[0.0, 0.0], [50.0, 0.0], [2000.0, 0.0]]), known, 100.0, k=4).toarray()
    assert w[0].max() == pytest.approx(1.0) and w[0, 1] == pytest.approx(np.exp(-0.5))  # on a spot; one pitch away
    assert w[1, 0] == pytest.approx(w[1, 1]) == pytest.approx(np.exp(-0.125))  # halfway between two spots
    assert w[2].sum() == 0.0  # beyond the cutoff: no evidence


def test_morphology_term_prefers_known_spots_that_look_alike():
    from stimpute.register.matching import kernel_links

    rng = np.random.default_rng(0)
    known = np.array([[0.0, 0.0], [10.0, 0.0]])
    kf = np.array([[5.0, 0.0], [-5.0, 0.0]]) + rng.normal(scale=0.01, size=(2, 2))
    kf = np.vstack([kf, rng.normal(size=(8, 2))])  # more known spots so the feature space is defined
    known = np.vstack([known, rng.uniform(500, 900, size=(8, 2))])
    w = kernel_links(np.array([[5.0, 0.0]]), known, 100.0, k=2, query_features=np.array([[-5.0, 0.0]]),
                     known_features=kf).toarray()
    assert w[0, 1] > 5 * w[0, 0]  # equally near, but spot 1 looks like the query


def test_transfer_links_every_known_section_directly_and_reports_reach():
    from stimpute.evidence import transfer

    coords = [_grid(6, 0), _grid(6, 0, shift=20.0), _grid(6, 0, shift=3000.0)]  # section 2 lies off the tissue
    expr = [np.full((36, 2), 1.0), None, None]
    expr[0][:, 1] = np.arange(36)
    feats = [np.ones((36, 3, 4))] * 3
    prepared = _Stub(coords, [0.0, 10.0, 20.0], feats, expr)
    out, reach = transfer(prepared, [0], [1, 2], features=False)
    assert np.allclose(out[1][:, 0], 1.0) and np.corrcoef(out[1][:, 1], expr[0][:, 1])[0, 1] > 0.95
    assert reach[1].min() > 0.9 and np.all(reach[2] == 0.0)  # far spots: no reach, the known mean
    assert np.allclose(out[2], expr[0].mean(0))


def test_fusion_weight_is_the_gene_share_times_the_spot_reach():
    w = FusionWeights(gene_share=np.array([0.5, 0.75])).weights(np.array([0.2, 1.0]))
    assert np.allclose(w, [[0.1, 0.15], [0.5, 0.75]])


def test_zmix_mixes_patterns_not_levels():
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(50, 3))
    a, b = pattern + rng.normal(0, 0.5, (50, 3)), 100 + 10 * pattern  # b: the same pattern at another level and scale
    mixed = zmix(a, b, 0.5)
    raw = 0.5 * a + 0.5 * b
    assert np.allclose(mixed.mean(0), raw.mean(0), atol=1e-3) and np.allclose(mixed.std(0), raw.std(0), rtol=1e-3)
    r = lambda x: np.corrcoef(x[:, 0], pattern[:, 0])[0, 1]
    assert r(mixed) > r(a)  # b's scale does not drown a, and the clean pattern helps
    assert np.allclose(zmix(a, b, 0.0), a, atol=1e-4) and np.allclose(zmix(a, b, 1.0), b, atol=1e-3)
    w = np.r_[np.zeros(25), np.ones(25)][:, None] * np.ones(3)  # per-spot shares: a level gap makes no step
    stepped = zmix(np.zeros((50, 3)) + pattern, 100 + pattern, w)
    assert np.corrcoef(stepped[:, 0], pattern[:, 0])[0, 1] > 0.99


def test_features_are_standardised_per_section():
    rng = np.random.default_rng(1)
    f = rng.normal(3.0, 2.0, (40, 3, 5)).astype(np.float32)
    f[:, 0, 0] = 7.0  # a constant feature
    out = standardise_section(f)
    assert np.allclose(out.mean(0), 0, atol=1e-5) and np.allclose(out[:, 1:].std(0), 1, atol=1e-4)
    assert np.all(out[:, 0, 0] == 0)
    shifted = standardise_section(1.5 * f + 4.0)  # a section-wide stain or scanner change of the descriptors
    assert np.allclose(shifted, out, atol=1e-4)


def test_fit_fusion_trusts_the_part_that_is_right():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(60, 2))
    noise = rng.normal(size=(60, 2))
    prop = np.column_stack([truth[:, 0], noise[:, 1]])  # gene 0: propagation right; gene 1: model right
    model = np.column_stack([noise[:, 0], truth[:, 1]])
    w = fit_fusion(prop, model, truth, np.full(60, 1.0)).weights(np.full(3, 1.0))
    assert w[0, 0] > 0.85 and w[0, 1] < 0.15


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


@pytest.fixture(scope="module")
def stack_folders(tmp_path_factory):
    """A 3-section synthetic stack written as section folders once, and a feature cache of
    it filled once by `stimpute features` (a cache stimpute owns): the commands below start
    from a copy of it, so the features are computed once for the module."""
    from stimpute.datasets import synthetic_stack

    root = tmp_path_factory.mktemp("stack")
    stack = synthetic_stack(3, seed=0, n_genes=30, tissue_radius_um=350.0, image_size=800)
    folders = [write_section(s, root / "in") for s in stack]
    cache = root / "cache"
    filled = run_cli("features", *folders, "--out", cache)
    assert filled.exit_code == 0, filled.output
    return stack, folders, cache


def test_impute_command_end_to_end_on_a_synthetic_stack(stack_folders, tmp_path):
    stack, folders, cache = stack_folders
    shutil.copytree(cache, tmp_path / "out" / "cache")
    runner = CliRunner()
    args = ["impute", *map(str, folders), "--known", "S1", "--out", str(tmp_path / "out"), "--seed", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("S0", "S2"):
        import anndata as ad

        adata = ad.read_h5ad(out / f"{name}.h5ad")
        assert list(adata.obs_names) == list(stack[name].adata.obs_names)
        assert set(adata.layers) >= {"stimpute_model", "stimpute_propagated"} and "spatial" in adata.obsm and "spatial" in adata.uns
        assert adata.n_vars == 30 and (out / "figures" / f"{name}.png").is_file()
    assert (out / "config.yaml").is_file() and not (out / "S1.h5ad").exists()
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["section", "gene", "pcc", "mse", "mae"]
    assert set(metrics.section) == {"S0", "S2"} and len(metrics) == 60
    assert metrics.pcc.mean() > 0.6, metrics.groupby("section").pcc.mean()
    assert "ASIGN paper's metric (PCC per spot across genes" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


def test_train_then_predict_from_images_alone(stack_folders, tmp_path):
    import anndata as ad

    from stimpute.metrics import gene_metrics
    from stimpute.expression import panel_expression
    from stimpute.pipeline import run_predict, run_train

    stack, folders, cache = stack_folders
    for out in ("model", "pred"):
        shutil.copytree(cache, tmp_path / out / "cache")
    config = TrainConfig(max_epochs=30, patience=20, min_delta=0.0, model=MSAGNetConfig(width=32, variant="2d"))  # the 2D model's schedule
    run_train(folders[:2], tmp_path / "model", config=config)
    (h5ad, figure) = run_predict(folders[2:], tmp_path / "model", tmp_path / "pred")
    adata = ad.read_h5ad(h5ad)
    assert list(adata.obs_names) == list(stack[2].adata.obs_names) and figure.is_file()
    truth = panel_expression(stack[2], list(adata.var_names))
    assert np.nanmean(gene_metrics(adata.X, truth, adata.var_names).pcc) > 0.25  # learnt from images: 0.2999 with the dense descriptors (VERSION 3), 0.30+ before


@pytest.mark.her2st
def test_fused_beats_its_parts_and_the_transfer_rival_on_her2st(her2st_stack, her2st_features, tmp_path):
    """Guards the product: with C3 known, X beats the model part, the propagated part,
    register-then-copy and the ½ ridge + ½ copy composite on C2 and C4, paired over
    (target, gene) of the known section's panel."""
    from scipy.stats import wilcoxon

    from stimpute.metrics import pearson_columns
    from stimpute.impute import impute_stack
    from stimpute.io import read_stack
    from stimpute.models import get_method, load_methods
    from stimpute.prepare import prepare_stack

    load_methods()
    stack = read_stack(her2st_stack)
    cache = shutil.copytree(her2st_features, tmp_path / "cache")  # the session's features of these sections
    prepared = prepare_stack(stack, known="C3", cache_dir=cache)
    result = impute_stack(prepared, [1], seed=0)
    rival = get_method("transfer").fit_predict(prepared, [1], [0, 2])
    composite = get_method("composite").fit_predict(prepared, [1], [0, 2])

    def pcc(parts):
        return np.concatenate([np.nan_to_num(pearson_columns(parts[t], prepared.expression[t])) for t in (0, 2)])

    fused = pcc(result.fused)
    # the propagated part carries the kernel ridge prediction plus the transferred residuals,
    # so the fusion adds less to it than to the model part or to register-then-copy
    parts = {"model": (pcc(result.model), 0.01), "propagated": (pcc(result.propagated), 0.003),
             "transfer": (pcc(rival), 0.03), "composite": (pcc(composite), 0.0)}
    for name, (other, margin) in parts.items():
        assert fused.mean() > other.mean() + margin, name
        assert wilcoxon(fused, other, alternative="greater").pvalue < 1e-3, name


def test_known_takes_several_sections_joined_by_commas(synthetic):
    from stimpute.errors import StimputeError
    from stimpute.prepare import known_indices

    assert known_indices(synthetic, "S0, S2") == [0, 2] and known_indices(synthetic, "S1") == [1]
    with pytest.raises(StimputeError, match="S9"):
        known_indices(synthetic, "S0,S9")


def test_calibration_with_two_known_sections_propagates_from_the_other_one():
    """Leave-one-known-section-out: each known section's held-out spots get their
    propagated value from the other known section, never from their own neighbours."""
    from stimpute.models.asign import _calibration
    from stimpute.models.asign.programs import fit_programs

    coords = [_grid(5, 0), _grid(5, 0, shift=10.0)]
    expr = [np.zeros((25, 1)), np.ones((25, 1))]
    prepared = _Stub(coords, [0.0, 10.0], [np.ones((25, 3, 2))] * 2, expr)
    held = {0: np.arange(25) % 4 == 0, 1: np.arange(25) % 4 == 1}
    identity = fit_programs(np.concatenate(expr))  # all axes: no projection
    cal = _calibration(prepared, [0, 1], held, {"m": np.zeros((int(held[0].sum() + held[1].sum()), 1))}, morphology=False,
                       programs=identity, probe=None)
    n0 = int(held[0].sum())
    assert np.allclose(cal["propagated"][:n0], 1.0) and np.allclose(cal["propagated"][n0:], 0.0)
    assert np.allclose(cal["truth"][:n0], 0.0) and cal["reach"].min() > 0.9


def test_residuals_transferred_are_out_of_sample():
    """Regression kriging carries measured minus *out-of-sample* prediction: a spot's own
    value never explains itself (in-sample residuals of a flexible probe are ~0)."""
    from stimpute.models.asign.members import KernelRidgeMember
    from stimpute.models.baselines import KernelRidgeLOO

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(49, 3, 4)), rng.normal(size=(49, 3, 4))]
    expr = [np.c_[np.sin(feats[0][:, 0, 0]), feats[0][:, 1, 1]] + rng.normal(scale=0.3, size=(49, 2)), None]
    prepared = _Stub([_grid(7, 0), _grid(7, 0)], [0.0, 10.0], feats, expr)
    held = {0: np.arange(49) % 5 == 0}
    member = KernelRidgeMember().fit(prepared, [0], held, seed=0)
    out = {"residual": member.residual, "residual_honest": member.residual_honest, "held": member.held_,
           1: member.predict(prepared, [1])[1]}
    raw, train = feats[0].reshape(49, -1), ~held[0]
    x = (raw - raw.mean(0)) / raw.std(0)
    full = KernelRidgeLOO().fit(x, expr[0])
    assert np.allclose(out["residual"][0], expr[0] - full.loo_predictions_, atol=1e-5)
    assert np.abs(out["residual"][0]).mean() > np.abs(expr[0] - full.predict(x)).mean()  # not the in-sample fit
    x = (raw - raw[train].mean(0)) / raw[train].std(0)  # the honest fit standardises without the hold-out
    honest = KernelRidgeLOO().fit(x[train], expr[0][train])
    assert np.allclose(out["residual_honest"][0][held[0]], expr[0][held[0]] - honest.predict(x[held[0]]), atol=1e-5)
    assert out[1].shape == (49, 2) and out["held"].shape == (int(held[0].sum()), 2)


def test_probe_learns_from_a_bounded_subset_and_predicts_the_rest_out_of_sample(monkeypatch):
    import stimpute.models.asign.members as members

    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(49, 3, 4)), rng.normal(size=(49, 3, 4))]
    expr = [feats[0][:, 0, :2] + rng.normal(scale=0.3, size=(49, 2)), None]
    prepared = _Stub([_grid(7, 0), _grid(7, 0)], [0.0, 10.0], feats, expr)
    held = {0: np.arange(49) % 5 == 0}
    whole = members.KernelRidgeMember().fit(prepared, [0], held, seed=0)
    monkeypatch.setattr(members, "PROBE_MAX_SPOTS", 20)
    bounded = members.KernelRidgeMember().fit(prepared, [0], held, seed=0)
    assert bounded.residual[0].shape == (49, 2) and np.isfinite(bounded.residual[0]).all()
    assert not np.allclose(bounded.predict(prepared, [1])[1], whole.predict(prepared, [1])[1])  # fitted on 20 spots, not 49
    again = members.KernelRidgeMember().fit(prepared, [0], held, seed=0)
    assert np.array_equal(again.residual[0], bounded.residual[0])  # the subset is seeded
