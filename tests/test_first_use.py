"""What a new user hits first (issue 27): H&E images on every command that takes them,
no-spot training refused, a demo that runs twice, output to a file never cut, accuracy
printed by predict and cross-validation, and the smaller inconsistencies. Each test here
failed on 9be9671."""

from __future__ import annotations

import gzip
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stimpute.datasets import synthetic_stack
from stimpute.io import write_h5ad_atomic, write_section
from tests.helpers import one_error_line, run_cli, write_her2st_folder

UM_PER_PX = 2.0  # synthetic_stack's scale


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two small synthetic sections (S0, S1, both measured) as section folders, and S1's
    image alone as he/S1.png (no scale in its metadata)."""
    root = tmp_path_factory.mktemp("first_use")
    stack = synthetic_stack(2, seed=4, n_genes=20, tissue_radius_um=300.0, image_size=700)
    paths = [write_section(s, root / "in") for s in stack]
    (root / "he").mkdir()
    Image.fromarray(stack[1].image.read_region(0, 0, 700, 700)).save(root / "he" / "S1.png")
    return paths, root / "he" / "S1.png"


@pytest.fixture(scope="module")
def model(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model"
    result = run_cli("train", folders[0][0], "--out", out, "--epochs", 3)
    assert result.exit_code == 0, result.output
    return out


def test_register_takes_um_per_px_and_lays_virtual_spots_on_an_he_image(folders, tmp_path):
    (s0, _), he = folders
    result = run_cli("register", s0, he, "--um-per-px", UM_PER_PX, "--pitch-um", 100, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    spots = pd.read_csv(tmp_path / "r" / "spots.csv")
    assert (spots.section == "S1").sum() > 10 and "S1 " in result.output


def test_predict_takes_um_per_px_on_an_he_image_and_scores_measured_sections(folders, model, tmp_path):
    (_, s1), he = folders
    result = run_cli("predict", he, "--model", model, "--out", tmp_path / "p", "--um-per-px", UM_PER_PX,
                     "--spot-diameter-um", 55)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # the grid is the training sections': 55 µm spots, 100 µm apart
    predicted = ad.read_h5ad(tmp_path / "p" / "S1.h5ad")
    assert predicted.n_obs > 10 and predicted.uns["stimpute"]["spot_diameter_um"] == 55
    assert not (tmp_path / "p" / "metrics.csv").exists() and "no metrics" in result.output
    scored = run_cli("predict", s1, "--model", model, "--out", tmp_path / "q")
    assert scored.exit_code == 0, scored.output
    metrics = pd.read_csv(tmp_path / "q" / "metrics.csv")
    assert list(metrics.columns) == ["section", "gene", "pcc", "mse", "mae"] and set(metrics.section) == {"S1"}
    assert "prediction accuracy" in scored.output and f"{metrics.pcc.mean():.3f}" in scored.output


@pytest.mark.parametrize("command", ["train", "features", "panel"])
def test_commands_that_need_measured_spots_refuse_an_he_image_in_one_line(folders, tmp_path, command):
    (s0, _), he = folders
    out = ["--out", tmp_path / "t"] if command != "panel" else []
    one_error_line(run_cli(command, he, s0, *out), "S1.png", "no measured spots", f"`stimpute {command}`")
    assert not list((tmp_path / "t").rglob("*.ckpt")) and not (tmp_path / "t" / "config.yaml").exists()


def test_train_cv_prints_its_table(folders, tmp_path):
    result = run_cli("train", *folders[0], "--out", tmp_path / "cv", "--mode", "cv", "--epochs", 2)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "cv" / "cv_metrics.csv")
    assert "cross-validation by section" in result.output
    for section, part in rows.groupby("section"):
        assert re.search(rf"│ \d+ +│ {section} +│ {part.pcc.mean():.3f}", result.output), result.output
    assert re.search(rf"│ +│ all +│ {rows.pcc.mean():.3f}", result.output), result.output


def test_demo_runs_twice_into_its_own_folder(folders, tmp_path, monkeypatch):
    """The demo on a small stand-in for the mini stack (C2, C3, C4), run twice; `impute`
    results of the user's are still refused without --force."""
    import stimpute.datasets
    import stimpute.pipeline
    from stimpute.files import write_text_atomic
    from stimpute.models.msagnet import TrainConfig
    from stimpute.files import run_ownership

    stand_in = tmp_path / "mini"
    for name, s in zip(("C2", "C3", "C4"), synthetic_stack(3, seed=4, n_genes=20, tissue_radius_um=300.0, image_size=500)):
        s.name = name
        write_section(s, stand_in)
    monkeypatch.setattr(stimpute.datasets, "her2st_mini_path", lambda: stand_in)
    run_impute = stimpute.pipeline.run_impute  # the demo's run, trained 3 epochs: the folder is what is tested here
    monkeypatch.setattr(stimpute.pipeline, "run_impute",
                        lambda *args, **kwargs: run_impute(*args, **kwargs, config=TrainConfig(seed=kwargs["seed"], max_epochs=3)))
    out = tmp_path / "stimpute-demo"
    first = run_cli("demo", "--out", out)
    assert first.exit_code == 0, first.output
    again = run_cli("demo", "--out", out)
    assert again.exit_code == 0, again.output
    assert "imputation accuracy" in again.output and (out / "C2.h5ad").is_file()
    mine = tmp_path / "mine"
    with run_ownership(mine, "impute") as run:  # the user's own imputation there
        run.claim(["C2.h5ad"])
        write_text_atomic(mine / "C2.h5ad", "imputed by the user")  # a run records each file it writes
    refused = run_cli("demo", "--out", mine)
    assert refused.exit_code == 2 and "error:" in refused.output and "already holds results" in refused.output


