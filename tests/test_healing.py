"""Issue 30, part B: stray rank variables, stale copies, NaN in outputs, caches and checkpoints
that heal, bounded grids, damaged model folders, non-UTF-8 paths, plausibility of options and
images. Each test failed on 9be9671."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stimpute.datasets import synthetic_stack
from stimpute.distributed import RANK_VARIABLES, WORLD_VARIABLES, global_rank, launch
from stimpute.errors import StimputeWarning
from stimpute.features import spot_features
from stimpute.image import SectionImage
from stimpute.io import read_section, write_h5ad_atomic, write_section
from stimpute.models.msagnet import MSAGNetConfig
from stimpute.pipeline import run_impute
from stimpute.models.msagnet_training import TrainConfig, fit
from tests.helpers import one_error_line, run_cli, write_her2st_folder
from tests.test_impute import _tiny_batch


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Two small synthetic section folders: S0 (known) and S1 (with counts, imputed)."""
    root = tmp_path_factory.mktemp("in")
    return [write_section(s, root) for s in synthetic_stack(2, seed=4, n_genes=20, tissue_radius_um=300.0, image_size=600)]


@pytest.fixture(scope="module")
def model(folders, tmp_path_factory) -> Path:
    """A 2D MSAGNet model folder trained for a few epochs on S0."""
    out = tmp_path_factory.mktemp("model") / "model"
    result = run_cli("train", folders[0], "--out", out, "--epochs", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def no_rank(monkeypatch):
    for name in RANK_VARIABLES + WORLD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _warnings(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("warning:")]


# -- case 6: rank from the launch, not from the environment ---------------------------------


@pytest.mark.parametrize("variables", [{"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, {"RANK": "1"}, {"LOCAL_RANK": "1"}])
def test_a_stray_rank_variable_runs_as_rank_zero_with_one_warning(variables, no_rank, tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    for name, value in variables.items():
        no_rank.setenv(name, value)
    out = tmp_path / "out"
    result = run_cli("features", folder, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "X1.features.h5").is_file() and "X1: handcrafted features" in result.output
    stray = [line for line in _warnings(result) if "running as rank 0" in line]
    assert len(stray) == 1 and next(iter(variables)) in stray[0], result.output


def test_rank_counts_only_where_the_launch_runs_that_many_processes(no_rank):
    no_rank.setenv("LOCAL_RANK", "1")
    with launch("2", 1):  # `--devices 2`: Lightning started this process as local rank 1
        assert global_rank() == 1
    with launch("1", 2):  # `--num-nodes 2`: the second machine
        assert global_rank() == 1
    with launch("1", 1), pytest.warns(StimputeWarning, match="LOCAL_RANK=1 in the environment"):
        assert global_rank() == 0
    with launch("auto", 1):  # Lightning decides: the launcher's world size tells
        with pytest.warns(StimputeWarning):
            assert global_rank() == 0
        no_rank.setenv("WORLD_SIZE", "2")
        assert global_rank() == 1
    no_rank.setenv("LOCAL_RANK", "x")
    assert global_rank() == 0


# -- case 7: a converted image is compared by content ----------------------------------------


def test_convert_force_copies_a_new_image_of_the_same_size_and_an_older_mtime(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    adata = ad.AnnData(X=np.random.default_rng(0).poisson(3, (6, 4)).astype(np.float32) + 1)
    adata.var_names = [f"G{i}" for i in range(4)]
    adata.obs_names = [f"s{i}" for i in range(6)]
    adata.obsm["spatial"] = np.c_[np.arange(6) * 10 + 10, np.full(6, 20)].astype(float)
    adata.uns["stimpute"] = {"um_per_px": 1.0, "spot_diameter_um": 5.0}
    write_h5ad_atomic(adata, source / "A.h5ad", force=True)
    image = source / "A.bmp"
    Image.fromarray(np.full((80, 80, 3), 200, np.uint8)).save(image)
    assert run_cli("convert", "h5ad", source / "A.h5ad", tmp_path / "out").exit_code == 0
    copied = tmp_path / "out" / "A" / "image.bmp"
    Image.fromarray(np.full((80, 80, 3), 60, np.uint8)).save(image)  # B: same size, older than the copy of A
    os.utime(image, (time.time() - 3600, time.time() - 3600))
    result = run_cli("convert", "h5ad", source / "A.h5ad", tmp_path / "out", "--force")
    assert result.exit_code == 0, result.output
    assert copied.read_bytes() == image.read_bytes()
    stored = ad.read_h5ad(tmp_path / "out" / "A" / "section.h5ad").uns["spatial"]["A"]["images"]["lowres"]
    assert np.asarray(Image.open(copied)).mean() == pytest.approx(np.asarray(stored).mean(), abs=1)


# -- case 8: no NaN in any output ------------------------------------------------------------


def _nan_fields(adata: ad.AnnData) -> list[str]:
    found = []

    def check(name, values):
        values = np.asarray(values.toarray() if hasattr(values, "toarray") else values)
        if values.dtype.kind == "f" and np.isnan(values).any():
            found.append(name)

    def walk(name, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{name}/{key}", item)
        elif isinstance(value, (np.ndarray, float)):
            check(name, value)

    check("X", adata.X)
    for frame, label in ((adata.obs, "obs"), (adata.var, "var")):
        for column in frame.columns:
            if frame[column].dtype.kind == "f":
                check(f"{label}[{column}]", frame[column].to_numpy())
    for store, label in ((adata.layers, "layers"), (adata.obsm, "obsm")):
        for key in store:
            check(f"{label}[{key}]", store[key])
    walk("uns", dict(adata.uns))
    return found


def assert_no_nan(out: Path) -> None:
    """No `.h5ad`, CSV or YAML file written into `out` holds a NaN."""
    h5ads = sorted(out.rglob("*.h5ad"))
    assert h5ads
    for path in h5ads:
        assert _nan_fields(ad.read_h5ad(path)) == [], path
    for path in out.rglob("*.csv"):
        assert not pd.read_csv(path).isna().any().any(), path
    for path in out.rglob("*.yaml"):
        assert ".nan" not in path.read_text().lower(), path


def test_predict_writes_no_nan_and_says_why_confidence_is_undefined(folders, model, tmp_path):
    result = run_cli("predict", folders[1], "--model", model, "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    assert_no_nan(tmp_path / "pred")
    adata = ad.read_h5ad(tmp_path / "pred" / "S1.h5ad")
    assert (adata.obs["stimpute_confidence"] == 0).all() and "undefined" in adata.uns["stimpute"]["confidence"]


def test_impute_writes_no_nan(folders, tmp_path):
    run_impute(folders, "S0", tmp_path / "imputed", config=TrainConfig(seed=0, max_epochs=3))
    assert_no_nan(tmp_path / "imputed")
    block = ad.read_h5ad(tmp_path / "imputed" / "block.h5ad")
    assert "confidence" not in block.uns["stimpute"]["sections"]["S1"]  # defined there: the PCC of two estimates


# -- case 10: a damaged checkpoint is a miss --------------------------------------------------


@pytest.mark.parametrize("damaged", ["best.ckpt", "last.ckpt"])
def test_a_damaged_checkpoint_is_retrained_with_a_warning(damaged, tmp_path):
    batch = _tiny_batch()
    config = TrainConfig(max_epochs=4, patience=100, seed=3, model=MSAGNetConfig(width=16, heads=2, transformer_layers=1))
    first = fit(batch, config, ckpt_dir=tmp_path)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, as by a kill or a full disk
    with pytest.warns(StimputeWarning, match=f"{damaged}: unreadable checkpoint"):
        again = fit(batch, config, ckpt_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(first(batch), again(batch))
    torch.load(path, map_location="cpu", weights_only=False)  # rewritten whole


# -- case 11: a damaged feature cache is a miss ------------------------------------------------


def test_a_truncated_feature_cache_is_computed_again_and_rewritten(folders, tmp_path):
    section = read_section(folders[0])
    expected = spot_features(section, cache_dir=tmp_path)
    cache = tmp_path / "S0.features.h5"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.warns(StimputeWarning, match="S0.features.h5: unreadable feature cache"):
        np.testing.assert_array_equal(spot_features(section, cache_dir=tmp_path), expected)
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(spot_features(section, cache_dir=tmp_path, runs=runs), expected)
    assert runs[0].cached


# -- case 12: the virtual grid is bounded ------------------------------------------------------


def test_a_grid_over_the_spot_limit_fails_before_any_work(folders, tmp_path):
    image = tmp_path / "S1.png"
    Image.fromarray(read_section(folders[1]).image.read_region(0, 0, 600, 600)).save(image)
    start = time.perf_counter()
    result = run_cli("impute", folders[0], image, "--known", "S0", "--out", tmp_path / "out", "--um-per-px", 2,
                     "--grid-scale", 0.02)
    one_error_line(result, "S1.png", "--grid-scale 0.02", "virtual spots", "limit of 200,000 per section")
    assert time.perf_counter() - start < 30


# -- case 13: a damaged model folder is one line ----------------------------------------------


@pytest.mark.parametrize("text, needle", [
    ("method: msagnet\nseed: 0\n", "no gene panel"),  # was KeyError: 'panel'
    ("- a\n- b\n", "expected a mapping of settings"),  # was AttributeError (a YAML list)
    ("method: msagnet\npanel: [G0, G1\n", "not valid YAML"),  # was a raw ScannerError/ParserError
    ("panel: [G0]\nmethod: [1]\n", "'method' is [1], not a text"),
    ("panel: [G0]\nmethod: nothing\n", "records an unknown method 'nothing'"),
    ("panel: [G0]\nspots: [1]\n", "'spots' is [1], not a mapping"),
    ("panel: [G0]\ntop_hvg: [G0, null]\n", "'top_hvg' names None, which is not in the panel"),
    ("panel: [G0]\nfeature_normalisation: [x]\n", "'feature_normalisation' is ['x'], not one of section, none"),
    ("panel: [G0]\nspots: {pitch_um: -5}\n", "'spots' holds pitch_um: -5; expected spot_diameter_um, pitch_um, um_per_px"),
    ("\udcff", "cannot read"),
])
def test_a_damaged_model_config_is_one_line(text, needle, folders, model, tmp_path):
    copy = shutil.copytree(model, tmp_path / "model")
    (copy / "config.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
    result = run_cli("predict", folders[1], "--model", copy, "--out", tmp_path / "pred")
    one_error_line(result, "config.yaml", needle)


def _predict_one_line_or_success(model: Path, section: Path) -> None:
    """`stimpute predict` with `model` ends in a prediction or in one error line, no
    traceback (warnings about the data may come first; figures are not drawn: they cost
    seconds and are not what is fuzzed)."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch("stimpute.pipeline._heatmaps", lambda *a, **k: Path(tmp)):
        result = run_cli("predict", section, "--model", model, "--out", Path(tmp) / "pred")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 0 or (result.exit_code == 2 and len(errors) == 1), result.output


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_fuzzed_model_configs_give_one_line_or_a_prediction(data, folders, model):
    """config.yaml with a recorded field removed or replaced by any YAML value, or its text
    cut or spliced: never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(model, Path(tmp) / "model", ignore=shutil.ignore_patterns("cache")))
        config = copy / "config.yaml"
        text = config.read_text()
        recorded = yaml.safe_load(text)
        key = data.draw(st.sampled_from(sorted(recorded)))
        edit = data.draw(st.sampled_from(["drop", "replace", "cut", "splice"]))
        if edit == "drop":
            config.write_text(yaml.safe_dump({k: v for k, v in recorded.items() if k != key}))
        elif edit == "replace":
            config.write_text(yaml.safe_dump({**recorded, key: data.draw(YAML_VALUES)}))
        elif edit == "cut":
            config.write_text(text[: data.draw(st.integers(0, len(text)))])
        else:
            at = data.draw(st.integers(0, len(text)))
            config.write_text(text[:at] + data.draw(st.text(max_size=12)) + text[at:])
        _predict_one_line_or_success(copy, folders[1])


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoints_give_one_line_or_a_prediction(data, folders, model):
    """The model's checkpoint cut short, some bytes flipped, or replaced by other bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(model, Path(tmp) / "model", ignore=shutil.ignore_patterns("cache")))
        ckpt = copy / "checkpoints" / "best.ckpt"
        raw = bytearray(ckpt.read_bytes())
        edit = data.draw(st.sampled_from(["cut", "flip", "bytes"]))
        if edit == "cut":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif edit == "flip":
            for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
                raw[i] ^= 0xFF
        else:
            raw = data.draw(st.binary(max_size=256))
        ckpt.write_bytes(bytes(raw))
        _predict_one_line_or_success(copy, folders[1])


# -- case 14: a path that is not UTF-8 is refused before any work ----------------------------


def test_a_non_utf8_input_path_is_one_line_before_any_work(folders, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/S\xff1"))
    shutil.copytree(folders[1], odd)
    out = tmp_path / "out"
    result = run_cli("impute", folders[0], odd, "--known", "S0", "--out", out, "--epochs", 2)
    one_error_line(result, "S\\xff1", "not valid UTF-8")
    assert not out.exists()


# -- case 16: options and inputs that say what is wrong ---------------------------------------


@pytest.mark.parametrize("value", ["0", "-1"])
def test_um_per_px_must_be_positive(value, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    adata = ad.AnnData(X=np.ones((4, 2), np.float32))
    adata.var_names, adata.obs_names = ["G0", "G1"], [f"s{i}" for i in range(4)]
    adata.obsm["spatial"] = np.full((4, 2), 10.0)
    write_h5ad_atomic(adata, folder / "A.h5ad", force=True)
    Image.new("RGB", (40, 40), "white").save(folder / "A.png")
    result = run_cli("convert", "h5ad", folder / "A.h5ad", tmp_path / "out", "--um-per-px", value)
    one_error_line(result, "--um-per-px", "must be a pixel size > 0 µm", f"got {value}")


def test_an_empty_known_list_says_so_alone(folders, tmp_path):
    result = run_cli("impute", *folders, "--known", "", "--out", tmp_path / "out")
    one_error_line(result, "--known", "the list of known sections is empty")
    assert not (tmp_path / "out").exists()


def test_duplicated_genes_of_a_her2st_counts_file_become_name_1_with_a_warning(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    counts_path = folder / "X1.tsv.gz"
    with gzip.open(counts_path, "rt") as fh:
        lines = fh.read().splitlines()
    lines[0] = lines[0].replace("G3", "G1")
    with gzip.open(counts_path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.warns(StimputeWarning, match=r"duplicated gene names \(G1\) made unique as NAME-1"):
        section = read_section(folder)
    assert section.genes == ["G0", "G1", "G2", "G1-1", "G4", "G5", "G6", "G7"]
    result = run_cli("info", folder)
    assert result.exit_code == 0 and len(_warnings(result)) == 1, result.output


# -- case 17c: verify refuses a JPEG that holds fewer pixels than its header claims -----------


def test_verify_refuses_a_jpeg_whose_header_claims_more_pixels_than_it_holds(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    jpeg = next(folder.glob("*.jpg"))
    data = bytearray(jpeg.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width of the frame header
    jpeg.write_bytes(bytes(data))
    assert SectionImage.open(jpeg).size == (60000, 60000)
    one_error_line(run_cli("info", folder), "HE_X1.jpg", "claims 60000×60000 px", "truncated, or a false header")
    assert run_cli("info", write_her2st_folder(tmp_path / "X2", name="X2")).exit_code == 0
