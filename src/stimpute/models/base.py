"""The `Method` and `Model` interfaces, and the registry (the prepared inputs every method reads, `PreparedStack`, live in `stimpute.prepare`).

A `Method` predicts held-out sections of one stack (`fit_predict`: the benchmark's unit).
A `Model` is a method that is trained once, saved to a folder and loaded later to predict
other sections from their images alone: `stimpute train --method NAME` and `stimpute
predict` find it in `MODELS` by its `model_name`, and know nothing else about it.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from stimpute.data import Stack
from stimpute.errors import StimputeError, StimputeWarning
from stimpute.metrics import gene_metrics
from stimpute.prepare import PreparedStack


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

    def on_device(self, accelerator: str, **parallel) -> "Method":
        """Train with Lightning's `accelerator` ("cpu" or "cuda", from `stimpute.device.resolve_device`)
        and `parallel` flags (`devices`, `num_nodes`, `strategy`: `stimpute.device.parallel_options`)
        where the method's `config` records them; other methods always run on the CPU."""
        config = getattr(self, "config", None)
        if is_dataclass(config) and hasattr(config, "accelerator"):
            self.config = replace(config, accelerator=accelerator,
                                  **{k: v for k, v in parallel.items() if hasattr(config, k)})
        return self


class Model(Method):
    """A trainable, savable image model: `fit`, `predict`, `save`, `load` and a `config`.

    Subclasses set `name` (benchmark method), `config_class` (a dataclass of every setting,
    recorded in the model folder's config.yaml), `saved` (the file or folder that `save`
    writes inside a model folder, relative to it) and, where training runs for a number of
    epochs, `epochs_field` (the config field that `stimpute train --epochs` sets).
    `model_name` is the name `stimpute train --method` and `predict` use (default: `name`).
    """

    config_class: type = dict
    saved: str = ""
    epochs_field: str | None = None
    model_name: str = ""

    def __init__(self, config=None, **options):
        self.config = replace(config if config is not None else self.default_config(), **options)

    @classmethod
    def default_config(cls):
        return cls.config_class()

    @classmethod
    def train_config(cls, epochs: int | None = None):
        """The settings of `stimpute train` (images only, sections unregistered); `epochs`
        sets `epochs_field` where the model has one."""
        config = cls.default_config()
        return replace(config, **{cls.epochs_field: epochs}) if epochs is not None and cls.epochs_field else config

    @abstractmethod
    def fit(self, prepared: PreparedStack, train: list[int], seed: int = 0, checkpoints: Path | None = None,
            progress: bool = False) -> "Model":
        """Learn from the measured sections `train`; `checkpoints`: a folder where training may
        keep resumable state (a rerun into the same folder continues), or None; `progress`:
        a live progress bar where the model has one."""

    @abstractmethod
    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        """{section index: (n_spots, n_genes) log1p prediction} of the sections `targets`."""

    @abstractmethod
    def save(self, folder: Path) -> Path:
        """Write the trained model into `folder` (at `folder / saved`); return that path."""

    @classmethod
    @abstractmethod
    def load(cls, folder: Path) -> "Model":
        """The model `save` wrote into `folder`, ready to `predict`."""

    def settings(self) -> dict:
        """What config.yaml records under `train` (every setting, plain types)."""
        return asdict(self.config)

    def fit_predict(self, prepared, train, targets, seed=0):
        return self.fit(prepared, list(train), seed).predict(prepared, list(targets))

    def predict_sections(self, stack: Stack, prepare: Callable[[Stack], PreparedStack], grid=None,
                         order: list[str] | None = None):
        """`stimpute predict`: each section of `stack` from its image alone (an H&E image
        alone gets a virtual spot grid, `grid`, over its tissue); `prepare` makes a stack of
        sections ready (features, the model's panel). Yields (section, panel expression or
        None, prediction) in `stack` order. `order` places new sections among a model's
        stored known sections; a model of images alone has none."""
        from stimpute.register.grid import grid_on_section

        if order:
            raise StimputeError("--order", f"{self.model_name} predicts each section from its image alone: "
                                "there are no known sections to place new ones among")
        for section in stack:
            if section.n_spots == 0:
                grid_on_section(section, grid)
            one = prepare(Stack([section]))
            yield section, one.expression[0], self.predict(one, [0])[0]

    def predict_results(self, stack: Stack, prepare: Callable[[Stack], PreparedStack], panel: list[str], grid=None,
                        order: list[str] | None = None, *, key: str = "stimpute", run: dict | None = None,
                        check: Callable | None = None):
        """`predict_sections` with each section's result AnnData, built by `stimpute.io.results`
        (the layout `stimpute impute` writes): here the prediction alone, in the section's own
        frame (`obsm["spatial_3d"]`: its pixels in µm at its z) and without a second estimate
        (`obs[f"{key}_confidence"]` undefined, 0). `panel`: the model's genes; `run`: the
        record kept in `uns[key]`; `check(section, prediction)`: the caller's test of each
        prediction before its result is built. Yields (section, panel expression or None,
        prediction, result) in `stack` order."""
        from stimpute.io.results import section_result, spatial_3d

        for section, measured, pred in self.predict_sections(stack, prepare, grid, order):
            if check is not None:
                check(section, pred)
            xyz = spatial_3d(section.xy, section.um_per_px, section.z_um)
            yield section, measured, pred, section_result(section, panel, pred, xyz, False, key=key, run=run)

    def cross_validate(self, prepared: PreparedStack, sections: list[int], n_folds: int, seed: int = 0,
                       folder: Path | None = None) -> pd.DataFrame:
        """k-fold cross-validation by section: each fold's sections are predicted by a fresh
        model (this one's config) trained on the others. Per-gene rows `fold, section, gene,
        pcc, mse, mae`; with `folder`, each fold's model is saved in `folder/fold<k>`."""
        if not 2 <= n_folds <= len(sections):
            raise StimputeError("--folds", f"need 2 ≤ folds ≤ {len(sections)} measured sections, got {n_folds}")
        rows = []
        for k, held in enumerate(np.array_split(np.array(sections), n_folds)):
            model = type(self)(self.config).fit(prepared, [i for i in sections if i not in held], seed)
            if folder is not None:
                model.save(Path(folder) / f"fold{k}")
            for i, pred in model.predict(prepared, [int(h) for h in held]).items():
                metrics = gene_metrics(pred, prepared.known_expression(i), prepared.panel)
                rows.append(metrics.assign(fold=k, section=prepared.stack[i].name))
        return pd.concat(rows, ignore_index=True)[["fold", "section", "gene", "pcc", "mse", "mae"]]


