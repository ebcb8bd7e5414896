"""The `impute`, `train` and `predict` commands as Python functions that write result folders.

`run_impute` is ASIGN end to end: read sections, prepare (panel, features, registration,
3D graph), train MSAGNet on the known section, propagate and fuse (`stimpute.models.asign`),
then write one `.h5ad` per imputed section, heatmaps, `metrics.csv` where targets carry
counts and, last, `config.yaml` (then `timings.json`: seconds and peak RSS per stage). Every run
owns its output folder (`stimpute.files`): a killed run is unfinished, and rerunning it resumes
(feature cache, training checkpoint) and replaces its partial outputs. `run_train`/`run_predict`
train a registered model once and apply it to sections scanned later: an image-only one
(MSAGNet 2D, NH²2ST, ...) or ASIGN itself, which keeps its known sections. Earlier results are
never overwritten without `force`, and files no stimpute run wrote never are.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import Future, ThreadPoolExecutor
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch  # here, not in `preloading`'s thread: a run needs it before registration ends, and would wait
import yaml

from stimpute import __version__
from stimpute.defaults import DEFAULT_FUSION
from stimpute.errors import InputError, StimputeError, StimputeWarning
from stimpute.metrics import Summary, gene_metrics, pearson_columns, spot_pcc, summarise_pcc
from stimpute.prepare import top_hvg_genes
from stimpute.expression import top_variable
from stimpute.features.checkpoint import file_digest
from stimpute.features.encoders import match_recorded
from stimpute.features.stored import check_encoder, check_trained_on, stored_encoder
from stimpute.io import read_stack
from stimpute.io.anndata_io import write_h5ad_atomic
from stimpute.files import write_text_atomic
from stimpute.io.image_section import refuse_images
from stimpute.io.results import BLOCK_FILE, SCALE, block_result
from stimpute.files import Run, run_ownership
from stimpute.io.spaceranger import spaceranger_files, spaceranger_outs
from stimpute.data import Stack
from stimpute.device import check_batch_nodes, resolve_device
from stimpute.distributed import is_rank_zero, rank_output
from stimpute.prepare import FEATURE_NORMS, known_indices, prepare_stack
from stimpute.register.grid import GridOptions, known_lattice
from stimpute.io.registration import figure_names, write_figures
from stimpute.timing import TIMINGS_FILE, records_stages, stage, timed
from stimpute.trainer import lightning_flags
from stimpute.tl import given_features, impute_sections
from stimpute.preload import preloading, thawed_after
from stimpute.view import VIEW_FILE, warm_plotly

if TYPE_CHECKING:  # the models are imported where they run: `import stimpute.pipeline` stays light (`stimpute.preload`)
    from stimpute.models.asign import ImputeResult
    from stimpute.models.msagnet import TrainConfig

MARKER_GENES = ("ERBB2", "MDK")  # clinically relevant HER2 markers shown by the paper
N_TOP_FIGURE_GENES = 4
FIGURE_SIDE = 1600  # px of the H&E thumbnail behind the expression maps
BLOCK_FIGURE = "block_3d.png"
FIGURES = ("all", "key", "none")  # --figures: every figure, the results' (maps, block), or none
N_TOP_SUMMARY = 50


@dataclass
class RunSummary:
    """Per-gene PCC summaries (panel, top-50 HVGs) and the paper's per-spot PCC, per target."""

    rows: list[dict] = field(default_factory=list)

    def add(self, label: str, panel: Summary, top: Summary, spot: float) -> None:
        self.rows.append({"targets": label, "panel": panel, "top50": top, "spot_pcc": spot})


@dataclass
class ImputeRun:
    out: Path
    files: list[Path]
    metrics: pd.DataFrame | None
    summary: RunSummary
    result: ImputeResult


