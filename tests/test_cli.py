"""The command line: each bad input gives one error line naming the file, exit code 2."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from stimpute.io import write_h5ad_atomic
from tests.helpers import one_error_line, run_cli, write_her2st_folder

_run, _one_error_line = run_cli, one_error_line


def test_help_lists_commands_with_examples():
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("info", "convert", "panel", "demo"):
        assert command in result.output
    assert "Example" in _run("info", "--help").output


def test_flags_show_no_value_type_in_help():
    """`--force/--no-force` takes no value, so --help shows none (typer printed `<bool>`)."""
    lines = [line for line in _run("impute", "--help").output.splitlines() if "--force" in line]
    assert lines and not any("<bool>" in line for line in lines)


def test_info_and_convert_on_a_raw_folder(tmp_path):
    folder = write_her2st_folder(tmp_path / "raw" / "X1")
    result = _run("info", folder)
    assert result.exit_code == 0 and "X1" in result.output and "35" in result.output
    result = _run("convert", "her2st", tmp_path / "raw", tmp_path / "out")
    assert result.exit_code == 0 and (tmp_path / "out" / "X1" / "section.h5ad").is_file()
    again = _run("convert", "her2st", folder, tmp_path / "out")
    _one_error_line(again, "section.h5ad", "already holds results", "--force")
    assert _run("info", tmp_path / "out" / "X1").exit_code == 0


def test_missing_file(tmp_path):
    _one_error_line(_run("info", tmp_path / "nothere"), "nothere", "not found")


def test_counts_with_foreign_spot_ids(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1", missing_counts_rows=30, extra_counts_rows=30)
    _one_error_line(_run("info", folder), "X1.tsv.gz", "spot ids do not match")


def test_truncated_jpeg(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    jpg = next(folder.glob("*.jpg"))
    jpg.write_bytes(jpg.read_bytes()[:2000])
    _one_error_line(_run("info", folder), "HE_X1.jpg", "cannot decode image")


def test_empty_gene_list(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    genes = tmp_path / "genes.txt"
    genes.write_text("\n")
    _one_error_line(_run("panel", folder, "--genes", genes), "genes.txt", "gene list is empty")
    genes.write_text("G1\nNOPE\n")
    _one_error_line(_run("panel", folder, "--genes", genes), "genes.txt", "NOPE")


def test_h5ad_without_spatial(tmp_path):
    write_h5ad_atomic(ad.AnnData(X=np.ones((3, 2), np.float32)), tmp_path / "s.h5ad", force=True)
    _one_error_line(_run("info", tmp_path / "s.h5ad"), "s.h5ad", 'obsm["spatial"]')


def test_panel_writes_the_gene_list(tmp_path):
    folder = write_her2st_folder(tmp_path / "X1")
    result = _run("panel", folder, "--n-top", 3, "--out", tmp_path / "panel.txt")
    assert result.exit_code == 0
    assert len((tmp_path / "panel.txt").read_text().split()) == 3


@pytest.mark.her2st
def test_info_on_shared_her2st(her2st_root):
    result = _run("info", *(her2st_root / n for n in ("C2", "C3", "C4")))
    assert result.exit_code == 0
    for row in ("C2", "C3", "C4", "15821", "9270×9936"):
        assert row in result.output


def test_demo_runs_impute_on_the_mini_stack_and_never_overwrites(tmp_path):
    """The demo is `stimpute impute` on HER2-ST mini (minutes; run end to end in test_impute on
    synthetic data): here its wiring and the refusal to overwrite earlier results."""
    assert "impute" in _run("demo", "--help").output
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "C2.h5ad").write_text("earlier result")
    result = _run("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "demo" / "C2.h5ad").read_text() == "earlier result"

@pytest.mark.parametrize(
    "names,known,message",
    [(("C2", "C3"), "C9", "section 'C9' is not in the stack (sections: C2, C3)"), (("C2",), "C2", "nothing to impute")],
)
def test_impute_rejects_a_bad_stack_before_any_work(tmp_path, names, known, message):
    from stimpute.datasets import her2st_mini_path

    out = tmp_path / "out"
    result = _run("impute", *(her2st_mini_path() / n for n in names), "--known", known, "--out", out)
    _one_error_line(result, message)
    assert not out.exists()
