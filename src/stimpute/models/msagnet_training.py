"""Train MSAGNet with PyTorch Lightning: seeded, deterministic on CPU, early stopping, resumable.

Where the spot graph of a stack fits the node budget `batch_nodes` (`--batch-nodes`;
HER2-ST's few hundred spots, Visium stacks of a few sections) the whole graph is one
batch, so an epoch is one optimisation step over all labelled spots. Beyond it, training
reads the 2-hop in-neighbourhood of the labelled spots (the same loss), or mini-batches:
bands of labelled spots with their in-neighbourhoods; inference runs in chunks: peak
memory is set by `batch_nodes`, not by the stack (`stimpute.batches`). A seeded random
share of the known spots is held out for validation (early stopping, best checkpoint)
and, later, for fitting the Cross-layer Imputation weights (`stimpute.models.asign`). Lightning
decides the hardware (`accelerator`, `devices`, `num_nodes`, `strategy`: DDP splits the
batches over the processes); nothing here assumes CUDA. Randomness inside a step
(dropout) is seeded from the step number, and the order of mini-batches from the epoch,
so resuming from a checkpoint continues exactly as an uninterrupted run would.
Checkpoints carry a key (SHA-256 of the batch and the settings): a rerun into the same
folder resumes a matching `last.ckpt`, reuses a finished one, and replaces stale ones in
place (no `best-v1.ckpt` beside the old file). Only the process of global rank 0 writes.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from stimpute.batches import (Hops, SubgraphBatch, bounded_runs, in_neighbourhood, node_chunks, restrict, seed_mask,
                              spatial_order)
from stimpute.errors import StimputeWarning
from stimpute.files import atomic_write
from stimpute.files import record_write
from stimpute.models.msagnet import LOSSES, MSAGNet, MSAGNetConfig, TrainConfig  # noqa: F401  (TrainConfig re-exported)
from stimpute.threads import threads_for_size, torch_threads
from stimpute.trainer import lightning_flags, quiet_trainer, split_known  # noqa: F401  (re-exported)
from stimpute.timing import timed



@dataclass
class GraphBatch:
    """Tensors of one stack: features (N, S, D), graph, labels (N, G; rows valid where masked)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_type: torch.Tensor
    edge_weight: torch.Tensor
    y: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    pos: torch.Tensor | None = None  # (N, 3) node positions: inference chunks go in spatial order


class GraphData(L.LightningDataModule):
    """A stack's graph for training and validation (the masks tell them apart): one batch
    (the whole graph, or the in-neighbourhood of the labelled spots) when it fits
    `budget` nodes and one process trains; else bands of labelled spots with their
    in-neighbourhoods, at least `parts` (the number of processes) of them
    (`stimpute.batches`). Validation reads the same batches; without held-out spots it
    monitors the training spots."""

    def __init__(self, batch: GraphBatch, budget: int, hops: Hops = MSAGNet.reach, parts: int = 1, seed: int = 0,
                 band_spots: int | None = None):
        super().__init__()
        self.batch, self.seed = batch, seed
        self.plan = training_plan(batch, budget, hops, parts, band_spots)
        self.monitor = "val_mask" if batch.val_mask.any() else "train_mask"

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val_mask")

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.monitor)

    def _loader(self, monitor: str) -> torch.utils.data.DataLoader:
        if self.plan is None:  # the one batch: the whole graph
            batch = replace(self.batch, val_mask=getattr(self.batch, monitor))
            return torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=_identity)
        return torch.utils.data.DataLoader(_Subgraphs(self.batch, self.plan, monitor), batch_size=None,
                                           collate_fn=_identity, sampler=_EpochOrder(len(self.plan), self.seed, self._epoch))

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0