def run_impute(sections: Sequence[str | Path], known: str, out: str | Path, genes: str | Path | None = None,
               seed: int = 0, force: bool = False, progress: bool = False, config: TrainConfig | None = None,
               encoder: str | None = None, members: tuple[str, ...] | None = None, fusion: str = DEFAULT_FUSION,
               weights: str | Path | None = None, um_per_px: float | None = None, grid: GridOptions | None = None,
               programs: str | int = "auto", command: str = "impute", figures: str = "key") -> ImputeRun:
    """Impute every non-known section of the stack `sections` (stack order) into `out`.

    `known`: the measured section's name, or several joined by commas ("C2,C4").
    `encoder`, `weights`: the feature encoder and its local weight file (network encoders);
    default: the features the sections carry, else handcrafted (`stimpute.features.stored`).
    `members`: ASIGN's image members (default: all, `stimpute.models.asign.MEMBERS`).
    `programs`: gene-program rank of the projection before fusion ("auto", "none" or a number).
    Image files among `sections` are H&E-only sections (scale `um_per_px` or their metadata)
    that get a virtual spot grid (`grid`) in the known section's registered frame.
    `command`: the owner recorded in `out`'s run manifest (`stimpute demo` reruns over its own).
    `figures`: "key" writes each imputed section's maps and `block_3d.png`, "all" also the
    registration QC (`overlay_<a>_<b>.png`, `spots_3d.png`), "none" no figure.
    """
    if figures not in FIGURES:
        raise StimputeError("--figures", f"{figures!r}: use {', '.join(FIGURES)}")
    if not [name for name in str(known).split(",") if name.strip()]:
        raise StimputeError("--known", "the list of known sections is empty: name the measured section(s), e.g. --known C3")
    check_encoder(encoder, weights)
    features = {"encoder": encoder, "weights": weights}
    with rank_output(out) as out, run_ownership(out, command, [*sections, genes, weights], force) as run, thawed_after():
        return _impute(run, out, sections, known, genes, seed, progress and is_rank_zero(), config, features, members,
                       fusion, um_per_px, grid, programs, figures)


@records_stages
def _impute(run: Run, out: Path, sections, known, genes, seed, progress, config, features, members, fusion,
            um_per_px, grid, programs, figures) -> ImputeRun:
    stack = read_stack(sections, um_per_px=um_per_px)
    # the models' and the writing's libraries are imported in a thread while the sections are registered
    with preloading(warm=[warm_plotly]):
        stored_encoder(stack, features["encoder"])  # one feature space, checked before registration
        k = known_indices(stack, known)
        targets = [i for i in range(len(stack)) if i not in k]
        if not targets:
            raise StimputeError(None, "nothing to impute: every section is --known")
        # a killed run's partial outputs are replaced, its cache and checkpoints reused
        outputs = [f"{stack[i].name}.h5ad" for i in targets] + [f"figures/{stack[i].name}.png" for i in targets]
        outputs += [f"figures/{name}" for name in figure_names(stack)] + [f"figures/{BLOCK_FIGURE}", VIEW_FILE]
        force = run.claim(outputs + [BLOCK_FILE, "config.yaml", "metrics.csv", TIMINGS_FILE, "checkpoints/"], caches=["cache/"])
        if config is None:
            from stimpute.models.msagnet import TrainConfig

            config = TrainConfig(seed=seed)
        done = impute_sections(stack, known, genes=genes, config=config, members=members, fusion=fusion, programs=programs,
                               encoder=features["encoder"], weights=features["weights"],
                               features=given_features(stack, features["encoder"]), grid=grid, cache_dir=out / "cache",
                               checkpoints=out / "checkpoints", progress=progress)
    prepared, result, parts = done.prepared, done.result, done.adatas
    from stimpute.models.asign import MEMBERS
    from stimpute.models.asign.programs import programs_record

    members = tuple(members or MEMBERS)
    run.keep("checkpoints/")  # a finished training of the same key is reused, not rewritten

    files = []
    panel = prepared.panel
    known_expr = np.concatenate([prepared.known_expression(i) for i in k])
    figure_genes = [g for g in MARKER_GENES if g in panel]
    figure_genes += [panel[j] for j in top_variable(known_expr, N_TOP_FIGURE_GENES) if panel[j] not in figure_genes]
    metrics, summary = evaluate_targets(prepared, targets, result.fused, top_variable(known_expr, N_TOP_SUMMARY))
    # figures drawn in a second thread beside the .h5ad writing (Agg and the PNG encoder free the GIL in parts),
    # from arrays taken here: writing an .h5ad lends its images out of `uns` for a moment (`io.anndata_io`)
    with stage("writing"), ThreadPoolExecutor(1, thread_name_prefix="stimpute-figures") as figure_thread:
        for i in targets:
            section = stack[i]
            files.append(write_h5ad_atomic(parts[i], out / f"{section.name}.h5ad", force=force))
            pcc = None if metrics is None else metrics[metrics.section == section.name].set_index("gene").pcc
            if figures != "none":  # from the result's own image (`library`): the section's image is not read again
                files.append(figure_thread.submit(_heatmaps, section, panel, figure_genes, result.fused[i], prepared.expression[i], out,
                                                  pcc=None if pcc is None or pcc.empty else pcc[figure_genes].to_numpy(),
                                                  library=_figure_library(parts[i].uns["spatial"][section.name])))
            section.image.release()
        block = block_result(parts)
        files.append(write_h5ad_atomic(block, out / BLOCK_FILE, force=force))
        if figures == "all":
            files.extend(write_figures(stack, done.registration, out / "figures"))  # registration QC overlays, 3D spot cloud
        if figures != "none":
            files.append(figure_thread.submit(*_block_figure(parts, figure_genes[0], out)))
        files.extend(write_impute_view(block, out))
        files = [f.result() if isinstance(f, Future) else f for f in files]
    del parts, block
    if metrics is not None:
        files.append(write_text_atomic(out / "metrics.csv", metrics.to_csv(index=False)))
    settings = {
        "command": "stimpute " + " ".join(sys.argv[1:]) if sys.argv and "stimpute" in Path(sys.argv[0]).name else None,
        "stimpute_version": __version__, "seed": seed, "known": known,
        "targets": [stack[i].name for i in targets], **prepared.settings["features"],
        "inputs": input_records(stack, sections),
        "panel": {"source": prepared.settings["panel_source"], "genes": list(panel)},
        "train": config.to_dict(),
        "fusion": {"rule": "w = gene_share * reach; X = (1-w)*z(model) + w*z(propagated) per gene, given the raw mixture's mean and spread", "mode": fusion,
                   "members": list(members), "gene_share": [round(float(a), 4) for a in result.fusion.gene_share]},
        "gene_programs": programs_record(programs, result.programs),
        "registration": prepared.settings.get("registration"),
    }
    files.append(write_text_atomic(out / "config.yaml", yaml.safe_dump(_plain(settings), sort_keys=False)))
    return ImputeRun(out, files, metrics, summary, result)


