"""Expression models behind one interface: a registry of name → `Method`.

Each method learns from the measured sections it is given (`train`) and predicts the
panel expression of other sections (`targets`) of a `PreparedStack`. 3D methods may also
read the known sections' expression through the stack's graph; 2D methods use images only.
"""

from stimpute.models.base import METHODS, Method, NotApplicable, PreparedStack, get_method, register_method

__all__ = ["METHODS", "Method", "NotApplicable", "PreparedStack", "get_method", "register_method"]