def training_plan(batch: GraphBatch, budget: int, hops: Hops, parts: int = 1,
                  band_spots: int | None = None) -> list[SubgraphBatch] | None:
    """The subgraphs `batch` trains on (`stimpute.batches` module docstring); None: the whole
    graph. Beyond `band_spots` labelled spots the labelled spots are cut into bands of at
    most that many, one optimiser step each: a big known section takes several steps an
    epoch instead of one."""
    n = batch.x.shape[0]
    labelled = torch.nonzero(batch.train_mask | batch.val_mask).flatten()
    parts = max(parts, -(-len(labelled) // band_spots) if band_spots else 1)
    if parts == 1:
        sub = in_neighbourhood(labelled, batch.edge_index, n, hops, batch.edge_type)
        if len(sub.nodes) == n and n <= budget:
            return None  # every node is within reach: the whole graph
        if len(sub.nodes) <= budget:
            return [sub]  # sections beyond the labelled spots' reach cost nothing
    return bounded_runs(spatial_order(labelled, batch.pos), batch.edge_index, n, hops, budget, parts,
                        edge_type=batch.edge_type)


def schedule(config: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(max epochs, early-stopping patience) for `steps_per_epoch` optimiser steps an epoch:
    `max_epochs` and `patience` count steps' worth of full-graph epochs, so a known section
    cut into k bands trains k times fewer epochs (as many optimiser steps) and stops after
    as many steps without improvement; one step an epoch (HER2-ST) keeps them as set."""
    k = max(1, steps_per_epoch)
    return max(1, -(-config.max_epochs // k)), max(2, -(-config.patience // k))


def threads_for(config: TrainConfig, n_nodes: int) -> int:
    """Intra-op threads: `config.threads`, or with 0 one thread below `LARGE_GRAPH_NODES`
    nodes (small steps gain nothing from sharing) and every core from there."""
    return config.threads or threads_for_size(n_nodes)


class _Subgraphs(torch.utils.data.Dataset):
    """Subgraph batches cut from the graph when read (memory: one batch at a time). The
    loss masks hold the batch's seed spots only (its other nodes are context); `val_mask`
    is the `monitor` mask (the training spots where none is held out)."""

    def __init__(self, batch: GraphBatch, plan: list[SubgraphBatch], monitor: str):
        self.batch, self.plan, self.monitor = batch, plan, monitor

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> GraphBatch:
        sub = self.plan[i]
        seeds = seed_mask(sub)
        return restrict(self.batch, sub, train_mask=self.batch.train_mask[sub.nodes] & seeds,
                        val_mask=getattr(self.batch, self.monitor)[sub.nodes] & seeds)


class _EpochOrder(torch.utils.data.Sampler):
    """Batches in a seeded random order drawn anew each epoch from (seed, `epoch()`, the
    trainer's epoch when the epoch's iteration starts): a resumed run sees the order an
    uninterrupted one would (Lightning's `set_epoch` comes too late on a resumed run's first epoch)."""

    def __init__(self, n: int, seed: int, epoch):
        self.n, self.seed, self.epoch = n, seed, epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1009 + self.epoch())
        return iter(torch.randperm(self.n, generator=generator).tolist())


@torch.no_grad()
def predict_graph(model: MSAGNet, batch: GraphBatch, budget: int, nodes: torch.Tensor | None = None) -> torch.Tensor:
    """(len(nodes), n_genes) prediction at `nodes` (default every node, in order): one pass
    when the graph fits `budget` nodes, else chunk by chunk over the in-neighbourhoods of
    runs of `nodes` of at most `budget` nodes (same values), so a few sections of a large
    stack cost their own reach, not the whole graph's."""
    n = batch.x.shape[0]
    if n <= budget:
        out = model(batch.x, batch.edge_index, batch.edge_type, batch.edge_weight)
        return out if nodes is None else out[nodes]
    row = torch.arange(n) if nodes is None else torch.full((n,), -1, dtype=torch.long).index_put_(
        (nodes,), torch.arange(len(nodes)))
    out = torch.empty(n if nodes is None else len(nodes), model.head[-1].out_features)
    for sub in node_chunks(n, batch.edge_index, model.reach, budget, batch.pos, batch.edge_type, nodes):
        part = restrict(batch, sub)
        out[row[sub.nodes[sub.seeds]]] = model(part.x, part.edge_index, part.edge_type, part.edge_weight)[sub.seeds]
    return out


class MSAGNetModule(L.LightningModule):
    """Lightning wrapper: full-graph steps, spot loss on train / validation masks."""

    def __init__(self, in_dim: int, n_genes: int, n_scales: int, model: dict, lr: float, weight_decay: float, seed: int,
                 key: str = "", loss: str = "gene_pcc"):
        super().__init__()
        self.save_hyperparameters()
        self.model = MSAGNet(in_dim, n_genes, n_scales, MSAGNetConfig(**model))
        self.loss = LOSSES[loss]

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        return self.model(batch.x, batch.edge_index, batch.edge_type, batch.edge_weight)

    def training_step(self, batch: GraphBatch, _idx: int) -> torch.Tensor:
        torch.manual_seed(self.hparams.seed * 100_003 + self.global_step)  # dropout: a function of the step
        loss = self.loss(self(batch)[batch.train_mask], batch.y[batch.train_mask])
        self.log("loss", loss, prog_bar=True, batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.held = []

    def validation_step(self, batch: GraphBatch, _idx: int) -> None:
        self.held.append((self(batch)[batch.val_mask], batch.y[batch.val_mask]))

    def on_validation_epoch_end(self) -> None:
        """The loss over every held-out spot of the epoch's batches (of this process)."""
        pred, truth = (torch.cat(part) for part in zip(*self.held))
        # every process must see the same value: checkpointing and early stopping decide on it
        self.log("val_loss", self.loss(pred, truth), prog_bar=True, batch_size=1, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@timed("training")
def fit(batch: GraphBatch, config: TrainConfig, ckpt_dir: str | Path | None = None,
        resume: str | Path | None = None, progress: bool = False) -> MSAGNetModule:
    """Train on `batch` and return the module with the best validation weights loaded.

    `ckpt_dir`: where `best.ckpt` and `last.ckpt` go (a temporary folder if None); a
    `last.ckpt` there with this batch's and config's key is resumed (or, if finished, reused);
    `resume`: a checkpoint to continue from instead (same batch and config).
    """
    with torch_threads(threads_for(config, batch.x.shape[0])):
        return _fit(batch, config, ckpt_dir, resume, progress)


def _fit(batch, config, ckpt_dir, resume, progress) -> MSAGNetModule:
    L.seed_everything(config.seed, workers=True, verbose=False)
    n, s, d = batch.x.shape
    key = training_key(batch, config)
    module = MSAGNetModule(d, batch.y.shape[1], s, asdict(config.model), config.lr, config.weight_decay, config.seed, key,
                           config.loss)
    module.model.set_feature_scaling(batch.x)
    module.model.set_gene_means(batch.y[batch.train_mask].mean(0))
    with tempfile.TemporaryDirectory() as tmp:
        best = RecordedCheckpoint(dirpath=ckpt_dir or tmp, filename="best", monitor="val_loss", save_last=True,
                               enable_version_counter=False)
        early = _early_stopping(config.patience, config.min_delta)
        callbacks = [early, best]
        progress = progress and sys.stdout.isatty()  # a live bar on a terminal; in a log, one line per refresh
        if progress:
            callbacks.append(RichProgressBar())
        trainer = quiet_trainer(config.max_epochs, callbacks, progress=progress, checkpointing=True,
                                **lightning_flags(config))
        data = GraphData(batch, config.batch_nodes, parts=trainer.world_size, seed=config.seed,
                         band_spots=config.band_spots)
        steps = len(data.plan) // trainer.world_size if data.plan else 1  # optimiser steps an epoch, per process
        trainer.fit_loop.max_epochs, early.patience = schedule(config, steps)
        if ckpt_dir is not None and resume is None:
            resume, finished = _previous_run(Path(ckpt_dir), key, trainer.fit_loop.max_epochs)
            if finished:
                return _load_best(module, Path(ckpt_dir) / "best.ckpt")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            trainer.fit(module, datamodule=data, ckpt_path=resume)
        if ckpt_dir is not None:  # the final state (early stopping recorded): a rerun sees a finished run
            _save_last(trainer, Path(ckpt_dir) / "last.ckpt")
        module = _load_best(module, best.best_model_path)
        trainer.strategy.barrier("stimpute.best")  # every process has read the best weights before rank 0 moves on
        return module


class RecordedCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, recording each file in the run's manifest as it writes
    it (`stimpute.files.record_write`): a killed run's checkpoints stay its own.

    The files are written every `WRITE_EVERY` epochs (the first included) and when training
    ends, not at each improvement: an epoch of a small graph costs less than writing two
    checkpoints. In between, each checkpoint is kept in memory as Lightning would have
    written it then, so the files are the same; a killed run resumes from the last written."""

    WRITE_EVERY = 10

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: dict[str, dict] = {}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.pending[filepath] = _frozen(trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only))
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.current_epoch % self.WRITE_EVERY == 0:
            self.write_pending(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_pending(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.write_pending(trainer, wait=False)  # an interrupted run resumes from the latest state; other processes may be gone

    def write_pending(self, trainer: L.Trainer, wait: bool = True) -> None:
        """Write the checkpoints kept since the last write (every process calls it; rank 0
        writes; `wait`: the processes go on together, as after Lightning's own writes)."""
        for filepath, checkpoint in self.pending.items():
            record_write(filepath)
            trainer.strategy.save_checkpoint(checkpoint, filepath)
        self.pending.clear()
        if wait:
            trainer.strategy.barrier("stimpute.checkpoints")


def _frozen(state):
    """`state` (a checkpoint's nested dicts and lists) with every tensor copied: the weights
    and optimiser moments it refers to change in place as training goes on."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return type(state)((k, _frozen(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(_frozen(v) for v in state)
    return state


def _save_last(trainer: L.Trainer, path: Path) -> None:
    """Lightning's full checkpoint of the final state at `path`, atomically; every process
    calls it (it synchronises them), only global rank 0 writes."""
    if trainer.is_global_zero:
        atomic_write(path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))
    else:
        trainer.save_checkpoint(path, weights_only=False)


def training_key(batch: GraphBatch, config: TrainConfig) -> str:
    """SHA-256 of everything training depends on: the batch tensors and the settings."""
    h = hashlib.sha256(config.to_yaml().encode())
    for tensor in (batch.x, batch.edge_index, batch.edge_type, batch.edge_weight, batch.y, batch.train_mask, batch.val_mask):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _previous_run(ckpt_dir: Path, key: str, max_epochs: int) -> tuple[Path | None, bool]:
    """(`last.ckpt` to resume, whether it is finished) for a matching key, where both it and
    `best.ckpt` read whole; stale or unreadable checkpoints are deleted (a miss: training
    starts afresh)."""
    last, best = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    if last.is_file() and best.is_file():
        state = _read_checkpoint(last)
        if state.get("hyper_parameters", {}).get("key") == key and _read_checkpoint(best):
            stopped = state.get("callbacks", {}).get(_early_stopping().state_key, {}).get("stopped_epoch", 0) > 0
            return last, stopped or state["epoch"] + 1 >= max_epochs
    for old in [*ckpt_dir.glob("best*.ckpt"), *ckpt_dir.glob("last*.ckpt")]:
        old.unlink()
    return None, False


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint's content; {} with a warning where it does not load (damaged, cut short)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "state_dict" in state:
            return state
        problem = "not a Lightning checkpoint"
    except Exception as exc:
        problem = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    warnings.warn(f"{path}: unreadable checkpoint ({problem}); the model is trained afresh", StimputeWarning, stacklevel=2)
    return {}


def _early_stopping(patience: int = TrainConfig.patience, min_delta: float = TrainConfig.min_delta) -> EarlyStopping:
    """Lightning's early stopping on the held-out loss; its `state_key` (the same for any
    patience and min_delta) finds its state in a checkpoint."""
    return EarlyStopping("val_loss", patience=patience, min_delta=min_delta)


def _load_best(module: MSAGNetModule, path: str | Path) -> MSAGNetModule:
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    module.eval()
    return module


def _identity(item):
    return item
