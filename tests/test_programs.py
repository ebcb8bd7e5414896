"""Gene programs: the low-rank projection of predictions and its cross-validated rank."""

import numpy as np
import pytest

from stimpute.models.asign.programs import choose_rank, fit_programs, resolve_programs
from tests.test_impute import _grid, _Stub


def _low_rank_section(seed=0, n_side=12, n_genes=40, rank=2, noise=1.0):
    """A known section whose expression is `rank` programs driven by its features, plus noise."""
    rng = np.random.default_rng(seed)
    n = n_side * n_side
    features = rng.normal(size=(n, 3, 4))
    signal = np.tanh(features.reshape(n, -1)[:, :rank]) @ rng.normal(size=(rank, n_genes)) * 2
    expression = signal + noise * rng.normal(size=(n, n_genes))
    return _Stub([_grid(n_side, 0)], [0.0], [features], [expression]), signal


def test_projection_keeps_the_programs_and_is_idempotent():
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(3, 20))
    data = rng.normal(size=(50, 3)) @ basis + 5.0
    programs = fit_programs(data, 3)
    assert programs.rank == 3
    assert np.allclose(programs.project(data), data)  # rank-3 data lie in their own 3 programs
    other = rng.normal(size=(7, 20))
    once = programs.project(other)
    assert np.allclose(programs.project(once), once)
    assert fit_programs(data).full and np.allclose(fit_programs(data).project(other), other)  # no projection


def test_cross_validated_rank_finds_few_programs_in_noisy_low_rank_expression():
    from stimpute.models import load_methods

    load_methods()
    prepared, signal = _low_rank_section()
    programs = choose_rank(prepared, [0], seed=0)
    assert 1 <= programs.rank <= 5
    assert programs.scores[programs.rank] > programs.scores[len(programs.axes)] + 0.02  # beats no projection
    denoised = programs.project(prepared.expression[0])
    assert np.abs(denoised - signal).mean() < np.abs(prepared.expression[0] - signal).mean()


def test_resolve_programs_takes_auto_none_or_a_rank():
    prepared, _ = _low_rank_section(n_side=6)
    assert resolve_programs(prepared, [0], "none").full  # 36 spots, 40 genes: still no projection
    assert resolve_programs(prepared, [0], 4).rank == 4
    with pytest.raises(ValueError, match="rank"):
        resolve_programs(prepared, [0], 0)


def test_impute_refuses_a_bad_programs_option_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from stimpute.cli import app

    result = CliRunner().invoke(app, ["impute", str(tmp_path / "a"), str(tmp_path / "b"), "--known", "a",
                                      "--out", str(tmp_path / "out"), "--programs", "few"])
    assert result.exit_code != 0 and "--programs" in result.output and "Traceback" not in result.output
