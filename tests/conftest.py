"""Shared fixtures: synthetic stacks made once per session, and the shared HER2-ST data."""

from __future__ import annotations

from pathlib import Path

import pytest

from stimpute.datasets import synthetic_stack

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session")
def her2st_root() -> Path:
    """The shared HER2-ST folder (../shared/data/her2st); tests skip when it is absent."""
    if not (HER2ST / "C3").is_dir():
        pytest.skip(f"shared HER2-ST data not found at {HER2ST} (integration test needs ../shared)")
    return HER2ST


@pytest.fixture(scope="session")
def synthetic():
    """A 3-section synthetic stack (seed 0); treat as read-only."""
    return synthetic_stack(3, seed=0)