def evaluate_targets(prepared, targets: list[int], predictions: dict, top: np.ndarray) -> tuple[pd.DataFrame | None, RunSummary]:
    """`section,gene,pcc,mse,mae` rows for targets that carry counts, and their summaries."""
    return score_sections([prepared.stack[i].name for i in targets], [predictions[i] for i in targets],
                          [prepared.expression[i] for i in targets], prepared.panel, top)


def score_sections(names: Sequence[str], predicted: Sequence[np.ndarray], measured: Sequence[np.ndarray | None],
                   panel: Sequence[str], top: np.ndarray) -> tuple[pd.DataFrame | None, RunSummary]:
    """Per-gene metrics (`section,gene,pcc,mse,mae`) of the sections whose `measured`
    expression is known, and per section (and pooled, "all") the PCC summaries over the
    panel and its `top` genes (column indices) with the paper's per-spot PCC."""
    frames, summary, spots = [], RunSummary(), []
    for name, pred, truth in zip(names, predicted, measured):
        if truth is None:
            continue
        frame = gene_metrics(pred, truth, panel)
        frame.insert(0, "section", name)
        frames.append(frame)
        spots.append(spot_pcc(pred, truth))
        summary.add(name, summarise_pcc(frame.pcc), summarise_pcc(frame.pcc.to_numpy()[top]), float(np.nanmean(spots[-1])))
    if not frames:
        return None, summary
    if len(frames) > 1:
        pooled = np.concatenate([f.pcc.to_numpy() for f in frames])
        pooled_top = np.concatenate([f.pcc.to_numpy()[top] for f in frames])
        summary.add("all", summarise_pcc(pooled), summarise_pcc(pooled_top), float(np.nanmean(np.concatenate(spots))))
    return pd.concat(frames, ignore_index=True), summary


