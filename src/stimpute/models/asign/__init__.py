"""ASIGN as a `Model`: image members, cross-layer evidence, gene programs, fusion.

The stages run one way down:

1. **Image members** (`members`: MSAGNet on the 3D graph, trained with a per-gene
   correlation loss, and an RBF kernel ridge probe on the same features) are fitted on the
   known sections and averaged into the *model part*: on HER2-ST each alone is noisy and
   their errors differ.
2. **Cross-layer evidence** (`stimpute.evidence.transfer`). Every spot is linked directly to
   the spots of every known section through the registration, by a Gaussian kernel in µm
   whose scale is the spot pitch, times a morphology term (standardised image features).
   One hop, no diffusion: on HER2-ST, smoothing over the spot graph lowers per-gene PCC,
   since tumour structure changes from one spot to the next. A spot's *reach* r ∈ [0, 1)
   is how much kernel weight it has: 0 far from measured tissue, ~0.95 on top of a
   measured spot. What is transferred is the *residual* of the kernel ridge probe
   (regression kriging): each known spot's measured expression minus the probe's
   out-of-sample prediction there (exact leave-one-out), added to the probe's prediction
   at the target spot. Far from measured tissue the propagated part falls back to the
   probe. It is joined by a plain copy of the nearest measured spots
   (`stimpute.evidence.copy_nearest`: 4 spots, σ one pitch, nothing beyond 2 pitches, no
   image term; the `transfer` rival), an estimate free of the image, so a target whose
   staining or focus differs from the known section still gets a propagated part that does
   not move with its image.
3. **Gene programs** (`stimpute.models.asign.programs`). Both parts are projected onto the leading
   principal axes of the known sections' expression, with the rank cross-validated on the
   known spots: a prediction keeps the directions the block varies along and loses
   gene-by-gene noise. The members (`ImputeResult.members`) stay unprojected.
4. **Fusion.** Parts are mixed as per-gene z-scores over the target's spots (`zmix`), then
   given the raw mixture's mean and spread: per-gene PCC rewards each part's spatial
   *pattern*, and a part whose level or scale is off must not turn that offset into
   pattern where the weights vary from spot to spot. The propagated part's weight is
   w[spot, gene] = g_gene · r_spot, by a per-gene share g. By default ("calibrated") g is
   fitted per gene on held-out known spots (with two or more known sections each one's
   held-out spots are propagated from the *other* sections; with one, from the rest of its
   own section), shrunk towards ½: the share adapts to the block at hand. A share fixed on
   HER2-ST ("fixed", g = ⅔ for every gene) lost 0.016 per-gene PCC on a Visium-like block
   and 0.003 on the HER2-ST protocol's mean (benchmarks/README.md); "even" fixes
   g = ½. The held-out spots also give each gene's confidence: the PCC of the fused value there.

`Asign.fit` learns all of it from the known sections of a `PreparedStack`; `impute` predicts
any other section of a stack that holds the known sections (the same stack, as `stimpute
impute` does, or a new one). Its fitted state (the known sections with their registered
positions and transforms into the model's frame, features, expression and residuals, the
members, the gene programs and fusion shares) is saved, so `predict_sections` imputes
sections scanned later without training again: each is registered onto its nearest known
section, and the stored known spots, features and residuals are transferred to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from stimpute.combine import FUSIONS, zmix  # noqa: F401  (FUSIONS re-exported)
from stimpute.data import Stack
from stimpute.defaults import DEFAULT_FUSION
from stimpute.errors import InputError, StimputeError
from stimpute.evidence import copy_nearest, transfer
from stimpute.metrics import pearson_columns
from stimpute.models.asign.members import MEMBERS as MEMBER_TYPES
from stimpute.models.asign.members import KernelRidgeMember
from stimpute.models.base import METHOD_ALIASES, Method, Model, current_name, register_method
from stimpute.models.msagnet_model import held_out
from stimpute.prepare import PreparedStack
from stimpute.models.asign.programs import GenePrograms, resolve_programs
from stimpute.timing import timed
from stimpute.threads import blas_threads, threads_for_size, torch_threads

FUSION_STEPS = 300
FUSION_SHRINK = 0.01
MEMBERS = ("msagnet_3d", "kernel_ridge")  # chosen on HER2-ST known C4 → C3 (benchmarks/README.md)
FIXED_SHARE = 2 / 3  # the propagated part's share of "fixed" fusion (module doc)
COPY_SHARE = 0.5  # the plain copy's share in the propagated part
STATE_FILE, SETTINGS_FILE, SECTIONS_FOLDER = "state.npz", "asign.yaml", "sections"


@dataclass
class FusionWeights:
    """Per-gene share g ∈ (0, 1) of the propagated part, scaled per spot by its reach."""

    gene_share: np.ndarray

    def weights(self, reach: np.ndarray) -> np.ndarray:
        """(n_spots, n_genes) weight of the propagated part: g_gene · r_spot."""
        return np.asarray(reach, np.float64)[:, None] * self.gene_share[None, :]


@dataclass
class ImputeResult:
    """Per target section (stack index): fused, model and propagated expression, weights,
    reach; `members` holds each image model's own prediction; `calibration` the held-out
    known spots (propagated, model and each member's prediction, truth, reach, fused; empty
    for a loaded model) and `gene_confidence` their per-gene PCC of the fused value;
    `programs` the gene programs both parts were projected on; `residual` the kernel ridge
    residuals the propagation transferred, per known section (None: it transferred
    expression); `transferred` the known sections' measured expression carried to each
    target spot alone (no image model: the estimate independent of the model part, for
    per-spot confidence)."""

    fused: dict[int, np.ndarray]
    model: dict[int, np.ndarray]
    propagated: dict[int, np.ndarray]
    weight: dict[int, np.ndarray]
    reach: dict[int, np.ndarray]
    fusion: FusionWeights
    config: object
    calibration: dict = field(default_factory=dict)
    members: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    gene_confidence: np.ndarray | None = None
    programs: GenePrograms | None = None
    residual: dict[int, np.ndarray] | None = None
    transferred: dict[int, np.ndarray] = field(default_factory=dict)


def _blas_for(prepared: PreparedStack):
    """numpy's and scikit-learn's threads for a stack of this many spots (`threads_for_size`):
    kernel ridge, gene programs and propagation are small dense steps below it."""
    return blas_threads(threads_for_size(sum(section.n_spots for section in prepared.stack)))


@timed("fusion")
def fit_fusion(propagated: np.ndarray, model: np.ndarray, truth: np.ndarray, reach: np.ndarray,
               steps: int = FUSION_STEPS, shrink: float = FUSION_SHRINK) -> FusionWeights:
    """Per-gene shares g = σ(α) minimising the fused MSE on held-out spots, plus
    `shrink` · mean(α²): a few dozen held-out spots per gene are noisy, so each share is
    pulled towards the even split unless its data clearly say otherwise. On one thread: the
    steps are tiny, and a second thread only waits for a core (a busy 2-core machine:
    3.5-6.6 against 0.3 CPU s, the same shares)."""
    P, M, Y = (torch.as_tensor(a, dtype=torch.float64) for a in (propagated, model, truth))
    r = torch.as_tensor(np.asarray(reach), dtype=torch.float64)[:, None]
    alpha = torch.zeros(P.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=0.05)
    with torch_threads(1):
        for _ in range(steps):
            opt.zero_grad()
            w = r * torch.sigmoid(alpha)[None]
            loss = ((w * P + (1 - w) * M - Y) ** 2).mean() + shrink * (alpha**2).mean()
            loss.backward()
            opt.step()
    return FusionWeights(torch.sigmoid(alpha).detach().numpy())


def _train_config():
    from stimpute.models.msagnet_training import TrainConfig

    return TrainConfig()


@dataclass
class AsignConfig:
    """Every setting of ASIGN. `train`: MSAGNet's `stimpute.models.msagnet_training.TrainConfig`; `members`:
    image members averaged into the model part (`msagnet_3d`, `kernel_ridge`, `ridge`);
    `fusion`: "fixed", "calibrated" or "even"; `morphology`: feature term in the propagation
    kernel; `programs`: gene-program rank ("auto", "none" or a number); `residual`: transfer
    the kernel ridge residuals (else the measured expression itself)."""

    train: object = field(default_factory=_train_config)
    members: tuple[str, ...] = MEMBERS
    fusion: str = DEFAULT_FUSION
    morphology: bool = True
    programs: str | int = "auto"
    residual: bool = True

    def __post_init__(self):
        self.members = tuple(current_name(m, METHOD_ALIASES, "member") for m in self.members)
        unknown = [m for m in self.members if m not in MEMBER_TYPES]
        if unknown or not self.members:
            raise ValueError(f"ASIGN members must be some of {', '.join(MEMBER_TYPES)}, got {', '.join(unknown) or 'none'}")

    def to_dict(self) -> dict:
        return {**asdict(self), "train": self.train.to_dict(), "members": list(self.members)}

    @classmethod
    def from_dict(cls, values: dict) -> "AsignConfig":
        from stimpute.models.msagnet_training import TrainConfig

        return cls(**{**values, "train": TrainConfig.from_dict(values["train"]), "members": tuple(values["members"])})


@dataclass
class KnownState:
    """The known sections as the model keeps them: in stack order of the fit, each one's
    section (spots, image: registration of new sections onto it), panel expression,
    features, spot positions in the model's frame (`coords`: px of the fit's first section,
    `um_per_px` of it) and the transform of its own pixels into that frame, and the probe's
    residuals (None: expression is transferred)."""

    sections: list
    expression: list[np.ndarray]
    features: list[np.ndarray]
    coords: list[np.ndarray]
    transforms: list[np.ndarray]
    residual: list[np.ndarray] | None
    um_per_px: float
    thickness_um: float

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sections]


class Asign(Model):
    """ASIGN: image models fused with cross-layer propagation by reach-aware weights."""

    name = "asign"
    config_class = AsignConfig
    saved = "asign/"
    epochs_field = "max_epochs"
    needs_3d = True
    part = "fused"  # the part of `impute` that `predict` gives (the benchmark's entries)

    @classmethod
    def train_config(cls, epochs: int | None = None):
        config = cls.default_config()
        return config if epochs is None else replace(config, train=replace(config.train, max_epochs=epochs))

    def on_device(self, accelerator: str, **parallel) -> "Asign":
        train = self.config.train
        self.config = replace(self.config, train=replace(train, accelerator=accelerator,
                                                         **{k: v for k, v in parallel.items() if hasattr(train, k)}))
        return self

    def settings(self) -> dict:
        return self.config.to_dict()

    def fit(self, prepared: PreparedStack, train: list[int], seed: int = 0, checkpoints: Path | None = None,
            progress: bool = False) -> "Asign":
        """Fit the members, the gene programs and the fusion on the `train` (known) sections."""
        with _blas_for(prepared):
            return self._fit(prepared, train, seed, checkpoints, progress)

    def _fit(self, prepared: PreparedStack, train: list[int], seed: int, checkpoints: Path | None,
             progress: bool) -> "Asign":
        cfg = self.config
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
        self.config = cfg = replace(cfg, train=replace(cfg.train, seed=seed))
        known = list(train)
        held = held_out(prepared, known, seed, cfg.train.val_fraction)
        self.members_ = {name: MEMBER_TYPES[name](cfg.train).fit(prepared, known, held, seed, checkpoints, progress)
                         for name in cfg.members}
        probe = None
        if cfg.residual:
            probe = self.members_.get("kernel_ridge") or KernelRidgeMember().fit(prepared, known, held, seed)
        self.probe_ = probe
        self.programs_ = resolve_programs(prepared, known, cfg.programs, seed, cfg.morphology)
        calibration = _calibration(prepared, known, held, {m: self.members_[m].held_ for m in cfg.members},
                                   cfg.morphology, self.programs_, probe)
        self.fusion_ = (fit_fusion(calibration["propagated"], calibration["model"], calibration["truth"], calibration["reach"])
                        if cfg.fusion == "calibrated"
                        else FusionWeights(np.full(len(prepared.panel), 0.5 if cfg.fusion == "even" else FIXED_SHARE)))
        calibration["fused"] = zmix(calibration["model"], calibration["propagated"], self.fusion_.weights(calibration["reach"]))
        self.calibration_ = calibration
        self.gene_confidence_ = np.nan_to_num(pearson_columns(calibration["fused"], calibration["truth"]))
        self.panel_ = list(prepared.panel)
        self.known_ = KnownState(
            sections=[prepared.stack[i] for i in known],
            expression=[prepared.known_expression(i) for i in known],
            features=[prepared.features[i] for i in known],
            coords=[np.asarray(prepared.coords_ref[i], np.float64) for i in known],
            transforms=[_fitted_transform(prepared.stack[i].xy, prepared.coords_ref[i]) for i in known],
            residual=[probe.residual[i] for i in known] if probe else None,
            um_per_px=float(prepared.stack[0].um_per_px), thickness_um=float(prepared.stack.thickness_um))
        return self

    def impute(self, prepared: PreparedStack, targets: list[int]) -> ImputeResult:
        """Every part of the imputation of `targets`, sections of `prepared`, which holds the
        known sections (found by name) with their measured expression."""
        with _blas_for(prepared):
            return self._impute(prepared, targets)

    def _impute(self, prepared: PreparedStack, targets: list[int]) -> ImputeResult:
        cfg, known_state = self.config, self.known_
        known = [prepared.stack.index(name) for name in known_state.names]
        predictions = {m: member.predict(prepared, targets) for m, member in self.members_.items()}
        probe = None
        if self.probe_ is not None:
            probe = predictions["kernel_ridge"] if "kernel_ridge" in predictions else self.probe_.predict(prepared, targets)
        programs = self.programs_
        model = {i: programs.project(np.mean([predictions[m][i] for m in cfg.members], axis=0)).astype(np.float32)
                 for i in targets}
        # one transfer carries the measured expression and the probe's residuals side by side
        values = [np.c_[prepared.known_expression(k), r] for k, r in zip(known, known_state.residual)] if probe \
            else [prepared.known_expression(k) for k in known]
        carried, reach = transfer(prepared, known, targets, values, features=cfg.morphology)
        n_genes = len(prepared.panel)
        transferred = {i: c[:, :n_genes] for i, c in carried.items()}
        copied = copy_nearest(prepared, known, targets)
        propagated = {i: zmix(programs.project(c[:, n_genes:] + probe[i] if probe else c), copied[i], COPY_SHARE)
                      for i, c in carried.items()}
        result = ImputeResult({}, model, propagated, {}, reach, self.fusion_, cfg.train, self.calibration_,
                              members={m: {i: predictions[m][i] for i in targets} for m in cfg.members},
                              gene_confidence=self.gene_confidence_, programs=programs,
                              residual=dict(zip(known, known_state.residual)) if probe else None,
                              transferred=transferred)
        for i in targets:
            w = self.fusion_.weights(reach[i]).astype(np.float32)
            result.weight[i] = w
            result.fused[i] = zmix(model[i], propagated[i], w)
        return result

    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        return getattr(self.impute(prepared, list(targets)), self.part)

    def predict_sections(self, stack: Stack, prepare, grid=None, order: list[str] | None = None):
        """Impute the sections of `stack`, which were not there at fit time (`impute_new`).
        Yields (section, panel expression or None, prediction) in `stack` order."""
        prepared, result, new = self.impute_new(stack, prepare, grid, order)
        for section, i in zip(stack, new):
            yield section, prepared.expression[i], result.fused[i]

    def predict_results(self, stack: Stack, prepare, panel=None, grid=None, order: list[str] | None = None, *,
                        key: str = "stimpute", run: dict | None = None, check=None):
        """`predict_sections` with each section's result in the layout of `stimpute impute`
        (`stimpute.io.results.asign_results`: model, propagated and weight layers, reach,
        confidence, `spatial_3d` in the model's registered frame); as `Model.predict_results`."""
        from stimpute.io.results import asign_results

        prepared, result, new = self.impute_new(stack, prepare, grid, order)
        for section, i in zip(stack, new):
            if check is not None:
                check(section, result.fused[i])
        known = [prepared.stack.index(name) for name in self.known_.names]
        adatas = asign_results(prepared, result, known, key=key, run={**(run or {}), "known": self.known_.names},
                               sections=new)
        for section, i, adata in zip(stack, new, adatas):
            yield section, prepared.expression[i], result.fused[i], adata

    def impute_new(self, stack: Stack, prepare, grid=None, order: list[str] | None = None):
        """Impute the sections of `stack`, which were not there at fit time: each is placed
        among the known sections (`order`: every section's name in cutting order; default:
        the known sections, then the new ones; z = position × the fit's section thickness),
        registered onto its nearest known section (an H&E image alone gets a virtual spot
        grid, `grid`, there), and imputed with the stored known spots, features and residuals.
        Returns the stack of known and new sections in `order` (its registration record:
        each one's transform into the model's frame, `reference` its first known section),
        the `ImputeResult` on it and the new sections' indices there, in `stack` order."""
        from stimpute.graph import build_graph
        from stimpute.register import apply_transform, register_stack
        from stimpute.register.grid import place_virtual_spots

        state = self.known_
        clash = [n for n in stack.names if n in state.names]
        if clash:
            raise StimputeError(stack[clash[0]].source or clash[0], f"section {clash[0]} is one of the model's known "
                                "sections; give new sections another name")
        order = list(order) if order else state.names + stack.names
        if sorted(order) != sorted(state.names + stack.names):
            raise StimputeError("--order", f"name every section once, the model's known {', '.join(state.names)} "
                                f"and the new {', '.join(stack.names)}; got {', '.join(order)}")
        sections = {s.name: s for s in [*state.sections, *stack]}
        for position, name in enumerate(order):
            sections[name].z_um = position * state.thickness_um
        coords = dict(zip(state.names, state.coords))
        transforms = dict(zip(state.names, state.transforms))
        for section in stack:
            here = order.index(section.name)
            anchor = min(state.names, key=lambda n: (abs(order.index(n) - here), order.index(n)))
            pair = Stack([sections[anchor], section])
            registration = place_virtual_spots(pair, [0], grid) if section.n_spots == 0 else register_stack(pair)
            transforms[section.name] = state.transforms[state.names.index(anchor)] @ registration.transforms[1]
            coords[section.name] = apply_transform(transforms[section.name], section.xy)
        new = prepare(stack)
        joint = Stack([sections[n] for n in order], thickness_um=state.thickness_um)
        scale = state.um_per_px / joint[0].um_per_px  # coordinates are in px of the stack's first section
        by_name = {**dict(zip(state.names, zip(state.expression, state.features))),
                   **{s.name: (new.expression[i], new.features[i]) for i, s in enumerate(stack)}}
        features = [by_name[n][1] for n in order]
        coords_ref = [coords[n] * scale for n in order]
        frame = {"reference": state.names[0],
                 "sections": [{"name": n, "matrix": np.asarray(transforms[n]).tolist()} for n in order]}
        prepared = PreparedStack(joint, self.panel_, [by_name[n][0] for n in order], features, coords_ref,
                                 build_graph(joint, coords_ref, features=features), {**new.settings, "registration": frame})
        targets = [order.index(n) for n in stack.names]
        return prepared, self.impute(prepared, targets), targets

    def save(self, folder: Path) -> Path:
        """`asign/` in `folder`: settings, arrays of the known state, the members' weights and
        the known sections (spots and image, for registering new sections onto them)."""
        from stimpute.files import atomic_write, write_text_atomic
        from stimpute.io import write_section

        path = Path(folder) / self.saved
        state = self.known_
        for section in state.sections:
            write_section(section, path / SECTIONS_FOLDER, force=True)
        for member in self.members_.values():
            member.save(path)
        arrays = {"gene_share": self.fusion_.gene_share, "gene_confidence": self.gene_confidence_,
                  "programs_mean": self.programs_.mean, "programs_axes": self.programs_.axes}
        for j, name in enumerate(state.names):
            arrays.update({f"expression/{name}": state.expression[j], f"features/{name}": state.features[j],
                           f"coords/{name}": state.coords[j], f"transform/{name}": state.transforms[j]})
            if state.residual is not None:
                arrays[f"residual/{name}"] = state.residual[j]
        atomic_write(path / STATE_FILE, lambda tmp: _savez(tmp, arrays))
        settings = {"config": self.config.to_dict(), "known": state.names, "panel": self.panel_,
                    "um_per_px": state.um_per_px, "thickness_um": state.thickness_um,
                    "programs_rank": int(self.programs_.rank), "probe": self.probe_ is not None}
        write_text_atomic(path / SETTINGS_FILE, yaml.safe_dump(settings, sort_keys=False))
        return path

    @classmethod
    def load(cls, folder: Path) -> "Asign":
        from stimpute.io import read_section

        path = Path(folder) / cls.saved
        try:
            settings = yaml.safe_load((path / SETTINGS_FILE).read_text(encoding="utf-8"))
            arrays = dict(np.load(path / STATE_FILE, allow_pickle=False))
            names = settings["known"]
            model = cls(AsignConfig.from_dict(settings["config"]))
            residual = [arrays[f"residual/{n}"] for n in names] if settings["probe"] else None
            model.known_ = KnownState([read_section(path / SECTIONS_FOLDER / n) for n in names],
                                      [arrays[f"expression/{n}"] for n in names], [arrays[f"features/{n}"] for n in names],
                                      [arrays[f"coords/{n}"] for n in names], [arrays[f"transform/{n}"] for n in names],
                                      residual, float(settings["um_per_px"]), float(settings["thickness_um"]))
            model.panel_ = list(settings["panel"])
            model.fusion_ = FusionWeights(arrays["gene_share"])
            model.gene_confidence_ = arrays["gene_confidence"]
            model.programs_ = GenePrograms(arrays["programs_mean"], arrays["programs_axes"], int(settings["programs_rank"]))
            model.calibration_ = {}  # the held-out spots stay with the fit; their result is gene_confidence
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
            raise InputError(path, f"not a saved ASIGN model ({type(exc).__name__}: {exc})") from None
        known = model._known_stack()
        ids, train = list(range(len(names))), model.config.train
        model.members_ = {m: MEMBER_TYPES[m].restore(path, known, ids, train) for m in model.config.members}
        model.probe_ = None
        if settings["probe"]:
            model.probe_ = model.members_.get("kernel_ridge") or KernelRidgeMember.restore(path, known, ids, train)
        return model

    def _known_stack(self) -> PreparedStack:
        """The known sections alone as a prepared stack (what the probes are fitted on)."""
        s = self.known_
        return PreparedStack(Stack(s.sections, thickness_um=s.thickness_um), self.panel_, s.expression, s.features, s.coords)


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a path without ".npz" would get one appended
        np.savez(f, **arrays)


def _fitted_transform(xy: np.ndarray, registered: np.ndarray) -> np.ndarray:
    """The 3x3 matrix mapping a section's spot pixels onto their registered positions
    (exact for the rigid and similarity transforms registration gives)."""
    xy = np.asarray(xy, np.float64)
    if len(xy) < 3:
        return np.eye(3)
    coef = np.linalg.lstsq(np.c_[xy, np.ones(len(xy))], np.asarray(registered, np.float64), rcond=None)[0]
    return np.r_[coef.T, [[0.0, 0.0, 1.0]]]


def _propagate(prepared, known, targets, residual: dict | None, morphology, exclude=None):
    """The transfer of the known spots' `residual` (per known section), else of their
    measured expression; and each target spot's reach."""
    values = None if residual is None else [residual[k] for k in known]
    return transfer(prepared, known, targets, values, features=morphology, exclude=exclude)


def _calibration(prepared, known, held, member_held, morphology, programs: GenePrograms, probe) -> dict:
    """Held-out known spots: truth, the model's honest prediction and a propagated value
    from other sections (two or more known) or from the rest of their own section (one),
    built like the targets' (projected kriging ⊕ plain copy). With a residual `probe`, its
    honest fit (without the held-out spots) gives the residuals transferred and the
    prediction they correct."""
    parts = {"propagated": [], "copied": [], "reach": [], "truth": []}
    for j, i in enumerate(known):
        sources = [k for k in known if k != i] or [i]
        exclude = None if len(known) > 1 else {i: held[i]}
        prop, reach = _propagate(prepared, sources, [i], probe and probe.residual_honest, morphology, exclude)
        if probe:
            prop[i][held[i]] += probe.held_by_section[j]
        parts["propagated"].append(prop[i][held[i]])
        parts["copied"].append(copy_nearest(prepared, sources, [i], exclude)[i][held[i]])
        parts["reach"].append(reach[i][held[i]])
        parts["truth"].append(prepared.known_expression(i)[held[i]])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["propagated"] = zmix(programs.project(out["propagated"]), out.pop("copied"), COPY_SHARE)
    out["members"] = member_held
    out["model"] = programs.project(np.mean(list(member_held.values()), axis=0))
    return out


def impute_stack(prepared: PreparedStack, known: list[int], seed: int = 0, config=None, ckpt_dir=None,
                 progress: bool = False, members: tuple[str, ...] = MEMBERS, fusion: str = DEFAULT_FUSION,
                 morphology: bool = True, programs: str | int = "auto", residual: bool = True) -> ImputeResult:
    """ASIGN end to end on a prepared stack: fit on the `known` sections, impute every other
    one (`Asign`; `config`: MSAGNet's `TrainConfig`, default seeded with `seed`; the other
    options are `AsignConfig`'s)."""
    from stimpute.models.msagnet_training import TrainConfig

    config = config or TrainConfig(seed=seed)
    model = Asign(AsignConfig(config, tuple(members), fusion, morphology, programs, residual))
    model.fit(prepared, list(known), seed=config.seed, checkpoints=ckpt_dir, progress=progress)
    return model.impute(prepared, [i for i in range(len(prepared.stack)) if i not in known])


# -- the benchmark's entries: ASIGN's output and its parts, all from the same class ---------

register_method(Asign)


@register_method
class AsignModel(Asign):
    """ASIGN's model part alone (`layers["model"]`: MSAGNet and kernel ridge averaged)."""

    name = "asign_model"
    model_name = "asign_model"
    part = "model"


@register_method
class Propagation(Method):
    """Cross-layer propagation alone (`layers["propagated"]`): distance and morphology
    kernel from every known section, no image model."""

    name = "propagation"
    needs_3d = True

    def fit_predict(self, prepared, train, targets, seed=0):
        return transfer(prepared, train, targets)[0]