METHODS: dict[str, Callable[..., Method]] = {}
MODELS: dict[str, type[Model]] = {}
# old names, kept working with a deprecation line: "msagnet" meant the 3D net to the
# benchmark and the 2D model to `stimpute train` and in model folders
METHOD_ALIASES = {"msagnet": "msagnet_3d", "msagnet2d": "msagnet_2d"}
MODEL_ALIASES = {"msagnet": "msagnet_2d"}


def current_name(name: str, aliases: dict[str, str], what: str) -> str:
    """`name`, or the name an old one became (with one deprecation warning line)."""
    if name not in aliases:
        return name
    warnings.warn(f"{what} {name!r} is deprecated: it is called {aliases[name]!r} now", StimputeWarning, stacklevel=3)
    return aliases[name]


def register_method(factory: Callable[..., Method]) -> Callable[..., Method]:
    """Class decorator: make a method available by its `name` to the CLI and benchmark; a
    `Model` also to `stimpute train`/`predict` by its `model_name` (default: `name`)."""
    METHODS[factory.name] = factory
    if isinstance(factory, type) and issubclass(factory, Model):
        factory.model_name = vars(factory).get("model_name") or factory.name  # not a registered parent's
        MODELS[factory.model_name] = factory
    return factory


def get_method(name: str, **options) -> Method:
    name = current_name(name, METHOD_ALIASES, "method")
    if name not in METHODS:
        raise StimputeError("--method", f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name](**options)
