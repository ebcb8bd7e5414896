"""Stored features are features: a section's `obsm["<encoder>_features"]` (3DMoEST's
`uni_features`) is used as given, recorded as "<encoder> (stored)", never mixed with
another feature space; both 3DMoEST H5 layouts are read; what is written is named for
what it is."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stimpute.cli import app
from stimpute.datasets import synthetic_stack
from stimpute.errors import StimputeError
from stimpute.features import stored
from stimpute.data import Stack
from stimpute.graph import CROSS
from stimpute.io import read_section, read_stack, write_section
from stimpute.io.moest_h5 import MoestData, MoestSection, moest_to_stack, read_moest_h5
from stimpute.prepare import prepare_stack
from stimpute.register import given_registration, register_stack
from tests.helpers import refuses_moest_h5

DIM = 8


def _small_stack():
    return synthetic_stack(3, seed=0, n_genes=30, tissue_radius_um=260.0, image_size=600)


def _store(section, key: str, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(section.n_spots, DIM)).astype(np.float32)
    section.adata.obsm[key] = values
    return values


def _no_image_encoding(*_args, **_kwargs):
    raise AssertionError("features were computed from the image")


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Section folders of a small synthetic stack: plain, and with stored UNI features."""
    root = tmp_path_factory.mktemp("stored")
    plain, with_uni = [], []
    for i, section in enumerate(_small_stack()):
        plain.append(str(write_section(section, root / "plain")))
        _store(section, "uni_features", i)
        with_uni.append(str(write_section(section, root / "uni")))
    return {"plain": plain, "uni": with_uni}


# -- the two H5 layouts of the seed ------------------------------------------------------------
def _write_group(f, name, n, rng, **datasets):
    g = f.create_group(name)
    g["coords_3d"] = np.column_stack([rng.uniform(0, 1500, (n, 2)), np.zeros(n)])
    for key, value in datasets.items():
        g[key] = value
    return g


