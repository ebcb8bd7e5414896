"""The package surface a notebook user meets: `import stimpute as st` loads its parts on
first use, and neither it nor the command line imports a heavy library at start-up."""

from __future__ import annotations

import importlib

import pytest

from tests.helpers import heavy_after


@pytest.mark.parametrize("code", [
    "import stimpute",
    "import stimpute.cli",
    "from typer.testing import CliRunner\nfrom stimpute.cli import app\n"
    "for args in (['--version'], ['--help'], ['impute', '--help']):\n"
    "    assert CliRunner().invoke(app, args).exit_code == 0, args",
])
def test_start_up_imports_no_heavy_library(code):
    assert heavy_after(code) == []


def test_parts_load_on_first_use():
    import stimpute as st

    for name in ("tl", "pl", "io", "datasets"):
        assert getattr(st, name) is importlib.import_module(f"stimpute.{name}")
        assert name in dir(st) and name in st.__all__
    from stimpute import Stack

    assert Stack is importlib.import_module("stimpute.data").Stack
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        st.nope
