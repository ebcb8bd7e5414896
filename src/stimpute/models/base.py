"""The `Method` interface, the prepared inputs every method reads, and the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from stimpute.data import Stack
from stimpute.errors import StimputeError


@dataclass
class PreparedStack:
    """A stack made ready for models: panel expression, spot features, registration, graph.

    - `expression[i]`: (n_i, n_genes) normalise_total(1e4)+log1p panel expression of
      section i, or None where it has no counts. Methods read only the rows of the
      sections they are told are known/trained on.
    - `features[i]`: (n_i, n_scales, dim) patch features (scales: spot, 512, 1024 regions).
    - `coords_ref[i]`: (n_i, 2) spot centres registered to the first section's pixels.
    - `graph`: the 3D spot graph (torch_geometric Data; nodes section by section), or None.
    """

    stack: Stack
    panel: list[str]
    expression: list[np.ndarray | None]
    features: list[np.ndarray]
    coords_ref: list[np.ndarray] | None = None
    graph: Any = None
    settings: dict = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        """Node index of each section's first spot in the 3D graph (and a final total)."""
        return np.concatenate([[0], np.cumsum([s.n_spots for s in self.stack])])

    def known_expression(self, i: int) -> np.ndarray:
        expr = self.expression[i]
        if expr is None:
            name = self.stack[i].name
            raise StimputeError(self.stack[i].source or name, f"section {name} has no measured counts to learn from")
        return expr


class NotApplicable(Exception):
    """A method cannot run under this protocol (e.g. a 3D-only method in the 2D protocol)."""


class Method(ABC):
    """An expression predictor. Subclasses set `name` and implement `fit_predict`."""

    name: str = ""
    needs_3d: bool = False  # reads the known layer's expression through the 3D graph

    @abstractmethod
    def fit_predict(self, prepared: PreparedStack, train: list[int], targets: list[int], seed: int = 0) -> dict[int, np.ndarray]:
        """Learn from sections `train` (their expression is known), predict `targets`.

        Returns {section index: (n_spots, n_genes) prediction on the log1p scale}.
        """


METHODS: dict[str, Callable[..., Method]] = {}


def register_method(factory: Callable[..., Method]) -> Callable[..., Method]:
    """Class decorator: make a method available by its `name` to the CLI and benchmark."""
    METHODS[factory.name] = factory
    return factory


def get_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise StimputeError("--method", f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name](**options)