def test_reads_the_feature_layout_with_its_encoder(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:  # {uni_features, sobel_gradients, expression, coords_3d} + gene_names
        f["gene_names"] = np.array([b"G0", b"G1", b"G2"])
        uni = rng.normal(size=(6, 1024)).astype(np.float32)
        _write_group(f, "A1", 6, rng, uni_features=uni, sobel_gradients=rng.random((6, 8, 8)).astype(np.float32),
                     expression=rng.poisson(3, (6, 3)).astype(np.float32))
        _write_group(f, "B1", 4, rng, uni_features=uni[:4], sobel_gradients=rng.random((4, 8, 8)).astype(np.float32))
    data = read_moest_h5(path)
    a1 = data.sections[0]
    assert data.names == ["A1", "B1"] and a1.encoder == "uni" and a1.patches is None
    np.testing.assert_array_equal(a1.features, uni)
    stack = moest_to_stack(data)
    np.testing.assert_array_equal(stack["A1"].adata.obsm["uni_features"], uni)
    assert stored.stored_features(stack["B1"])[0] == "uni"


def test_reads_the_pre_extraction_layout(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "patches.h5"
    patches = rng.integers(0, 200, (5, 224, 224, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:  # {patches, expression, coords_3d} + gene_names: no features yet
        f["gene_names"] = np.array([b"G0", b"G1"])
        _write_group(f, "A1", 5, rng, patches=patches, expression=rng.poisson(3, (5, 2)).astype(np.float32))
    section = read_moest_h5(path).sections[0]
    assert section.features is None and section.sobel_gradients is None
    np.testing.assert_array_equal(section.patches, patches)
    one = read_section(path)  # a single-group file reads as a section: features will come from its image
    assert stored.stored_features(one) is None and "sobel_gradients" not in one.adata.obsm
    x, y = np.rint(one.xy[0]).astype(int)
    assert (one.image.read_region(x - 1, y - 1, 3, 3) != 255).any()  # the stored patch is the image there


def test_a_group_of_neither_layout_names_what_is_missing(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "neither.h5"
    with h5py.File(path, "w") as f:
        f["gene_names"] = np.array([b"G0"])
        _write_group(f, "A1", 3, rng, expression=np.ones((3, 1), np.float32))
        g = _write_group(f, "B1", 3, rng, sobel_gradients=np.ones((3, 4, 4), np.float32))
        g["handcrafted_features"] = np.ones((3, 5), np.float32)
        g["handcrafted_features"].attrs["encoder"] = "uni"
    refuses_moest_h5(path, r"neither\.h5::/A1: missing dataset 'uni_features' and no 'patches'")
    refuses_moest_h5(path, r"::/B1/handcrafted_features: encoder attribute 'uni' contradicts", delete=["A1"])


def test_registration_from_stored_positions_reads_no_image():
    rng = np.random.default_rng(3)
    groups = [MoestSection(name=f"Z{i}", coords_3d=np.column_stack([rng.uniform(300 * i, 900 + 300 * i, (n, 2)), np.full(n, 10.0 * i)]),
                           features=rng.normal(size=(n, 4)).astype(np.float32), sobel_gradients=np.zeros((n, 4, 4), np.float32),
                           attrs={"um_per_px": 2.0 + i}) for i, n in enumerate((7, 9))]
    # each section read from its own single-group file: its own origin and pixel size, blank images
    sections = [moest_to_stack(MoestData([g], ["G0"]))[0] for g in groups]
    assert sections[0].um_per_px != sections[1].um_per_px
    registration = register_stack(Stack(sections))
    # reference pixels -> µm gives the stored positions back, up to one shift for the whole stack
    offsets = np.concatenate([xy * sections[0].um_per_px - g.coords_3d[:, :2] for xy, g in zip(registration.coords_ref, groups)])
    np.testing.assert_allclose(offsets, np.broadcast_to(offsets[0], offsets.shape), atol=1e-6)
    np.testing.assert_allclose(registration.coords_ref[0], sections[0].xy, atol=1e-9)
    assert registration.pairs.empty and "dice_after" in registration.pairs
    sections[1].adata.obsm["coords_3d"] = sections[1].adata.obsm["coords_3d"] + rng.normal(0, 5.0, (9, 3))
    assert given_registration(Stack(sections)) is None  # not the spots' own positions: images are registered


# -- used as given, never mixed ------------------------------------------------------------------
def test_stored_features_are_used_as_given(monkeypatch):
    stack = _small_stack()
    given = [_store(s, "uni_features", i) for i, s in enumerate(stack)]
    monkeypatch.setattr(stored, "spot_features", _no_image_encoding)
    for encoder in (None, "uni"):  # default, or naming the stored encoder (no weights needed)
        prepared = prepare_stack(stack, known="S0,S1", encoder=encoder, register=False, feature_norm="none")  # as stored
        for feats, spot in zip(prepared.features, given):
            assert feats.shape == (len(spot), 3, DIM) and feats.dtype == np.float32
            for scale in range(3):  # one stored scale stands for all three
                np.testing.assert_array_equal(feats[:, scale], spot)
        record = prepared.settings["features"]
        assert prepared.settings["encoder"] == record["encoder"] == "uni (stored)"
        assert record["stored_sections"] == ["S0", "S1", "S2"] and record["weights"] is None
    with pytest.raises(StimputeError, match=r"carries stored uni features \(obsm\['uni_features'\]\), not --encoder resnet18"):
        prepare_stack(stack, known="S0,S1", encoder="resnet18", register=False)


def test_two_stored_feature_spaces_are_refused():
    stack = _small_stack()
    _store(stack[0], "uni_features", 0)
    _store(stack[2], "handcrafted_features", 2)
    with pytest.raises(StimputeError, match="carries stored handcrafted features but S0 carries uni features"):
        prepare_stack(stack, known="S0,S1", register=False)
    _store(stack[0], "handcrafted_features", 0)
    with pytest.raises(StimputeError, match=r"several encoders \(uni_features, handcrafted_features\)"):
        prepare_stack(stack, known="S0,S1", register=False)


def test_sections_without_stored_features_get_the_same_encoder_at_the_spot_scale(monkeypatch):
    stack = _small_stack()
    _store(stack[0], "uni_features", 0)
    with pytest.raises(StimputeError, match="'uni' needs a local weight file"):  # S1, S2 would need UNI computed
        prepare_stack(stack, known="S0,S1", register=False)
    del stack[0].adata.obsm["uni_features"]
    given = _store(stack[0], "handcrafted_features", 0)
    calls = []

    def fake(section, encoder, **_kwargs):  # distinct values per scale: only the spot scale may be kept
        calls.append((section.name, encoder))
        return np.stack([np.full((section.n_spots, DIM), s, np.float32) for s in (1.0, 2.0, 3.0)], axis=1)

    monkeypatch.setattr(stored, "spot_features", fake)
    prepared = prepare_stack(stack, known="S0,S1", register=False, feature_norm="none")  # the values as encoded
    assert calls == [("S1", "handcrafted"), ("S2", "handcrafted")]
    np.testing.assert_array_equal(prepared.features[0][:, 2], given)
    assert (prepared.features[1] == 1.0).all() and (prepared.features[2] == 1.0).all()
    assert prepared.settings["encoder"] == "handcrafted (stored)" and prepared.settings["features"]["stored_sections"] == ["S0"]


# -- every path: impute, train, predict, convert --------------------------------------------------
def test_impute_uses_stored_features_and_refuses_another_encoder(tmp_path, folders, monkeypatch):
    runner = CliRunner()
    refused = runner.invoke(app, ["impute", *folders["uni"], "--known", "S1", "--out", str(tmp_path / "no"),
                                  "--encoder", "handcrafted"])
    assert refused.exit_code == 2 and len(_error_lines(refused)) == 1, refused.output
    assert "section.h5ad" in refused.output and "stored uni features" in refused.output
    monkeypatch.setattr(stored, "spot_features", _no_image_encoding)
    result = runner.invoke(app, ["impute", *folders["uni"], "--known", "S1", "--out", str(tmp_path / "ok"), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())
    assert config["encoder"] == "uni (stored)" and config["stored_sections"] == ["S0", "S1", "S2"]


def test_train_and_predict_keep_one_feature_space(tmp_path, folders):
    runner = CliRunner()
    model = tmp_path / "model"
    trained = runner.invoke(app, ["train", *folders["uni"][:2], "--out", str(model), "--method", "moe3d"])
    assert trained.exit_code == 0, trained.output
    assert yaml.safe_load((model / "config.yaml").read_text())["encoder"] == "uni (stored)"
    ok = runner.invoke(app, ["predict", folders["uni"][2], "--model", str(model), "--out", str(tmp_path / "p")])
    assert ok.exit_code == 0, ok.output
    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["encoder"] == "uni (stored)"
    mixed = runner.invoke(app, ["predict", folders["plain"][2], "--model", str(model), "--out", str(tmp_path / "q")])
    assert mixed.exit_code == 2 and len(_error_lines(mixed)) == 1, mixed.output
    assert "gives uni features, but the model" in mixed.output and "trained on uni (stored) features" in mixed.output


def test_to_moest_h5_names_features_for_what_they_are(tmp_path, folders):
    runner = CliRunner()
    out = tmp_path / "stack.h5"
    result = runner.invoke(app, ["convert", "to-moest-h5", *folders["plain"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert "uni_features" not in f["S0"] and f["S0/handcrafted_features"].attrs["encoder"] == "handcrafted"
    data = read_moest_h5(out)
    assert {s.encoder for s in data.sections} == {"handcrafted"} and data.attrs["encoder"] == "handcrafted"
    back = runner.invoke(app, ["convert", "moest-h5", str(out), str(tmp_path / "sections")])
    assert back.exit_code == 0, back.output
    s0 = read_section(tmp_path / "sections" / "S0")
    np.testing.assert_array_equal(s0.adata.obsm["handcrafted_features"], data.sections[0].features)
    blank = read_stack([tmp_path / "sections" / n for n in ("S0", "S1", "S2")])  # no patches written: blank images
    prepared = prepare_stack(blank, known="S0,S1")  # features and registration as stored, no image read
    assert prepared.settings["encoder"] == "handcrafted (stored)"
    for entry in prepared.settings["registration"]["sections"]:
        np.testing.assert_allclose(entry["matrix"], np.eye(3), atol=1e-9)
    assert (prepared.graph.edge_type == CROSS).any()
    again = runner.invoke(app, ["convert", "to-moest-h5", *folders["uni"], "--out", str(tmp_path / "uni.h5")])
    assert again.exit_code == 0, again.output
    uni = read_moest_h5(tmp_path / "uni.h5")
    assert uni.sections[1].encoder == "uni" and uni.attrs["encoder"] == "uni (stored)"
    np.testing.assert_array_equal(uni.sections[1].features, read_section(folders["uni"][1]).adata.obsm["uni_features"])


def test_advise_uses_stored_features(folders, monkeypatch):
    from stimpute.advise import describe_stack

    with pytest.raises(StimputeError, match="carries stored uni features"):
        describe_stack(read_stack(folders["uni"]), encoder="handcrafted")
    monkeypatch.setattr(stored, "spot_features", _no_image_encoding)
    description = describe_stack(read_stack(folders["uni"]))  # counts stripped, stored features kept
    assert [len(e) for e in description.embedding] == [read_section(f).n_spots for f in folders["uni"]]
