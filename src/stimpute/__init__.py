"""stimpute: spatial transcriptomics from serial H&E sections, in 3D.

In a notebook, scanpy style: `import stimpute as st`, then `st.datasets.her2st_mini()`
(AnnData objects), `st.tl.register`, `st.tl.features`, `st.tl.impute(adatas, known="C3")`
and plots in `st.pl`. On files: read sections (`st.io`), build a `Stack`, then prepare,
impute and evaluate it, as the CLI does.

Everything but the errors loads on first use (PEP 562), so `import stimpute` and the
command line start without importing anndata, scanpy or torch.
"""

import importlib

from importlib.metadata import PackageNotFoundError, version

from stimpute.errors import InputError, StimputeError

try:
    __version__ = version("stimpute")
except PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0"

_SUBMODULES = ("tl", "pl", "io", "datasets")
_FROM_DATA = ("Section", "SectionImage", "Stack")


def __getattr__(name: str):
    """Load `st.tl`, `st.pl`, `st.io`, `st.datasets` and the data classes on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"stimpute.{name}")
    if name in _FROM_DATA:
        return getattr(importlib.import_module("stimpute.data"), name)
    raise AttributeError(f"module 'stimpute' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [*_SUBMODULES, *_FROM_DATA, "StimputeError", "InputError", "__version__"]
