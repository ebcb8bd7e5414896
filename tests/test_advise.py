"""`stimpute advise`: count-free quantities, ranking, errors, and the CLI contract."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from typer.testing import CliRunner

from stimpute.advise import (TIE_BREAK, StackDescription, advice_markdown, advise, count_free, decay_line,
                             describe_stack, description_of, distance_prior, facility_values)
from stimpute.cli import app
from stimpute.data import SectionImage, Stack
from stimpute.datasets import synthetic_stack
from stimpute.errors import StimputeError
from stimpute.io import write_section

runner = CliRunner()
PITCH = 100.0
COLUMNS = ["rank", "known", "expected_pcc", "score", "gap", "loss", "loss_low", "loss_high", "tie", "usable_image"]


def small_stack(n: int = 3, seed: int = 0) -> Stack:
    """~60 spots a section: fast to register and describe."""
    return synthetic_stack(n, seed=seed, tissue_radius_um=400, image_size=900)


def grid(n_side: int = 6, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    return np.c_[xs.ravel(), ys.ravel()] * PITCH + np.asarray(shift)


def description(xy: list[np.ndarray], embedding: list[np.ndarray], z=None) -> StackDescription:
    names = [f"S{i}" for i in range(len(xy))]
    z = np.arange(len(xy)) * 10.0 if z is None else np.asarray(z, float)
    return StackDescription(names, z, xy, embedding, PITCH)


def test_quantities_on_a_known_geometry():
    """Coverage counts target spots within one pitch of a known spot; morphology counts target
    spots no farther in feature space than the known spots' typical neighbour distance."""
    rng = np.random.default_rng(0)
    known_features = rng.normal(size=(36, 4))
    far = known_features + 50.0  # a tissue the known section never shows
    d = description([grid(), grid(shift=(40, 0)), grid(shift=(350, 0))],
                    [known_features, known_features.copy(), far], z=[0, 10, 40])
    q = d.quantities((0,)).set_index("section")
    assert q.loc["S1", "coverage"] == 1.0 and q.loc["S1", "morphology"] == 1.0
    assert q.loc["S2", "coverage"] == pytest.approx(0.5)  # 3 of its 6 columns lie over a pitch beyond the known grid
    assert q.loc["S2", "morphology"] == 0.0
    assert q.loc["S1", "z_distance_um"] == 10 and q.loc["S2", "z_distance_um"] == 40
    assert q.loc["S2", "z_distance_pitches"] == pytest.approx(0.4)
    both = d.quantities((0, 2)).set_index("section")  # the nearest known section counts
    assert list(both.index) == ["S1"] and both.loc["S1", "z_distance_um"] == 10


def drifting(n: int, rate: float) -> StackDescription:
    """`n` sections whose pseudo-expression is one smooth pattern in x, y that drifts along z
    (`rate` radians a section): continuity decays evenly with z distance."""
    xy = grid(8)
    phases = np.array([0.0, 2.1, 4.2])
    return description([xy] * n, [np.sin(xy[:, :1] / 150 + xy[:, 1:] / 230 + phases + rate * i) for i in range(n)])


def test_ranking_follows_continuity_along_z():
    """Where the tissue drifts evenly along z, the section nearest to all others (the middle)
    must rank first, and with two of six to measure the only pair that leaves no section two
    away from a known one (S1+S4) must come first; the score averages over the targets only."""
    d = drifting(5, 0.6)
    result = advise(d, 1)
    assert list(result.table.columns) == COLUMNS
    assert result.table["known"].iloc[0] == "S2" and list(result.table["rank"]) == [1, 2, 3, 4, 5]
    assert result.table["score"].is_monotonic_decreasing and result.table["expected_pcc"].isna().all()
    six = drifting(6, 0.6)
    pairs = advise(six, 2).table
    assert len(pairs) == math.comb(6, 2) and pairs["known"].iloc[0] == "S1+S4"
    assert pairs["score"].iloc[0] == pytest.approx(np.mean([six.continuity[1, j] for j in (0, 2)]
                                                           + [six.continuity[4, j] for j in (3, 5)]), abs=1e-4)


