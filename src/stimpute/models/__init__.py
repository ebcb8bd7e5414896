"""Expression models behind one interface: a registry of name → `Method`.

Each method learns from the measured sections it is given (`train`) and predicts the
panel expression of other sections (`targets`) of a `PreparedStack`. 3D methods may also
read the known sections' expression through the stack's graph; 2D methods use images only.
`Model`s (trained once, saved, loaded: `stimpute train` / `predict`) are found in `MODELS`.
Adding one is one new module in this package with a `@register_method` class (see
docs/architecture.md, "Adding a model"): `load_methods` imports every module here.
"""

import importlib
import pkgutil

from stimpute.errors import StimputeError
from stimpute.models.base import (METHODS, MODELS, Method, Model, NotApplicable, get_method,
                                  register_method)
from stimpute.models import baselines  # noqa: F401  (registers overlap, similarity, ridge, knn, mean)

# Modules outside this package that register methods (ASIGN and its parts); imported on
# demand with this package's modules (torch/lightning are slow to import).
METHOD_MODULES = ("stimpute.impute",)


def load_methods() -> dict:
    """Import every method module (this package's and `METHOD_MODULES`) so the registry is complete."""
    modules = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)] + list(METHOD_MODULES)
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return METHODS


def get_model(name: str) -> type[Model]:
    """The registered `Model` class that `stimpute train --method name` trains."""
    load_methods()
    if name not in MODELS:
        raise StimputeError("--method", f"cannot train {name!r} for `stimpute predict` (use {' or '.join(sorted(MODELS))})")
    return MODELS[name]


__all__ = ["METHODS", "MODELS", "Method", "Model", "NotApplicable", "PreparedStack", "get_method", "get_model",
           "load_methods", "register_method"]