def run_train(sections: Sequence[str | Path], out: str | Path, genes: str | Path | None = None, seed: int = 0,
              force: bool = False, progress: bool = False, config=None, encoder: str | None = None,
              method: str = "msagnet_2d", mode: str = "train", folds: int | None = None,
              weights: str | Path | None = None, epochs: int | None = None, device: str | None = None,
              parallel: dict | None = None, batch_nodes: int | None = None) -> Path:
    """Train the registered model `method` (`stimpute.models.MODELS`: msagnet_2d, nh2st,
    moe3d without coordinates, asign, ...) on every measured section and save it in `out`
    (sections are registered for models that read the 3D stack, `needs_3d`: asign). `config`: the model's settings (default: its
    `train_config(epochs)`). `mode="cv"`: k-fold cross-validation by section instead,
    writing `cv_metrics.csv` (and each fold's model under `checkpoints/`). `device`: auto, cpu
    or cuda (`stimpute.device`; default: the config's); `parallel`: Lightning's `devices`,
    `num_nodes`, `strategy` (`stimpute.device.parallel_options`; only global rank 0
    writes, `stimpute.distributed`); `batch_nodes`: the node budget of graph models."""
    from stimpute.models import get_model

    model_class = get_model(method)
    if mode not in ("train", "cv"):
        raise StimputeError("--mode", f"--mode {mode}: use train or cv")
    model = model_class(config if config is not None else model_class.train_config(epochs))
    if batch_nodes is not None:
        if not hasattr(model.config, "batch_nodes"):
            raise StimputeError("--batch-nodes", f"{method} trains on spots, not a graph: it has no node budget (msagnet_2d has)")
        model.config = replace(model.config, batch_nodes=check_batch_nodes(batch_nodes))
    if device is not None or parallel:
        accelerator = resolve_device(device) if device is not None else model.config.accelerator
        model.on_device(accelerator, **(parallel or {}))
    check_encoder(encoder, weights)
    refuse_images(sections, "train")
    features = {"encoder": encoder, "weights": weights}
    with rank_output(out) as out, run_ownership(out, "train", [*sections, genes, weights], force) as run:
        return _train(run, sections, genes, seed, progress and is_rank_zero(), features, model, mode, folds)


def _train(run: Run, sections, genes, seed, progress, features, model, mode, folds) -> Path:
    out = run.out
    saved = "checkpoints/" if model.saved.startswith("checkpoints/") else model.saved
    outputs = [saved, "checkpoints/", "config.yaml"] + (["cv_metrics.csv"] if mode == "cv" else [])
    force = run.claim(list(dict.fromkeys(outputs)), caches=["cache/"]) and not run.resuming  # a killed run is resumed
    stack = read_stack(sections)
    for section in stack:
        if section.n_spots == 0 or not section.has_counts:
            raise StimputeError(section.source or section.name, f"{section.n_spots} spots with counts: "
                                "`stimpute train` learns from measured sections only")
    prepared = prepare_stack(stack, panel=genes, encoder=features["encoder"], weights=features["weights"],
                             cache_dir=out / "cache", progress=progress, register=model.needs_3d,
                             hardware=lightning_flags(getattr(model.config, "train", model.config)))
    if force:  # retrain: the earlier run's checkpoints (listed in the manifest) go
        for old in (out / "checkpoints").rglob("*.ckpt"):
            if run.owns(old.relative_to(out).as_posix()):
                old.unlink()
    known = known_indices(stack, None)
    if mode == "cv":
        folds = folds or len(known)
        rows = model.cross_validate(prepared, known, folds, seed, out / "checkpoints")
        written = write_text_atomic(out / "cv_metrics.csv", rows.to_csv(index=False))
    else:
        written = model.fit(prepared, known, seed, checkpoints=out / "checkpoints", progress=progress).save(out)
    settings = {"stimpute_version": __version__, "method": model.model_name, "seed": seed, **prepared.settings["features"],
                "panel": list(prepared.panel), "top_hvg": top_hvg_genes(prepared, known), "spots": spot_geometry(stack),
                "inputs": input_records(stack, sections),
                "train": {"mode": mode, "folds": folds, **model.settings()}}
    write_text_atomic(out / "config.yaml", yaml.safe_dump(_plain(settings), sort_keys=False))
    return written