def test_output_to_a_file_keeps_tables_and_paths_whole(tmp_path, monkeypatch):
    """CliRunner's output is not a terminal, as a file or pipe is: rich would lay it out in
    80 columns, or $COLUMNS."""
    monkeypatch.setenv("COLUMNS", "80")
    name = "HER2_patient_A_section_C3_serial_block_2024"
    folder = write_her2st_folder(tmp_path / "a_rather_long_folder_name_from_the_lab" / "raw" / name, name=name)
    out = tmp_path / "another_long_output_folder_name_for_the_converted_sections"
    info = run_cli("info", folder)
    assert info.exit_code == 0 and "…" not in info.output
    row = next(line for line in info.output.splitlines() if name in line)
    assert [c.strip() for c in row.strip("│ ").split("│")][:3] == [name, "35", "1 (+1 counts rows)"]
    converted = run_cli("convert", "her2st", folder, out)
    assert converted.exit_code == 0 and str(out / name) in converted.output.replace("\n", "⏎")


def test_bar_and_summary_give_one_patches_per_second(folders, tmp_path, monkeypatch):
    """Setup before the first patch (here a slow cache key) counts in neither rate."""
    import time

    from stimpute.features import cache

    key = cache.feature_key
    monkeypatch.setattr(cache, "feature_key", lambda *a, **k: (time.sleep(1.0), key(*a, **k))[1])
    result = run_cli("features", folders[0][0], "--out", tmp_path / "f")
    assert result.exit_code == 0, result.output
    bar = float(re.search(r"━ \d+/\d+ ([\d.]+) patches/s", result.output).group(1))
    summary = float(re.search(r"computed \(([\d.]+) patches/s\)", result.output).group(1))
    assert summary == pytest.approx(bar, rel=0.15), result.output


def test_info_counts_spots_dropped_for_zero_counts(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1", extra_counts_rows=0)
    counts_file = folder / "X1.tsv.gz"
    counts = pd.read_csv(counts_file, sep="\t", index_col=0)
    counts.iloc[0] = 0  # one spot without any count: dropped with a warning
    with gzip.open(counts_file, "wt") as fh:
        counts.to_csv(fh, sep="\t")
    result = run_cli("info", folder)
    assert result.exit_code == 0 and "dropped 1 spot(s) with zero counts" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("│ X1"))
    assert [c.strip() for c in row.strip("│ ").split("│")][1:3] == ["34", "2"]  # 1 without a counts row + 1 empty


def test_convert_h5ad_takes_the_spot_diameter(tmp_path):
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=rng.poisson(3, (20, 5)).astype(np.float32))
    adata.obsm["spatial"] = rng.uniform(20, 180, (20, 2))
    adata.uns["stimpute"] = {"um_per_px": 1.0}
    write_h5ad_atomic(adata, tmp_path / "s.h5ad", force=True)
    Image.fromarray(np.full((200, 200, 3), 200, np.uint8)).save(tmp_path / "s.png")
    result = run_cli("convert", "h5ad", tmp_path / "s.h5ad", tmp_path / "out", "--spot-diameter-um", 100)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    section = ad.read_h5ad(tmp_path / "out" / "s" / "section.h5ad")
    assert section.uns["stimpute"]["spot_diameter_um"] == 100
    one_error_line(run_cli("convert", "h5ad", tmp_path / "s.h5ad", tmp_path / "o2", "--spot-diameter-um", -1),
                   "--spot-diameter-um", "positive")


def test_impute_help_says_known_takes_several_sections():
    text = " ".join(run_cli("impute", "--help").output.split())
    assert "from one measured section" not in text and "measured (--known) sections" in text
