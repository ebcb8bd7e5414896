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
from stimpute.models.base import (METHOD_ALIASES, METHODS, MODEL_ALIASES, MODELS, Method, Model, NotApplicable,
                                  current_name, get_method, register_method)
from stimpute.models import baselines  # noqa: F401  (registers overlap, similarity, ridge, knn, mean)


def load_methods() -> dict:
    """Import every method module of this package (torch/lightning ones on demand: slow to
    import) so the registry is complete."""
    modules = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)]
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
    name = current_name(name, MODEL_ALIASES, "--method")
    if name not in MODELS:
        raise StimputeError("--method", f"cannot train {name!r} for `stimpute predict` (use {' or '.join(sorted(MODELS))})")
    return MODELS[name]


__all__ = ["METHOD_ALIASES", "METHODS", "MODEL_ALIASES", "MODELS", "current_name", "Method", "Model", "NotApplicable", "get_method", "get_model",
           "load_methods", "register_method"]