def spot_geometry(stack: Stack) -> dict:
    """Median spot diameter and pitch (µm; a section without one: its spot lattice's) and scale
    (µm/px) of the measured sections: the virtual grid `predict` lays on H&E images alone for a
    model trained on them, and their scale where the image says none."""
    measured = [s for s in stack if s.has_counts]
    pitches = [s.pitch_um or known_lattice(s, s.xy).pitch * s.um_per_px for s in measured if s.pitch_um or s.n_spots >= 3]
    return {"spot_diameter_um": float(np.median([s.spot_diameter_um for s in measured])),
            "pitch_um": float(np.median(pitches)) if pitches else None,
            "um_per_px": float(np.median([s.um_per_px for s in measured]))}


def run_predict(sections: Sequence[str | Path], model_dir: str | Path, out: str | Path, force: bool = False,
                progress: bool = False, method: str | None = None, encoder: str | None = None,
                weights: str | Path | None = None, um_per_px: float | None = None, grid: GridOptions | None = None,
                summary: RunSummary | None = None, order: Sequence[str] | None = None) -> list[Path]:
    """Predict each section from its image alone with a model written by `run_train`
    (`method`, `encoder` and `weights`, if given, must be the model's); returns the `.h5ad`
    and figure of each section, and records the model, inputs and version in `out/config.yaml`.

    H&E images alone (scale `um_per_px` or their metadata) get a virtual spot grid over
    their tissue (`grid`; default: the spot diameter and pitch the model was trained on).
    An ASIGN model registers each section onto its nearest known section and imputes it
    with them; `order`: every section's name, known and new, in cutting order (default: the
    known sections, then the new ones).
    Sections that carry counts are scored: `out/metrics.csv` (`section,gene,pcc,mse,mae`),
    and `summary`, if given, receives their PCC summaries (top genes: the training
    sections' top-50 HVGs)."""
    model_dir, out = Path(model_dir), Path(out)
    with run_ownership(out, "predict", [*sections, model_dir, weights], force) as run:
        return _predict(run, sections, model_dir, progress, method, encoder, weights, um_per_px, grid, summary, order)