def test_distance_prior_and_facility_values():
    """`distance_prior`: the median over pairs as far apart in z, never rising with distance;
    `facility_values`: each target's best known section, NaN for the known ones."""
    pairs = np.array([[np.nan, 0.8, 0.3, 0.5],
                      [0.6, np.nan, 0.7, 0.2],
                      [0.1, 0.9, np.nan, 0.4],
                      [0.5, 0.2, 0.6, np.nan]])
    prior = distance_prior(pairs, np.array([0.0, 10.0, 20.0, 30.0]))
    adjacent = np.median([0.8, 0.6, 0.7, 0.9, 0.4, 0.6])
    assert prior[0, 1] == prior[3, 2] == pytest.approx(adjacent)
    assert prior[0, 2] == pytest.approx(np.median([0.3, 0.1, 0.2, 0.2]))
    assert prior[0, 3] == prior[3, 0] == pytest.approx(0.2)  # their median 0.5, capped at the nearer pairs' 0.2
    values = facility_values(np.nan_to_num(pairs, nan=0.0), [(0, 2)])
    assert np.isnan(values[0, [0, 2]]).all() and values[0, 1] == pytest.approx(0.9) and values[0, 3] == pytest.approx(0.5)


def test_decay_line_is_robust_and_never_rises():
    """`decay_line`: the Theil–Sen line of all pair scores against z distance; a few wild pairs
    do not move it, a rise with distance is flattened to the median, two sections get their median."""
    z = np.arange(6) * 10.0
    apart = np.abs(np.subtract.outer(z, z))
    pairs = 0.8 - 0.004 * apart
    pairs[0, 5], pairs[2, 1], pairs[4, 3] = 0.95, -0.5, 0.0  # three wild pairs of 30
    np.fill_diagonal(pairs, np.nan)
    line = decay_line(pairs, z)
    off = ~np.eye(6, dtype=bool)
    assert np.allclose(line[off], (0.8 - 0.004 * apart)[off]) and np.isnan(np.diag(line)).all()
    rising = 0.2 + 0.01 * apart
    np.fill_diagonal(rising, np.nan)
    assert np.allclose(decay_line(rising, z)[off], np.nanmedian(rising[off]))
    assert np.allclose(decay_line(np.array([[np.nan, 0.3], [0.5, np.nan]]), z[:2])[[0, 1], [1, 0]], 0.4)


def test_pair_rehearsal_decides_among_sets_equal_in_z():
    """Four evenly spaced sections, one to measure: S1 and S2 leave the same z distances to the
    others, so the pair rehearsal decides between them (S2 imputes its neighbours better here);
    the ends stay behind whatever their pairs say."""
    apart = np.abs(np.subtract.outer(np.arange(4), np.arange(4))) * 10.0
    pairs = 0.8 - 0.001 * apart  # continuity decays along z
    pairs[2, [1, 3]] += 0.1  # S2 imputes its neighbours best
    pairs[0, 1:] += 0.15  # an end section with the best pairs of all still leaves a far target
    np.fill_diagonal(pairs, np.nan)
    d = description([grid()] * 4, [np.zeros((36, 2))] * 4)
    d.__dict__["pair_scores"] = pairs  # the cached property, as if rehearsed
    table = advise(d, 1).table
    assert list(table["known"][:2]) == ["S2", "S1"], table
    assert table["gap"].iloc[1] < 10 * TIE_BREAK


def test_beam_search_beyond_the_exhaustive_limit_finds_the_best_sets():
    rng = np.random.default_rng(2)
    n = 6
    d = description([grid(shift=(60 * i, 0)) for i in range(n)], [rng.normal(size=(36, 3)) + i for i in range(n)])
    exhaustive = advise(d, 2)
    beam = advise(d, 2, max_exhaustive=0, beam_width=4)
    assert "beam search" in beam.search and len(beam.table) == 4
    assert beam.table["known"].iloc[0] == exhaustive.table["known"].iloc[0]


@pytest.mark.parametrize("budget", [0, 3, -1])
def test_budget_outside_the_stack_is_an_error(budget):
    d = description([grid(), grid(), grid()], [np.zeros((36, 2))] * 3)
    with pytest.raises(StimputeError, match="--budget: must be between 1 and 2"):
        advise(d, budget)


