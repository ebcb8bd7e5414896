"""Expression models behind one interface: a registry of name → `Method`.

Each method learns from the measured sections it is given (`train`) and predicts the
panel expression of other sections (`targets`) of a `PreparedStack`. 3D methods may also
read the known sections' expression through the stack's graph; 2D methods use images only.
"""

import importlib

from stimpute.models.base import METHODS, Method, NotApplicable, PreparedStack, get_method, register_method
from stimpute.models import baselines  # noqa: F401  (registers overlap, similarity, ridge, knn, mean)

# Modules that register the built-in torch methods; imported on demand (torch/lightning are slow to import).
METHOD_MODULES = ("stimpute.impute", "stimpute.models.msagnet2d", "stimpute.models.nh2st", "stimpute.models.moe3d")


def load_methods() -> dict:
    """Import every built-in method module (those present) so the registry is complete."""
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return METHODS


__all__ = ["METHODS", "Method", "NotApplicable", "PreparedStack", "get_method", "load_methods", "register_method"]
