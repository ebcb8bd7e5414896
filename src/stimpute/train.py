"""Train MSAGNet with PyTorch Lightning: seeded, deterministic on CPU, early stopping, resumable.

The whole spot graph of a stack (a few thousand nodes at most) is one batch, so an
epoch is one optimisation step over all labelled spots. A seeded random share of the
known spots is held out for validation (early stopping, best checkpoint) and, later, for
fitting the Cross-layer Imputation weights (`stimpute.impute`). Lightning decides the
hardware (`accelerator`, `devices`); nothing here assumes CUDA. Randomness inside a step
(dropout) is seeded from the step number, so resuming from a checkpoint continues exactly
as an uninterrupted run would. Checkpoints carry a key (SHA-256 of the batch and the
settings): a rerun into the same folder resumes a matching `last.ckpt`, reuses a finished
one, and replaces stale ones in place (no `best-v1.ckpt` beside the old file).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from stimpute.io.anndata_io import atomic_write
from stimpute.models.msagnet import LOSSES, MSAGNet, MSAGNetConfig
from stimpute.trainer import quiet_trainer, split_known, torch_threads  # noqa: F401  (re-exported)
from stimpute.timing import timed


@dataclass
class TrainConfig:
    """Training settings; saved as YAML beside every result (`to_yaml`)."""

    max_epochs: int = 200
    patience: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.25
    seed: int = 0
    accelerator: str = "cpu"
    devices: int | str = 1
    threads: int = 1  # CPU intra-op threads: full-graph steps are small; more threads thrash on a busy machine
    loss: str = "gene_pcc"  # or "spot_pcc", the reference's (stimpute.models.msagnet.LOSSES)
    model: MSAGNetConfig = field(default_factory=MSAGNetConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        values["model"] = MSAGNetConfig(**values.get("model", {}))
        return cls(**values)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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


class GraphData(L.LightningDataModule):
    """The one full-graph batch of a stack, for training and validation (the masks tell them apart)."""

    def __init__(self, batch: GraphBatch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader([self.batch], batch_size=None, collate_fn=_identity)

    val_dataloader = train_dataloader


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

    def validation_step(self, batch: GraphBatch, _idx: int) -> None:
        if batch.val_mask.any():
            loss = self.loss(self(batch)[batch.val_mask], batch.y[batch.val_mask])
        else:  # no held-out spots: monitor the training loss
            loss = self.loss(self(batch)[batch.train_mask], batch.y[batch.train_mask])
        self.log("val_loss", loss, prog_bar=True, batch_size=1)

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
    with torch_threads(config.threads):
        return _fit(batch, config, ckpt_dir, resume, progress)


def _fit(batch, config, ckpt_dir, resume, progress) -> MSAGNetModule:
    L.seed_everything(config.seed, workers=True, verbose=False)
    n, s, d = batch.x.shape
    key = training_key(batch, config)
    module = MSAGNetModule(d, batch.y.shape[1], s, asdict(config.model), config.lr, config.weight_decay, config.seed, key,
                           config.loss)
    module.model.set_feature_scaling(batch.x)
    module.model.set_gene_means(batch.y[batch.train_mask].mean(0))
    if ckpt_dir is not None and resume is None:
        resume, finished = _previous_run(Path(ckpt_dir), key, config)
        if finished:
            return _load_best(module, Path(ckpt_dir) / "best.ckpt")
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(dirpath=ckpt_dir or tmp, filename="best", monitor="val_loss", save_last=True,
                               enable_version_counter=False)
        callbacks = [_early_stopping(config), best]
        progress = progress and sys.stdout.isatty()  # a live bar on a terminal; in a log, one line per refresh
        if progress:
            callbacks.append(RichProgressBar())
        trainer = quiet_trainer(config.max_epochs, callbacks, progress=progress, checkpointing=True,
                                accelerator=config.accelerator, devices=config.devices)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            trainer.fit(module, datamodule=GraphData(batch), ckpt_path=resume)
        if ckpt_dir is not None:  # the final state (early stopping recorded): a rerun sees a finished run
            atomic_write(Path(ckpt_dir) / "last.ckpt", lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))
        return _load_best(module, best.best_model_path)


def training_key(batch: GraphBatch, config: TrainConfig) -> str:
    """SHA-256 of everything training depends on: the batch tensors and the settings."""
    h = hashlib.sha256(config.to_yaml().encode())
    for tensor in (batch.x, batch.edge_index, batch.edge_type, batch.edge_weight, batch.y, batch.train_mask, batch.val_mask):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _previous_run(ckpt_dir: Path, key: str, config: TrainConfig) -> tuple[Path | None, bool]:
    """(`last.ckpt` to resume, whether it is finished) for a matching key; stale checkpoints are deleted."""
    last = ckpt_dir / "last.ckpt"
    if last.is_file() and (ckpt_dir / "best.ckpt").is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=False)
        except Exception:  # cut short by a kill while Lightning wrote it: start afresh
            state = {}
        if state.get("hyper_parameters", {}).get("key") == key:
            stopped = state.get("callbacks", {}).get(_early_stopping(config).state_key, {}).get("stopped_epoch", 0) > 0
            return last, stopped or state["epoch"] + 1 >= config.max_epochs
    for old in [*ckpt_dir.glob("best*.ckpt"), *ckpt_dir.glob("last*.ckpt")]:
        old.unlink()
    return None, False


def _early_stopping(config: TrainConfig) -> EarlyStopping:
    """Lightning's early stopping on the held-out loss; its `state_key` finds its state in a checkpoint."""
    return EarlyStopping("val_loss", patience=config.patience)


def _load_best(module: MSAGNetModule, path: str | Path) -> MSAGNetModule:
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    module.eval()
    return module


def _identity(item):
    return item