def test_counts_are_never_read(tmp_path):
    """`stimpute.tl.advise` on sections as scanpy holds them gives the same advice when the
    counts are shuffled and replaced: nothing downstream of `count_free` sees expression."""
    import stimpute.tl
    from stimpute.io.inmemory import section_to_anndata

    stack = small_stack()
    assert all(not s.has_counts and s.n_spots > 0 for s in count_free(stack))
    adatas = [section_to_anndata(s, hires_side=450, counts=True) for s in stack]
    given = [a.copy() for a in adatas]
    first = stimpute.tl.advise(adatas, budget=1, cache_dir=tmp_path)
    assert list(first.columns) == COLUMNS and sorted(first["known"]) == ["S0", "S1", "S2"]
    assert set(first.attrs["details"]) == set(first["known"])
    for a, b in zip(adatas, given):  # the given objects are left as they were
        assert a.obsm.keys() == b.obsm.keys() and a.uns.keys() == b.uns.keys()
    rng = np.random.default_rng(3)
    for a in adatas:
        a.X = sparse.csr_matrix(rng.poisson(5.0, size=a.shape).astype(np.float32))
    second = stimpute.tl.advise(adatas, budget=1, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first, second)
    for label, frame in first.attrs["details"].items():
        pd.testing.assert_frame_equal(frame, second.attrs["details"][label])
    with pytest.raises(StimputeError, match="--budget"):
        stimpute.tl.advise(adatas, budget=3)


def test_sections_that_do_not_register_name_the_pair_and_the_figure(tmp_path):
    """A section whose tissue is a small scrap of the block (Dice far below 0.5)."""
    stack = small_stack(2)
    scrap = stack[1]
    pixels = np.full((*scrap.image.size[::-1], 3), 255, np.uint8)
    x, y = scrap.xy.mean(axis=0).astype(int) - 75
    pixels[y:y + 150, x:x + 150] = scrap.image.read_region(x, y, 150, 150)
    scrap.image = SectionImage(array=pixels)
    with pytest.raises(StimputeError, match=r"sections S1 and S0 do not register: tissue overlap Dice 0\.\d\d < 0\.5") as err:
        describe_stack(stack, qc_dir=tmp_path / "figures")
    assert "overlay_S0_S1.png" in str(err.value) and (tmp_path / "figures" / "overlay_S0_S1.png").is_file()


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory) -> list[str]:
    """`small_stack()` written as section folders once for the command-line tests."""
    root = tmp_path_factory.mktemp("in")
    return [str(write_section(s, root)) for s in small_stack()]