def _predict(run: Run, sections, model_dir: Path, progress: bool, method: str | None, encoder, weights,
             um_per_px, grid, summary, order) -> list[Path]:
    from stimpute.models import MODEL_ALIASES, MODELS, current_name, get_model
    from stimpute.threads import torch_threads

    out = run.out
    cfg_file = model_dir / "config.yaml"
    settings = read_model_config(cfg_file) if cfg_file.is_file() else {}
    trained = settings.get("method", "msagnet")  # folders from before config.yaml recorded it: the 2D model
    try:
        model_class = get_model(trained)
        trained = model_class.model_name
    except StimputeError:
        raise InputError(cfg_file, f"records an unknown method {trained!r} (known: {', '.join(sorted(MODELS))})") from None
    ckpt = model_dir / model_class.saved
    if not ckpt.exists() or not cfg_file.is_file():
        raise StimputeError(model_dir, f"not a trained model folder: expected {model_class.saved} and config.yaml (from `stimpute train`)")
    if method is not None and current_name(method, MODEL_ALIASES, "--method") != trained:
        raise StimputeError(cfg_file, f"this model was trained with --method {trained}, not {method}")
    features = match_recorded(settings, encoder, weights, cfg_file)
    # a problem with the inputs is said before the model loads; images alone default to the model's scale
    stack = read_stack(sections, um_per_px=um_per_px, trained_um_per_px=settings.get("spots", {}).get("um_per_px"))
    try:
        model = model_class.load(model_dir)
    except StimputeError:
        raise
    except Exception as exc:  # a damaged file: unpickling, zip or shape errors of torch and the model
        raise InputError(ckpt, f"cannot load the model ({type(exc).__name__}: {_first_line(exc)})") from None
    force = run.claim([f"{s.name}.h5ad" for s in stack] + [f"figures/{s.name}.png" for s in stack]
                      + ["config.yaml", "metrics.csv"], caches=["cache/"])
    trained_grid = {k: v for k, v in settings.get("spots", {}).items() if v and k != "um_per_px"}
    grid = grid or GridOptions()
    grid = replace(grid, **{k: v for k, v in trained_grid.items() if getattr(grid, k) is None})
    panel = list(settings["panel"])
    for section in stack:
        check_trained_on(settings.get("encoder", "handcrafted"), section, model_dir)

    def prepare(sections: Stack):
        return prepare_stack(sections, known=[], panel=panel, encoder=features["encoder"], weights=features["weights"],
                             cache_dir=out / "cache", progress=progress, register=False,
                             feature_norm=settings.get("feature_normalisation", "none"))

    def check(section, pred):
        if pred.shape[1] != len(panel):
            raise InputError(cfg_file, f"its panel names {len(panel)} genes, but the model {ckpt} predicts {pred.shape[1]}")
        if not np.isfinite(pred).all():
            raise InputError(ckpt, f"the model predicts non-finite values for {section.name}: a damaged model file?")

    run_record = {"panel": panel, "targets": stack.names,
                  "settings": {"stimpute_version": __version__, "method": trained, "model": str(model_dir.resolve()),
                               "encoder": settings.get("encoder", "handcrafted"), "scale": SCALE}}
    files, predicted, truths = [], [], []
    with torch.no_grad(), torch_threads(1):
        for section, measured, pred, result in model.predict_results(stack, prepare, panel, grid, order,
                                                                     run=run_record, check=check):
            with stage("writing"):
                files.append(write_h5ad_atomic(result, out / f"{section.name}.h5ad", force=force))
            shown = [g for g in MARKER_GENES if g in panel] or panel[:N_TOP_FIGURE_GENES]
            predicted.append(pred)
            truths.append(measured)
            pcc = None if measured is None else pearson_columns(pred, measured)[[panel.index(g) for g in shown]]
            files.append(_heatmaps(section, panel, shown, pred, measured, out, pcc=pcc, label="predicted",
                                   library=result.uns["spatial"][section.name]))
            section.image.release()
    record = {"stimpute_version": __version__, "method": trained, "model": str(model_dir), "model_sha256": input_hash(ckpt),
              "seed": settings.get("seed"), **features, "encoder": settings.get("encoder", "handcrafted"),
              "panel": settings["panel"],
              "inputs": input_records(stack, sections), "train": settings.get("train")}
    measured = [m for m in truths if m is not None]
    if measured:  # models from before config.yaml recorded top_hvg: the measured targets' own
        top = settings.get("top_hvg") or [panel[j] for j in top_variable(np.concatenate(measured), N_TOP_SUMMARY)]
        metrics, scores = score_sections(stack.names, predicted, truths, panel, np.array([panel.index(g) for g in top]))
        write_text_atomic(out / "metrics.csv", metrics.to_csv(index=False))
        if summary is not None:
            summary.rows.extend(scores.rows)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(_plain(record), sort_keys=False))
    return files


MODEL_CONFIG_FIELDS = {"method": str, "encoder": str, "weights": (str, type(None)), "weights_sha256": (str, type(None)),
                       "seed": (int, type(None)), "train": (dict, type(None)), "spots": dict,
                       "top_hvg": (list, type(None))}  # what `predict` reads, and its types
SPOT_FIELDS = ("spot_diameter_um", "pitch_um", "um_per_px")  # the training sections' spot geometry and scale (`spot_geometry`)


def read_model_config(path: Path) -> dict:
    """A model folder's `config.yaml` (written by `run_train`), checked where `predict` reads
    it: a mapping with a `panel` of gene names and the fields of `MODEL_CONFIG_FIELDS`;
    anything else is one line naming the file and the problem."""
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({_first_line(exc)})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(path, f"not valid YAML ({getattr(exc, 'problem', None) or _first_line(exc)}{where})") from None
    if not isinstance(settings, dict):
        raise InputError(path, f"not a model config: expected a mapping of settings (method, panel, ...), got {type(settings).__name__}")
    panel = settings.get("panel")
    if not (isinstance(panel, list) and panel and all(isinstance(g, str) and g for g in panel)):
        raise InputError(path, "no gene panel: 'panel' must be a list of gene names (rewrite the model with `stimpute train`)")
    for name, kind in MODEL_CONFIG_FIELDS.items():
        if name in settings and not isinstance(settings[name], kind) or isinstance(settings.get(name), bool):
            raise InputError(path, f"{name!r} is {settings[name]!r}, not a {_type_names(kind)}")
    norm = settings.get("feature_normalisation", "none")
    if norm not in FEATURE_NORMS:
        raise InputError(path, f"'feature_normalisation' is {norm!r}, not one of {', '.join(FEATURE_NORMS)}")
    outside = [g for g in settings.get("top_hvg") or [] if g not in panel]
    if outside:
        raise InputError(path, f"'top_hvg' names {outside[0]!r}, which is not in the panel")
    for name, value in settings.get("spots", {}).items():
        if name not in SPOT_FIELDS or not (value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
                                           and np.isfinite(value) and value > 0):
            raise InputError(path, f"'spots' holds {name}: {value!r}; expected {', '.join(SPOT_FIELDS)}, each > 0")
    return settings


