"""Baselines and the benchmark harness on a small synthetic PreparedStack built by hand."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial import cKDTree
from torch_geometric.data import Data

from stimpute.data import Stack
from stimpute.datasets import synthetic_truth
from stimpute.benchmark import RESULT_COLUMNS, image_only, protocol_splits, run_benchmark, run_split
from stimpute.errors import StimputeError
from stimpute.expression import select_panel
from stimpute.expression import panel_expression
from stimpute.models import METHODS, Method, NotApplicable, get_method, register_method
from stimpute.prepare import PreparedStack
from stimpute.models.baselines import cosine_top_k, overlap_weights
from stimpute.register.matching import disc_iou
from stimpute.figures import pcc_boxplot

FIRST_COLUMNS = ["method", "protocol", "known", "target", "gene", "pcc", "mse", "mae"]


def prepared_from(stack: Stack, coords_ref: list[np.ndarray], programmes: list[np.ndarray], seed: int = 0) -> PreparedStack:
    """Panel expression of every section, features = noisy latent programmes at 3 scales,
    and a hand-made graph: 6 nearest within a section, 3 nearest across adjacent layers."""
    rng = np.random.default_rng(seed)
    panel = stack[0].genes
    expression = [panel_expression(s, panel) for s in stack]
    features = [np.stack([p + 0.3 * rng.standard_normal(p.shape) for _ in range(3)], axis=1).astype(np.float32)
                for p in programmes]
    offsets = np.concatenate([[0], np.cumsum([s.n_spots for s in stack])])
    edges, types = [], []
    for i, xy in enumerate(coords_ref):
        nbr = cKDTree(xy).query(xy, k=7)[1][:, 1:]
        edges.append(np.stack([np.repeat(np.arange(len(xy)), 6), nbr.ravel()]) + offsets[i])
        types.append(np.zeros(nbr.size, int))
        if i:
            nbr = cKDTree(coords_ref[i - 1]).query(xy, k=3)[1]
            edges.append(np.stack([np.repeat(np.arange(len(xy)), 3) + offsets[i], nbr.ravel() + offsets[i - 1]]))
            types.append(np.ones(nbr.size, int))
    edge_index = torch.as_tensor(np.concatenate(edges, axis=1))
    graph = Data(edge_index=edge_index, edge_type=torch.as_tensor(np.concatenate(types)),
                 edge_weight=torch.ones(edge_index.shape[1]), num_nodes=int(offsets[-1]))
    from stimpute.features.encoders import encoder_record

    record = encoder_record("handcrafted", None)  # what prepare_stack records for the features
    return PreparedStack(stack, panel, expression, features, coords_ref, graph,
                         {"encoder": record["encoder"], "features": record})


@pytest.fixture(scope="module")
def prepared(synthetic) -> PreparedStack:
    truth = synthetic_truth(synthetic)
    coords = []
    for i, s in enumerate(synthetic):
        T = truth.to_reference(i)
        coords.append(s.xy @ T[:2, :2].T + T[:2, 2])
    return prepared_from(synthetic, coords, [truth.programmes[i] for i in range(len(synthetic))])


@pytest.fixture(scope="module")
def identical(synthetic) -> PreparedStack:
    """Two layers that are the same section: overlap must copy it exactly."""
    s0 = synthetic[0]
    stack = Stack([s0, replace(s0, name="copy", z_um=None)])
    programmes = [s0.adata.obsm["synthetic_programmes"]] * 2
    return prepared_from(stack, [s0.xy, s0.xy], programmes)


def mean_pcc(rows: pd.DataFrame) -> float:
    return float(np.nan_to_num(rows.pcc.to_numpy(float)).mean())


def test_disc_iou_by_hand():
    assert disc_iou(np.array([0.0]), 5.0, 5.0)[0] == pytest.approx(1.0)
    assert disc_iou(np.array([10.0]), 5.0, 5.0)[0] == pytest.approx(0.0)
    # centres one radius apart: lens area 2r²(π/3 − √3/4), union 2πr² − lens
    lens = 2 * (np.pi / 3 - np.sqrt(3) / 4)
    assert disc_iou(np.array([1.0]), 1.0, 1.0)[0] == pytest.approx(lens / (2 * np.pi - lens))


def test_overlap_weights_fall_back_to_nearest_spot():
    known = np.array([[0.0, 0.0], [10.0, 0.0]])
    w = overlap_weights(np.array([[0.0, 0.0], [100.0, 0.0]]), known, radius=2.0)
    np.testing.assert_allclose(w.toarray(), [[1, 0], [0, 1]])


def test_baseline_weights_are_sparse_and_match_brute_force():
    rng = np.random.default_rng(0)
    target, known = rng.uniform(0, 50, (300, 2)), rng.uniform(0, 50, (200, 2))
    w = overlap_weights(target, known, radius=2.0)
    assert w.nnz < 0.1 * w.shape[0] * w.shape[1]
    d = np.linalg.norm(target[:, None] - known[None], axis=2)
    dense = disc_iou(d.ravel(), 2.0, 2.0).reshape(d.shape) * (d < 4.0)
    lonely = dense.sum(1) == 0
    dense[np.flatnonzero(lonely), d[lonely].argmin(1)] = 1.0
    np.testing.assert_allclose(w.toarray(), dense / dense.sum(1, keepdims=True), atol=1e-12)
    query, keys = rng.normal(size=(50, 6)), rng.normal(size=(80, 6))
    top = cosine_top_k(query, keys, k=5, chunk=7)  # chunks smaller than the queries
    np.testing.assert_allclose(top.sum(axis=1), 1.0)
    z = (keys - keys.mean(0)) / keys.std(0)
    q = (query - keys.mean(0)) / keys.std(0)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (z / np.linalg.norm(z, axis=1, keepdims=True)).T
    expected = np.sort(np.argsort(-sim, axis=1)[:, :5], axis=1)
    np.testing.assert_array_equal(np.sort(top.tolil().rows.tolist(), axis=1), expected)


def test_overlap_copies_an_identical_layer(identical):
    genes, _ = run_split(identical, "overlap", protocol_splits(identical, "3d")[0])
    assert (genes.status == "ok").all()
    defined = genes.pcc.dropna()
    assert len(defined) > 0.9 * len(genes)
    assert defined.min() > 0.999
    assert genes.mse.max() < 1e-10


def test_baselines_learn_from_informative_features(prepared):
    split = protocol_splits(prepared, "3d")[0]
    scores = {name: mean_pcc(run_split(prepared, name, split)[0]) for name in ("overlap", "similarity", "ridge", "knn", "mean")}
    for name in ("overlap", "similarity", "ridge", "knn"):
        assert scores[name] > 0.3, scores
    assert scores["mean"] == 0.0  # a constant map: every per-gene PCC undefined, counted as 0
    mean_rows = run_split(prepared, "mean", split)[0]
    assert mean_rows.pcc.isna().all() and (mean_rows.mse > 0).all()


def test_mean_predicts_the_training_mean(prepared):
    pred = get_method("mean").fit_predict(prepared, [0, 1], [2])
    np.testing.assert_allclose(pred[2][5], np.concatenate(prepared.expression[:2]).mean(axis=0), rtol=1e-5)


def test_protocol_splits_and_the_2d_view(prepared):
    assert [(s.known, s.targets) for s in protocol_splits(prepared, "3d")] == [((0,), (1, 2)), ((1,), (0, 2)), ((2,), (0, 1))]
    assert [(s.known, s.targets) for s in protocol_splits(prepared, "2d")] == [((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,))]
    view = image_only(prepared)
    assert view.coords_ref is None and int(view.graph.edge_type.sum()) == 0
    assert view.graph.edge_index.shape[1] == int((prepared.graph.edge_type == 0).sum())
    genes, _ = run_split(view, "overlap", protocol_splits(prepared, "2d")[0])
    assert (genes.status == "not_applicable").all()
    with pytest.raises(StimputeError, match="protocol"):
        protocol_splits(prepared, "4d")


@pytest.fixture
def flaky():
    """A method that fails when S1 is the known section and works elsewhere."""

    @register_method
    class Flaky(Method):
        name = "flaky"

        def fit_predict(self, prepared, train, targets, seed=0):
            if train == [1]:
                raise RuntimeError("boom on S1")
            return {t: np.ones((prepared.stack[t].n_spots, len(prepared.panel))) for t in targets}

    yield "flaky"
    METHODS.pop("flaky")


def test_benchmark_writes_files_and_keeps_other_rows_when_a_split_fails(prepared, flaky, tmp_path):
    result = run_benchmark(prepared, tmp_path, methods=["mean", "ridge", flaky, "overlap"], seed=0,
                           settings={"command": "test"})
    results = pd.read_csv(tmp_path / "results.csv", keep_default_na=False, na_values=[""])
    assert list(results.columns[:8]) == FIRST_COLUMNS and list(results.columns) == RESULT_COLUMNS
    failed = results[results.status == "failed"]
    assert set(failed.method) == {"flaky"} and set(failed.known) == {"S1"} and set(failed.target) == {"S0", "S2"}
    assert failed.error.str.contains("RuntimeError: boom on S1").all()
    ridge = results[(results.method == "ridge") & (results.status == "ok")]
    assert ridge.groupby(["protocol", "known", "target"]).size().shape[0] == 3 * 2 + 3  # 3d: 3 splits × 2 targets; 2d: 3 × 1
    flaky_ok = results[(results.method == "flaky") & (results.protocol == "3d") & (results.status == "ok")]
    assert set(flaky_ok.known) == {"S0", "S2"}
    assert (results[(results.method == "overlap") & (results.protocol == "2d")].status == "not_applicable").all()
    assert (results.seconds >= 0).all()

    splits = json.loads((tmp_path / "splits.json").read_text())
    first_2d = splits["protocols"]["2d"][0]
    assert (first_2d["known"], first_2d["targets"]) == (["S1", "S2"], ["S0"])
    assert len(first_2d["top_hvg"]) == 50 and set(first_2d["top_hvg"]) <= set(first_2d["panel"]) and splits["seed"] == 0
    for split in splits["protocols"]["3d"]:  # each split's genes come from its known section only
        known = prepared.stack[split["known"][0]]
        assert split["panel"] == select_panel([known.adata])
    assert (results[results.method == "ridge"].groupby(["protocol", "known", "target"]).top50.sum() == 50).all()
    assert splits["stimpute_version"] == __import__("stimpute").__version__

    summary = (tmp_path / "summary.md").read_text()
    assert "per-spot PCC (ASIGN paper)" in summary and "| ridge | 3d |" in summary.replace("**", "")
    table = result.summary.set_index(["method", "protocol"])
    assert table.loc[("flaky", "3d"), "status"].startswith("failed on 2/6 targets")
    assert table.loc[("mean", "3d"), "undefined"] == table.loc[("mean", "3d"), "n_values"]
    assert table.loc[("ridge", "2d"), "pcc"] > 0.3
    spots = pd.read_csv(tmp_path / "spots.csv")
    assert set(spots.method) == {"mean", "ridge", "flaky", "overlap"}

    with pytest.raises(StimputeError, match="--force"):
        run_benchmark(prepared, tmp_path, methods=["mean"])
    png = pcc_boxplot(result.results, tmp_path / "pcc_boxplot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unknown_method_fails_before_work(prepared, tmp_path):
    with pytest.raises(StimputeError, match="unknown method"):
        run_benchmark(prepared, tmp_path, methods=["mean", "nope"])
    assert not (tmp_path / "results.csv").exists()


def test_not_applicable_is_not_a_failure(prepared):
    class Picky(Method):
        name = "picky"

        def fit_predict(self, prepared, train, targets, seed=0):
            raise NotApplicable("needs something else")

    METHODS["picky"] = Picky
    try:
        genes, spots = run_split(prepared, "picky", protocol_splits(prepared, "3d")[0])
    finally:
        METHODS.pop("picky")
    assert (genes.status == "not_applicable").all() and len(spots) == 0


def test_cli_benchmark_writes_every_file_and_guards_results(prepared, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import stimpute.pipeline  # noqa: F401  (imported before the patches below, so it never binds them)
    from stimpute.cli import app

    prepare = pytest.importorskip("stimpute.prepare")
    monkeypatch.setattr(prepare, "prepare_stack", lambda stack, **kw: prepared)
    monkeypatch.setattr("stimpute.io.read_stack", lambda paths: prepared.stack)
    out = tmp_path / "bench"
    args = ["benchmark", "S0", "S1", "S2", "--out", str(out), "--methods", "mean,KNN", "--protocols", "2d"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    for name in ("results.csv", "spots.csv", "splits.json", "summary.md", "pcc_boxplot.png"):
        assert (out / name).is_file(), name
    assert set(pd.read_csv(out / "results.csv").method) == {"mean", "knn"}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    bad = CliRunner().invoke(app, [*args, "--force", "--protocols", "4d"])
    assert bad.exit_code == 2 and "unknown protocol" in bad.output


def test_a_prediction_of_the_wrong_shape_is_a_failed_row(prepared):
    class Short(Method):
        name = "short"

        def fit_predict(self, prepared, train, targets, seed=0):
            return {t: np.zeros((3, len(prepared.panel))) for t in targets[:1]}

    METHODS["short"] = Short
    try:
        genes, _ = run_split(prepared, "short", protocol_splits(prepared, "3d")[0])
    finally:
        METHODS.pop("short")
    assert list(genes.status) == ["failed", "failed"]
    assert "shape (3, 60)" in genes.error.iloc[0] and "shape None" in genes.error.iloc[1]


def test_kernel_ridge_picks_its_penalty_by_exact_leave_one_out():
    from sklearn.kernel_ridge import KernelRidge as SkKernelRidge

    from stimpute.models.baselines import KernelRidgeLOO

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = np.c_[np.sin(x[:, 0]), x[:, 1] ** 2] + rng.normal(scale=0.1, size=(60, 2))
    model = KernelRidgeLOO(alphas=np.array([0.01, 0.1, 1.0])).fit(x, y)
    gamma = model.gamma_
    loo = []
    for alpha in (0.01, 0.1, 1.0):  # brute-force leave-one-out with scikit-learn's kernel ridge
        errors = []
        for i in range(60):
            keep = np.arange(60) != i
            mean = y[keep].mean(0)
            fit = SkKernelRidge(alpha=alpha, kernel="rbf", gamma=gamma).fit(x[keep], y[keep] - mean)
            errors.append(((fit.predict(x[i:i + 1]) + mean - y[i]) ** 2).mean())
        loo.append(np.mean(errors))
    sk = SkKernelRidge(alpha=model.alpha_, kernel="rbf", gamma=gamma).fit(x, y - y.mean(0))
    assert np.allclose(model.predict(x[:5]), sk.predict(x[:5]) + y.mean(0), atol=1e-8)
    assert model.alpha_ == [0.01, 0.1, 1.0][int(np.argmin(loo))]
    for i in range(3):  # each spot's out-of-sample prediction (the mean is kept from all spots)
        keep = np.arange(60) != i
        fit = SkKernelRidge(alpha=model.alpha_, kernel="rbf", gamma=gamma).fit(x[keep], y[keep] - y.mean(0))
        assert np.allclose(model.loo_predictions_[i], fit.predict(x[i:i + 1])[0] + y.mean(0), atol=1e-6)


def test_transfer_copies_the_registered_known_layer(prepared):
    from stimpute.metrics import pearson_columns
    from stimpute.models import get_method

    out = get_method("transfer").fit_predict(prepared, [1], [0, 2])
    for t in (0, 2):
        assert out[t].shape == prepared.expression[t].shape and np.isfinite(out[t]).all()
        assert np.nanmean(pearson_columns(out[t], prepared.expression[t])) > 0.3
