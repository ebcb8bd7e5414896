"""3DMoEST: NB likelihood, Fourier encoding, sparse routing, the H5 format, a tiny fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from stimpute.datasets import PROGRAMMES_KEY, synthetic_truth
from stimpute.errors import InputError, StimputeError
from stimpute.metrics import gene_metrics, summarise_pcc
from stimpute.expression import panel_expression, select_panel
from stimpute.io.moest_h5 import (
    MoestData,
    MoestSection,
    coords_3d,
    moest_to_prepared,
    moest_to_stack,
    prepared_to_moest,
    read_moest_h5,
    write_moest_h5,
)
from stimpute.prepare import PreparedStack
from stimpute.models.moe3d import (
    FourierEncoding,
    MoE3D,
    MoE3DConfig,
    TopKRouter,
    expected_log1p,
    fourier_frequencies,
    load_balance_loss,
    nb_log_likelihood,
    sobel_gradients,
)
from tests.helpers import refuses_moest_h5


def test_nb_log_likelihood_matches_scipy():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 200, 500).astype(np.float64)
    mean = rng.uniform(0.05, 150.0, 500)
    theta = rng.uniform(0.1, 50.0, 500)
    ours = nb_log_likelihood(torch.as_tensor(counts), torch.as_tensor(mean), torch.as_tensor(theta)).numpy()
    expected = stats.nbinom.logpmf(counts, theta, theta / (theta + mean))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_fourier_encoding_shapes_and_frequencies():
    freqs = fourier_frequencies(4, min_wavelength=100.0, max_wavelength=800.0)
    np.testing.assert_allclose(freqs, [1 / 800, 1 / 400, 1 / 200, 1 / 100])
    xyz = torch.tensor([[0.0, 0.0, 0.0], [50.0, 200.0, 10.0], [25.0, 100.0, 30.0]])
    enc = FourierEncoding(freqs)(xyz).numpy()
    assert enc.shape == (3, 3 * 2 * 4)
    blocks = enc.reshape(3, 3, 2, 4)  # spot, coordinate, (sin, cos), frequency
    angles = 2 * np.pi * xyz.numpy()[:, :, None] * freqs
    np.testing.assert_allclose(blocks[:, :, 0], np.sin(angles), atol=1e-5)
    np.testing.assert_allclose(blocks[:, :, 1], np.cos(angles), atol=1e-5)
    assert blocks[1, 0, 0, 3] == pytest.approx(0.0, abs=1e-5)  # x = 50 µm is half a 100 µm period


@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_activates_exactly_k_experts(k):
    torch.manual_seed(0)
    router = TopKRouter(n_inputs=10, n_experts=6, top_k=k, noise=1.0)
    stats_in = torch.randn(300, 10)
    for training in (True, False):
        router.train(training)
        gates, probs = router(stats_in)
        assert ((gates > 0).sum(dim=1) == k).all()
        torch.testing.assert_close(gates.sum(dim=1), torch.ones(300))
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(300))


def test_load_balance_is_one_when_even_and_larger_when_collapsed():
    even = torch.eye(4).repeat(25, 1)
    assert load_balance_loss(even, torch.full((100, 4), 0.25)).item() == pytest.approx(1.0)
    collapsed = torch.zeros(100, 4)
    collapsed[:, 0] = 1
    assert load_balance_loss(collapsed, collapsed).item() == pytest.approx(4.0)


def _random_moest(rng, with_patches=True) -> MoestData:
    genes = [f"G{g}" for g in range(7)]
    sections = []
    for name, n, measured in (("A1", 12, True), ("B1", 9, False)):
        sections.append(MoestSection(
            name=name,
            features=rng.normal(size=(n, 16)).astype(np.float32),
            coords_3d=np.column_stack([rng.uniform(0, 2000, (n, 2)), np.full(n, 10.0 * len(sections))]),
            sobel_gradients=rng.random((n, 8, 8)).astype(np.float32),
            expression=rng.poisson(4, (n, len(genes))).astype(np.float32) if measured else None,
            patches=rng.integers(0, 255, (n, 224, 224, 3), dtype=np.uint8) if with_patches else None,
            spot_ids=[f"{name}_{j}" for j in range(n)],
            attrs={"um_per_px": 0.5, "spot_diameter_um": 100.0},
        ))
    return MoestData(sections, genes, {"thickness_um": 10.0})


def test_moest_h5_round_trip_is_lossless(tmp_path):
    data = _random_moest(np.random.default_rng(1))
    first = write_moest_h5(data, tmp_path / "a.h5")
    back = read_moest_h5(first)
    assert back.gene_names == data.gene_names and back.names == ["A1", "B1"]
    for a, b in zip(data.sections, back.sections):
        for key in ("features", "coords_3d", "sobel_gradients", "expression", "patches"):
            x, y = getattr(a, key), getattr(b, key)
            assert (x is None and y is None) or (np.array_equal(x, y) and x.dtype == y.dtype), key
        assert a.spot_ids == b.spot_ids and b.attrs == a.attrs
    second = read_moest_h5(write_moest_h5(back, tmp_path / "b.h5"))
    assert all(np.array_equal(s.features, t.features) for s, t in zip(back.sections, second.sections))
    with pytest.raises(StimputeError, match="already exists"):
        write_moest_h5(data, first)


def test_moest_h5_to_sections_keeps_counts_and_positions():
    data = _random_moest(np.random.default_rng(2))
    stack = moest_to_stack(data)
    a = stack["A1"]
    np.testing.assert_array_equal(a.adata.X.toarray(), data.sections[0].expression)
    assert a.genes == data.gene_names and not stack["B1"].has_counts
    shift = a.xy * a.um_per_px - data.sections[0].coords_3d[:, :2]  # one origin for the whole stack
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-9)
    np.testing.assert_allclose(stack["B1"].xy * a.um_per_px - data.sections[1].coords_3d[:, :2], np.broadcast_to(shift[0], (9, 2)), atol=1e-9)
    x, y = np.rint(a.xy[0]).astype(int)
    assert (a.image.read_region(x - 1, y - 1, 3, 3) != 255).any()  # the stored patch is drawn there
    np.testing.assert_array_equal(sobel_gradients(a), data.sections[0].sobel_gradients)
    prepared = moest_to_prepared(data)
    assert prepared.features[0].shape == (12, 3, 16) and prepared.expression[1] is None


def test_malformed_moest_h5_names_group_and_dataset(tmp_path):
    path = write_moest_h5(_random_moest(np.random.default_rng(3), with_patches=False), tmp_path / "x.h5")
    refuses_moest_h5(path, r"x\.h5::/B1/coords_3d: shape \(9, 2\), expected \(N, 3\)",
                     delete=["B1/coords_3d"], put={"B1/coords_3d": np.zeros((9, 2))})
    refuses_moest_h5(path, r"::/A1: missing dataset 'uni_features'", delete=["A1/uni_features"])


@pytest.fixture(scope="module")
def prepared(synthetic):
    """The synthetic stack with true registration and noisy latent programmes as features."""
    rng = np.random.default_rng(0)
    truth = synthetic_truth(synthetic)
    panel = select_panel([synthetic[1].adata], n_top=30)
    coords = [(truth.to_reference(i) @ np.column_stack([s.xy, np.ones(s.n_spots)]).T).T[:, :2] for i, s in enumerate(synthetic)]
    features = [
        (s.adata.obsm[PROGRAMMES_KEY] + rng.normal(0, 0.3, s.adata.obsm[PROGRAMMES_KEY].shape))[:, None, :].astype(np.float32)
        for s in synthetic
    ]
    return PreparedStack(synthetic, panel, [panel_expression(s, panel) for s in synthetic], features, coords)


def test_moe3d_fit_predict_on_synthetic_stack(prepared, tmp_path):
    method = MoE3D(epochs=80, n_experts=4, top_k=2)
    pred = method.fit_predict(prepared, train=[1], targets=[0, 2], seed=0)
    assert set(pred) == {0, 2}
    for i in (0, 2):
        assert pred[i].shape == prepared.expression[i].shape and np.isfinite(pred[i]).all()
        summary = summarise_pcc(gene_metrics(pred[i], prepared.expression[i], prepared.panel).pcc)
        assert summary.mean > 0.3, summary
    assert ((method.routing_[0] > 0).sum(axis=1) == 2).all()
    assert method.save(tmp_path) == tmp_path / "moe3d.pt"
    loaded = MoE3D.load(tmp_path)
    again = loaded.predict(prepared, [0, 2])
    np.testing.assert_allclose(again[0], pred[0], rtol=1e-5, atol=1e-6)
    loaded.config = replace(loaded.config, prediction="expected")
    expected = loaded.predict(prepared, [0])[0]
    assert np.isfinite(expected).all() and (expected <= pred[0] + 1e-5).all()  # E[log1p] ≤ log1p(E)


def test_moe3d_cross_validation_by_section(prepared):
    rows = MoE3D(MoE3DConfig(epochs=20, n_experts=3, top_k=1)).cross_validate(prepared, [0, 1, 2], n_folds=3)
    assert sorted(rows.section.unique()) == ["S0", "S1", "S2"] and sorted(rows.fold.unique()) == [0, 1, 2]
    assert len(rows) == 3 * len(prepared.panel) and rows.pcc.notna().all()
    with pytest.raises(StimputeError, match="folds"):
        MoE3D().cross_validate(prepared, [0, 1, 2], n_folds=4)


def test_prepared_stack_to_moest_h5(prepared, tmp_path):
    data = prepared_to_moest(prepared, thickness_um=12.0)
    back = read_moest_h5(write_moest_h5(data, tmp_path / "syn.h5"))
    s2 = back.sections[2]
    np.testing.assert_allclose(s2.coords_3d[:, 2], 24.0)
    np.testing.assert_allclose(s2.coords_3d, coords_3d(prepared.stack, prepared.coords_ref, 12.0)[2])
    expected = prepared.stack[2].adata[:, prepared.panel].X.toarray()
    np.testing.assert_array_equal(s2.expression, expected)
    assert back.gene_names == prepared.panel and s2.sobel_gradients.shape == (prepared.stack[2].n_spots, 32, 32)


def test_cli_convert_moest_h5_and_read_section(tmp_path):
    from typer.testing import CliRunner

    from stimpute.cli import app
    from stimpute.io import read_section

    data = _random_moest(np.random.default_rng(4))
    path = write_moest_h5(data, tmp_path / "stack.h5")
    result = CliRunner().invoke(app, ["convert", "moest-h5", str(path), str(tmp_path / "sections")])
    assert result.exit_code == 0, result.output
    a1 = read_section(tmp_path / "sections" / "A1")
    np.testing.assert_array_equal(a1.adata.X.toarray(), data.sections[0].expression)
    np.testing.assert_array_equal(a1.adata.obsm["uni_features"], data.sections[0].features)
    again = CliRunner().invoke(app, ["convert", "moest-h5", str(path), str(tmp_path / "sections")])
    assert again.exit_code == 2 and "already holds results" in again.output and "--force" in again.output
    with pytest.raises(InputError, match="holds 2 sections"):
        read_section(path)
    single = MoestData([data.sections[0]], data.gene_names, data.attrs)
    assert read_section(write_moest_h5(single, tmp_path / "one.h5")).spot_ids == data.sections[0].spot_ids


def test_expected_log1p_matches_a_direct_sum():
    mean = torch.tensor([[0.3, 5.0, 200.0]], dtype=torch.float64)
    theta = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    ours = expected_log1p(mean, theta, library=5000.0).numpy()[0]
    y = np.arange(20000)
    direct = [(stats.nbinom.pmf(y, t, t / (t + m)) * np.log1p(1e4 * y / 5000.0)).sum() for m, t in zip(mean[0].numpy(), theta.numpy())]
    np.testing.assert_allclose(ours, direct, rtol=1e-6)
    assert (ours < np.log1p(1e4 * mean.numpy()[0] / 5000.0)).all()  # Jensen: below log1p of the mean
