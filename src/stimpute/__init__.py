"""stimpute: spatial transcriptomics from serial H&E sections, in 3D.

On AnnData, scanpy style: `stimpute.tl.impute(adatas, known="C3")` (also `tl.register`,
`tl.features`) and plots in `stimpute.pl`. On files: read sections (`stimpute.io`), build
a `Stack`, then prepare, impute and evaluate it, as the CLI does.
"""

import importlib

from importlib.metadata import PackageNotFoundError, version

from stimpute.data import Section, SectionImage, Stack
from stimpute.errors import InputError, StimputeError

try:
    __version__ = version("stimpute")
except PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0"


def __getattr__(name: str):
    """`stimpute.tl` and `stimpute.pl` load on first use (torch and matplotlib are slow to import)."""
    if name in ("tl", "pl"):
        return importlib.import_module(f"stimpute.{name}")
    raise AttributeError(f"module 'stimpute' has no attribute {name!r}")


__all__ = ["tl", "pl", "Section", "SectionImage", "Stack", "StimputeError", "InputError", "__version__"]
