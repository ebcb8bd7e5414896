"""Implausible data is flagged with one line (error, or warning where a user may mean it),
and malformed input is one error line, never a traceback (issue 18, sections 4-6)."""

from __future__ import annotations

import gzip
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stimpute import Section, SectionImage, StimputeError
from stimpute.errors import StimputeWarning
from stimpute.io import read_her2st, write_h5ad_atomic
from stimpute.io.validate import validate_section
from stimpute.register.masks import View
from tests.helpers import one_error_line, run_cli, write_her2st_folder

_run, _one_error_line = run_cli, one_error_line


def _lines(result):
    return [ln for ln in result.output.splitlines() if ln.strip()]


def _section(X, xy=None, size=64, name="s", spot_um=2.0):
    adata = ad.AnnData(X=np.asarray(X, np.float32))
    adata.obs_names = [f"p{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"G{i}" for i in range(adata.n_vars)]
    adata.obsm["spatial"] = np.full((adata.n_obs, 2), 10.0) if xy is None else np.asarray(xy, float)
    image = SectionImage(array=np.full((size, size, 3), 255, np.uint8))
    return Section(name, adata, image, um_per_px=1.0, spot_diameter_um=spot_um, source=f"{name}.h5ad")


# -- section 4: plausibility ------------------------------------------------------------


@pytest.mark.parametrize("value,needle", [(np.inf, "1 infinite value"), (1e12, r"above 1e\+09")])
def test_absurd_counts_are_an_error(value, needle):
    with pytest.raises(StimputeError, match=needle):
        validate_section(_section([[1, 2], [3, value]]))


def test_a_count_of_1e40_in_a_her2st_table_is_one_line(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    counts = pd.read_csv(folder / "X1.tsv.gz", sep="\t", index_col=0).astype(float)
    counts.iloc[0, 0] = 1e40
    with gzip.open(folder / "X1.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    _one_error_line(_run("info", folder), "X1", "infinite value")


def test_swapped_array_columns_are_flagged(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1", n_side=6)
    selection = pd.read_csv(folder / "X1_selection.tsv", sep="\t")
    selection = selection.rename(columns={"x": "y", "y": "x"})
    selection.to_csv(folder / "X1_selection.tsv", sep="\t", index=False)
    with pytest.warns(StimputeWarning, match="columns x and y swapped"):
        read_her2st(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StimputeWarning)
        read_her2st(write_her2st_folder(tmp_path / "X2"))  # the usual layout: no warning


def test_spots_on_glass_and_a_poor_registration_are_flagged():
    from stimpute.register import _warn_off_tissue, _warn_poor_overlap

    mask = np.zeros((100, 100), bool)
    mask[:60] = True  # tissue is the top 60 % of the slide
    view = View(np.zeros((100, 100, 3), np.uint8), mask, np.zeros((100, 100), np.float32), 1.0, 1.0)
    rng = np.random.default_rng(0)
    xy = np.c_[rng.uniform(0, 99, 200), rng.uniform(5, 55, 200)]
    good, swapped, elsewhere = _section(np.ones((200, 1)), xy), _section(np.ones((200, 1)), xy[:, ::-1]), _section(np.ones((200, 1)), np.c_[xy[:, 0] * 0.35 + 60, xy[:, 1] * 0.6 + 62])
    pairs = pd.DataFrame({"fixed": ["S0"], "moving": ["S1"], "dice_after": [0.35]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for section in (good, swapped, elsewhere):
            _warn_off_tissue(section, view)
        _warn_poor_overlap(pairs)
    lines = [str(w.message) for w in caught if issubclass(w.category, StimputeWarning)]
    assert len(lines) == 3, lines
    assert "pixel columns swapped" in lines[0] and "another image" in lines[1]
    assert "S1 onto S0" in lines[2] and "Dice 0.35" in lines[2] and "overlay_S0_S1.png" in lines[2]


def test_few_known_spots_and_panel_genes_missing_from_a_target_are_warned():
    from stimpute.data import Stack
    from stimpute.prepare import _warn_implausible

    known, target = _section(np.ones((3, 4)), name="K"), _section(np.ones((50, 2)), name="T")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_implausible(Stack([known, target]), [0], ["G0", "G1", "G2", "G3"])
    lines = [str(w.message) for w in caught if issubclass(w.category, StimputeWarning)]
    assert len(lines) == 2, lines
    assert "only 3 measured spot(s) in K" in lines[0]
    assert "2 of 4 panel genes are not measured here" in lines[1] and "left out of the metrics" in lines[1]


@pytest.mark.parametrize("n_top", [0, -5])
def test_panel_n_top_below_one_is_an_error(tmp_path, n_top):
    folder = write_her2st_folder(tmp_path / "X1")
    _one_error_line(_run("panel", folder, "--n-top", n_top), "--n-top", "at least 1")


# -- section 5: one line instead of a traceback -------------------------------------------


@pytest.mark.parametrize("cell", ["abc", ""])
def test_text_or_missing_selection_coordinates_are_one_line(tmp_path, cell):
    folder = write_her2st_folder(tmp_path / "X1")
    selection = pd.read_csv(folder / "X1_selection.tsv", sep="\t").astype(object)
    selection.loc[3, "pixel_x"] = cell
    selection.to_csv(folder / "X1_selection.tsv", sep="\t", index=False)
    _one_error_line(_run("info", folder), "X1_selection.tsv", "column pixel_x")


def _h5ad_with_image(folder, genes):
    folder.mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(X=np.random.default_rng(0).poisson(3, (6, len(genes))).astype(np.float32) + 1)
    adata.var_names = genes
    adata.obs_names = [f"s{i}" for i in range(6)]
    adata.obsm["spatial"] = np.c_[np.arange(6) * 10 + 10, np.full(6, 20)].astype(float)
    adata.uns["stimpute"] = {"um_per_px": 1.0, "spot_diameter_um": 5.0}
    write_h5ad_atomic(adata, folder / "A.h5ad", force=True)
    Image.fromarray(np.full((80, 80, 3), 200, np.uint8)).save(folder / "A.png")
    return folder / "A.h5ad"


def test_duplicated_gene_names_in_an_h5ad_are_made_unique_with_one_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning while the test writes the file
        h5ad = _h5ad_with_image(tmp_path / "in", ["G0", "G1", "G0"])
    result = _run("convert", "h5ad", h5ad, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [ln for ln in _lines(result) if ln.startswith("warning:")] == [
        f"warning: {h5ad}: duplicated gene names (G0) made unique as NAME-1, NAME-2, ..."]
    assert _run("info", tmp_path / "out" / "A").exit_code == 0
    assert list(ad.read_h5ad(tmp_path / "out" / "A" / "section.h5ad").var_names) == ["G0", "G1", "G0-1"]


def test_binary_gene_file_is_one_line_and_a_bom_is_stripped(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    genes = tmp_path / "genes.txt"
    genes.write_bytes(bytes(range(256)))
    _one_error_line(_run("panel", folder, "--genes", genes), "genes.txt", "not a text file")
    genes.write_bytes("\ufeffG1\nG2\n".encode())
    result = _run("panel", folder, "--genes", genes)
    assert result.exit_code == 0 and "2 genes: G1, G2" in result.output, result.output


def test_unwritable_panel_out_is_one_line(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    (tmp_path / "adir").mkdir()
    _one_error_line(_run("panel", folder, "--n-top", 2, "--out", tmp_path / "adir"), "adir", "cannot write")


# -- section 6 ---------------------------------------------------------------------------


def test_messages_name_options_that_exist(tmp_path):
    h5ad = _h5ad_with_image(tmp_path / "in", ["G0", "G1"])
    (tmp_path / "in" / "A.png").unlink()
    _one_error_line(_run("info", h5ad), "no image found", "stimpute convert h5ad FILE OUT --image PATH")
    _one_error_line(_run("panel", write_her2st_folder(tmp_path / "X1"), "--rule", "foo"), "--rule", "hvg or mean")


def test_version():
    from stimpute import __version__

    result = _run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"stimpute {__version__}"


def test_training_prints_no_progress_lines_or_checkpoint_notes_off_a_terminal(tmp_path, capfd):
    from stimpute.models.msagnet import MSAGNetConfig
    from stimpute.models.msagnet_training import TrainConfig, fit
    from tests.test_impute import _tiny_batch

    config = TrainConfig(max_epochs=3, seed=0, model=MSAGNetConfig(width=16, heads=2, transformer_layers=1))
    fit(_tiny_batch(), config, ckpt_dir=tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert "Epoch" not in out + err and "weights_only" not in out + err, out + err


# -- fuzz: readers and options never end in a traceback ------------------------------------

cells = st.one_of(st.integers(-5, 400).map(str), st.sampled_from(["", "nan", "abc", "1e40", "inf", "-1", "3.5", "1"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_fuzzed_her2st_folders_gene_files_and_options_give_a_result_or_one_line_per_problem(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz")
    folder = write_her2st_folder(root / "X1", n_side=5, seed=data.draw(st.integers(0, 3)))
    selection = pd.read_csv(folder / "X1_selection.tsv", sep="\t").astype(object)
    for _ in range(data.draw(st.integers(0, 3))):
        row, col = data.draw(st.integers(0, len(selection) - 1)), data.draw(st.sampled_from(list(selection.columns)))
        selection.loc[row, col] = data.draw(cells)
    selection.to_csv(folder / "X1_selection.tsv", sep="\t", index=False)
    counts = pd.read_csv(folder / "X1.tsv.gz", sep="\t", index_col=0).astype(object)
    for _ in range(data.draw(st.integers(0, 2))):
        counts.iloc[data.draw(st.integers(0, len(counts) - 1)), data.draw(st.integers(0, counts.shape[1] - 1))] = data.draw(cells)
    with gzip.open(folder / "X1.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    args = ["panel", folder, "--n-top", data.draw(st.integers(-2, 12)), "--rule", data.draw(st.sampled_from(["hvg", "mean", "x"]))]
    if data.draw(st.booleans()):
        genes = root / "genes.txt"
        genes.write_bytes(data.draw(st.binary(max_size=40) | st.sampled_from([b"G1\nG2\n", b"\xef\xbb\xbfG3\n", b"G1\r\nNOPE\n"])))
        args += ["--genes", genes]
    result = _run(*args)
    assert result.exit_code in (0, 2), (result.output, result.exception)
    lines = _lines(result)
    if result.exit_code == 2:
        assert lines and all(ln.startswith(("error:", "warning:")) for ln in lines), result.output
    else:
        assert all(ln.startswith("warning:") for ln in lines[:-1]) and "genes:" in lines[-1], result.output