def test_cli_writes_the_ranked_advice(small_folders, tmp_path):
    out = tmp_path / "advice"
    result = runner.invoke(app, ["advise", *small_folders, "--budget", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "advice.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["rank"]) == [1, 2, 3] and table["score"].is_monotonic_decreasing
    assert set(table["known"]) == {"S0+S1", "S0+S2", "S1+S2"}
    text = (out / "advice.md").read_text()
    assert "coverage" in text and "morphology" in text and "advice.png" in text and table["known"][0] in text
    tied = table.loc[table["tie"], "known"].tolist()
    assert tied[0] == table["known"][0]  # the top is always in its own tie
    assert (f"These {len(tied)} are a tie" in text) if len(tied) > 1 else ("clearly ahead" in text)
    assert "expected_pcc` is left empty" in text and "relative" in text
    assert (out / "advice.png").stat().st_size > 0 and any((out / "cache").iterdir())
    again = runner.invoke(app, ["advise", *small_folders, "--budget", "2", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize("budget,n_sections,message", [(3, 3, "--budget: must be between 1 and 2"),
                                                       (0, 3, "--budget: must be between 1 and 2"),
                                                       (1, 1, "at least two sections")])
def test_cli_errors_before_any_work(small_folders, tmp_path, budget, n_sections, message):
    out = tmp_path / "advice"
    result = runner.invoke(app, ["advise", *small_folders[:n_sections], "--budget", str(budget), "--out", str(out)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


@pytest.mark.her2st
def test_advice_on_her2st_claims_no_winner_where_there_is_none(her2st_stack, her2st_features, tmp_path):
    """On C2/C3/C4 the three single sections impute within 0.006 mean per-gene PCC of each
    other under ASIGN (benchmarks/README.md, advisor section): the advisor, fitted on none of
    it, must rank all three and call them a tie, not name a winner."""
    import shutil

    out = tmp_path / "advice"
    shutil.copytree(her2st_features, out / "cache")  # the session's features of these sections (OUT/cache is advise's)
    result = runner.invoke(app, ["advise", *map(str, her2st_stack), "--budget", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "advice.csv")
    assert sorted(table["known"]) == ["C2", "C3", "C4"] and table["tie"].all(), table
    assert "These 3 are a tie" in (out / "advice.md").read_text()


def test_cli_on_hne_images_alone(tmp_path):
    """No ST anywhere: image files get a Visium grid of virtual spots (with a warning)."""
    from PIL import Image

    images = []
    for s in small_stack():
        W, H = s.image.size
        images.append(tmp_path / f"{s.name}.png")
        Image.fromarray(s.image.read_region(0, 0, W, H)).save(images[-1])
    out = tmp_path / "advice"
    result = runner.invoke(app, ["advise", *map(str, images), "--budget", "1", "--um-per-px", "2.0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Visium" in result.output  # the default grid is announced
    table = pd.read_csv(out / "advice.csv")
    assert sorted(table["known"]) == ["S0", "S1", "S2"] and table["score"].is_monotonic_decreasing
    assert "spot pitch 100 µm" in (out / "advice.md").read_text()


def truly_registered(stack: Stack) -> StackDescription:
    """The advisor's description with the generator's true registration (no registration
    error in the way) and the default (handcrafted) features."""
    from stimpute.datasets import synthetic_registration
    from stimpute.features.stored import stack_features

    features, _ = stack_features(count_free(stack), None)
    return description_of(stack, synthetic_registration(stack), features)


def test_the_only_whole_section_is_advised_by_design():
    """Every section but S2 lost a different third of its tissue, so S2 is the only section
    that has measured neighbours for every part of every other section (a structure each
    of them shows is missing from some other section, never from S2): with one section to
    measure, S2 must come first. Nothing in the score is fitted to any stack. (The calibrated
    interval is too wide to call it clear of a tie: benchmarks/README.md.)"""
    torn = {0: (0.0, 0.3), 1: (90.0, 0.3), 3: (180.0, 0.3), 4: (270.0, 0.3)}
    stack = synthetic_stack(5, seed=11, tissue_radius_um=450, image_size=1000, missing=torn)
    table = advise(truly_registered(stack), 1).table
    assert table["known"].iloc[0] == "S2", table
    assert table["gap"].iloc[1] > 0 and table["tie"].iloc[0], table


def test_a_ruined_image_is_never_the_one_section_to_measure():
    """The middle of five evenly drifting sections ranks first on z (`test_ranking_follows_continuity_along_z`);
    with its image ruined (its spots' features resemble no other section's) it must rank last
    with one section to measure, its loss not estimated and no tie claimed, while with two it
    may still be measured beside a section whose image is usable."""
    d = drifting(5, 0.6)
    d.embedding[2] = np.random.default_rng(0).normal(size=d.embedding[2].shape) + 50.0
    d = description(d.xy_um, d.embedding)
    assert list(d.usable) == [True, True, False, True, True], d.image_coverage
    result = advise(d, 1)
    table = result.table
    assert table["known"].iloc[0] in ("S1", "S3") and table["known"].iloc[-1] == "S2", table
    text = advice_markdown(result, "advice.png")
    assert "Ruined image: S2" in text and "| S2 | " in text and "not estimated: no usable image" in text
    last = table.iloc[-1]
    assert not last["usable_image"] and not last["tie"] and last[["loss", "loss_low", "loss_high"]].isna().all()
    assert table["usable_image"].iloc[:-1].all() and table["loss"].iloc[:-1].notna().all()
    assert advise(d, 2).table["usable_image"].all()


def test_a_ruined_image_in_a_synthetic_stack_is_set_apart():
    """`synthetic_stack(damaged=...)` smears a section's image: the advisor (true registration,
    handcrafted features) must find exactly that section unusable and not advise it alone."""
    stack = synthetic_stack(5, seed=3, tissue_radius_um=400, image_size=900, damaged=[2])
    d = truly_registered(stack)
    assert list(d.usable) == [True, True, False, True, True], d.image_coverage
    assert advise(d, 1).table["known"].iloc[0] != "S2"
