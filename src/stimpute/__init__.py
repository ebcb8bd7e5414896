"""stimpute: spatial transcriptomics from serial H&E sections, in 3D.

The Python API mirrors the CLI: read sections (`stimpute.io`), build a `Stack`, then
prepare, impute and evaluate it.
"""

from importlib.metadata import PackageNotFoundError, version

from stimpute.data import Section, SectionImage, Stack
from stimpute.errors import InputError, StimputeError

try:
    __version__ = version("stimpute")
except PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0"

__all__ = ["Section", "SectionImage", "Stack", "StimputeError", "InputError", "__version__"]
