"""Shared fixtures: synthetic stacks and impute runs made once per test run, and the shared HER2-ST data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from stimpute.datasets import synthetic_stack

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
HER2ST_STACK = ("C2", "C3", "C4")
# The modules that cost the most, heaviest first: seconds of setup + call over their slowest
# tests in a full run at ea03124 (loaded machine, /tmp/lead_dur.txt of issue 28), >= 40 s.
HEAVY_FIRST = ("test_reliability", "test_advise", "test_encoders", "test_tl", "test_asign_model", "test_notebook",
               "test_impute", "test_view", "test_stored_features", "test_features", "test_first_use", "test_distributed",
               "test_efficientnet", "test_datasets", "test_feature_runs", "test_outputs", "test_grid", "test_register")


def pytest_collection_modifyitems(items):
    """Run the heaviest modules first. `--dist loadscope` hands modules out in collection order,
    so a heavy module collected late started last on one worker while the other sat idle."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(HEAVY_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def her2st_root() -> Path:
    """The shared HER2-ST folder (../shared/data/her2st); tests skip when it is absent."""
    if not (HER2ST / "C3").is_dir():
        pytest.skip(f"shared HER2-ST data not found at {HER2ST} (integration test needs ../shared)")
    return HER2ST


@pytest.fixture(scope="session")
def her2st_stack(her2st_root) -> list[Path]:
    """The folders of C2, C3 and C4, in stack order."""
    return [her2st_root / name for name in HER2ST_STACK]


def _once_per_run(tmp_path_factory, name: str, fill) -> Path:
    """The folder `name` of this test run, filled by `fill(folder)` once: pytest-xdist workers
    share it, the first fills it under a lock, the others wait for it. Treat it as read-only."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above every worker's own
    folder, filled = root / name, root / f"{name}.filled"
    with FileLock(f"{folder}.lock"):
        if not filled.is_file():
            fill(folder)
            filled.touch()
    return folder


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A 3-section synthetic stack (seed 0), built once per test run and handed to every
    pytest-xdist worker as a pickle; treat as read-only."""
    def fill(folder: Path) -> None:
        folder.mkdir()
        (folder / "stack.pkl").write_bytes(pickle.dumps(synthetic_stack(3, seed=0)))

    return pickle.loads((_once_per_run(tmp_path_factory, "synthetic", fill) / "stack.pkl").read_bytes())


@pytest.fixture(scope="session")
def her2st_features(her2st_stack, tmp_path_factory) -> Path:
    """A feature cache of C2, C3 and C4 (handcrafted, the default), filled once per test run
    by `stimpute features`, so it is a cache stimpute owns: the tests that prepare these
    sections (impute's accuracy guard, advise) start from a copy and compute no features."""
    from tests.helpers import run_cli

    def fill(cache: Path) -> None:
        result = run_cli("features", *her2st_stack, "--out", cache)
        assert result.exit_code == 0, result.output

    return _once_per_run(tmp_path_factory, "her2st_features", fill)


@pytest.fixture(scope="session")
def image_section_impute(tmp_path_factory) -> Path:
    """The output folder of one `stimpute impute` per test run (its outputs and its 3D view are
    tested in two modules): `synthetic_stack(**IMAGE_SECTION_STACK)` with S0 measured (known),
    S1 handed over as an H&E image alone (`he_1.png`, 2 µm/px) and S2 a measured target;
    every figure. Read-only: a test that changes it works on a copy."""
    from PIL import Image

    from stimpute.io import write_section
    from tests.helpers import IMAGE_SECTION_STACK, run_cli

    def fill(root: Path) -> None:
        stack = synthetic_stack(**IMAGE_SECTION_STACK)
        he = stack[1].image
        root.mkdir()
        Image.fromarray(he.read_region(0, 0, *he.size)).save(root / "he_1.png")
        inputs = [write_section(stack[0], root / "in"), root / "he_1.png", write_section(stack[2], root / "in")]
        result = run_cli("impute", *inputs, "--known", "S0", "--out", root / "out", "--um-per-px", "2", "--epochs", "5", "--figures", "all")
        assert result.exit_code == 0, result.output

    return _once_per_run(tmp_path_factory, "image_section_impute", fill) / "out"