def _type_names(kind) -> str:
    names = {"str": "text", "dict": "mapping", "int": "whole number", "NoneType": "null"}
    return " or ".join(names[k.__name__] for k in (kind if isinstance(kind, tuple) else (kind,)))


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def input_records(stack, sections: Sequence[str | Path]) -> list[dict]:
    """Each section's name, input path and content hash: the inputs recorded beside every output."""
    return [{"section": s.name, "path": str(p), "sha256": input_hash(p)} for s, p in zip(stack, sections)]


def input_hash(path: str | Path) -> str:
    """SHA-256 over an input file, or over every file of an input folder (names and contents);
    of a Space Ranger folder, over the files a section is read from (not its BAM)."""
    path = Path(path)
    h = hashlib.sha256()
    outs = None if path.is_file() else spaceranger_outs(path)
    files = spaceranger_files(outs) if outs is not None else [path] if path.is_file() else path.rglob("*")
    for f in sorted(p for p in files if p.is_file()):
        h.update(f.relative_to(path.parent if path.is_file() else path).as_posix().encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def write_impute_view(block, out: Path) -> list[Path]:
    """`view.html`, the interactive 3D view; a failure to draw it is a warning, never a failed run."""
    from stimpute.view import write_view

    try:
        return [write_view(block, out / VIEW_FILE)]
    except Exception as exc:  # the results are written: the view must not cost them
        warnings.warn(f"{out / VIEW_FILE}: the 3D view was not written ({type(exc).__name__}: {exc}); "
                      f"try `stimpute view {out}`", StimputeWarning, stacklevel=2)
        return []


def _block_figure(parts, gene: str, out: Path) -> tuple:
    """`figures/block_3d.png` (`gene` over every section of the block, stacked in z) as a
    call: the drawing function and its arguments, read from `parts` now."""
    from stimpute.figures import block_view

    values = [np.asarray(p[:, gene].X).ravel() for p in parts]
    return (block_view, [np.array(p.obsm["spatial_3d"]) for p in parts], values, [p.uns["stimpute"]["section"] for p in parts],
            gene, out / "figures" / BLOCK_FIGURE, [bool(p.uns["stimpute"]["measured"]) for p in parts])


def _figure_library(library: dict) -> dict:
    """What `_heatmaps` reads of a section's `uns["spatial"]` library (its `hires` image and
    scale factors), held apart from the library."""
    return {"images": {"hires": library["images"]["hires"]}, "scalefactors": dict(library["scalefactors"])}


@timed("writing")
def _heatmaps(section, panel, genes, predicted, measured, out: Path, pcc=None, label: str = "imputed",
              library: dict | None = None) -> Path:
    """`figures/<section>.png`: the genes' maps at true spot size on the H&E (with PCC where measured).
    `library`: the section's `uns["spatial"]` entry, whose `hires` image is drawn (no second decode)."""
    from stimpute.figures import expression_heatmaps

    cols = [list(panel).index(g) for g in genes]
    if library is not None:
        thumb, scale = np.asarray(library["images"]["hires"]), float(library["scalefactors"]["tissue_hires_scalef"])
    else:
        thumb, scale = section.image.thumbnail(FIGURE_SIDE)
    title = f"{section.name}: {label}" if measured is None else f"{section.name}: {label} and measured"
    shown = np.maximum(predicted[:, cols], 0.0)  # as written: log1p values are clipped at 0, their floor
    return expression_heatmaps(thumb, section.xy * scale, genes, shown, out / "figures" / f"{section.name}.png",
                               None if measured is None else measured[:, cols], title=title,
                               diameter=section.spot_diameter_px * scale, pcc=pcc, label=label)


def _plain(value):
    """YAML-safe plain types (numpy scalars, paths, tuples) recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
