"""MSAGNet's 2D variant as a model (the ASIGN paper's "ASIGN 2D" row; `stimpute train --method msagnet`).

Images only: the network sees each section's within-section spot graph and no
cross-layer edges, so it runs in the 2D protocol (train on some sections, predict others
from their H&E alone) as well as the 3D one. Saved as the Lightning checkpoint
`checkpoints/best.ckpt` of a model folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stimpute.errors import InputError
from stimpute.files import atomic_write
from stimpute.models.base import Model, register_method
from stimpute.prepare import PreparedStack
from stimpute.models.msagnet import MSAGNetConfig
from stimpute.trainer import lightning_checkpoint


@register_method
class MSAGNet2DMethod(Model):
    """MSAGNet (2D variant: within-section graph, no cross-layer edges) from images alone.

    `config` is a `stimpute.train.TrainConfig` (training settings and the network's sizes).
    """

    name = "msagnet2d"
    model_name = "msagnet"  # what `stimpute train --method` has always called it; benchmark "msagnet" is ASIGN's 3D net
    saved = "checkpoints/best.ckpt"
    epochs_field = "max_epochs"

    def __init__(self, config=None, max_epochs: int | None = None, **options):
        super().__init__(config, **options)
        if max_epochs is not None:  # the benchmark's option
            self.config = replace(self.config, max_epochs=max_epochs)
        self.module_ = None

    @classmethod
    def default_config(cls):
        from stimpute.train import TrainConfig

        return TrainConfig(model=MSAGNetConfig(variant="2d"))

    def settings(self) -> dict:
        return self.config.to_dict()

    def fit(self, prepared: PreparedStack, train: list[int], seed: int = 0, checkpoints: Path | None = None,
            progress: bool = False) -> "MSAGNet2DMethod":
        """Train on every spot graph of `prepared` with labels on `train`; `checkpoints` keeps
        `best.ckpt`/`last.ckpt` (a rerun with the same inputs resumes or reuses them)."""
        from stimpute.impute import graph_batch
        from stimpute.train import fit

        self.config = replace(self.config, seed=seed)
        batch, _ = graph_batch(prepared, list(train), seed, self.config.val_fraction)
        self.module_ = fit(batch, self.config, ckpt_dir=checkpoints, progress=progress)
        return self

    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        from stimpute.train import GraphBatch, predict_graph, threads_for, torch_threads

        g = prepared.graph
        x = torch.as_tensor(np.concatenate(prepared.features), dtype=torch.float32)
        unlabelled = torch.zeros(len(x), dtype=torch.bool)
        batch = GraphBatch(x, g.edge_index, g.edge_type, g.edge_weight.float(), torch.zeros(len(x), 0), unlabelled,
                           unlabelled, getattr(g, "pos", None))
        with torch_threads(threads_for(self.config, len(x))):
            out = predict_graph(self.module_.model, batch, self.config.batch_nodes).numpy()
        off = prepared.offsets
        return {i: np.asarray(out[off[i]:off[i + 1]], np.float32) for i in targets}

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.saved
        atomic_write(path, lambda tmp: torch.save(lightning_checkpoint(self.module_), tmp))
        return path

    @classmethod
    def load(cls, folder: Path) -> "MSAGNet2DMethod":
        from stimpute.train import MSAGNetModule, TrainConfig

        path = Path(folder) / cls.saved
        try:
            module = MSAGNetModule.load_from_checkpoint(path, map_location="cpu").eval()
        except (OSError, KeyError, RuntimeError) as exc:
            raise InputError(path, f"not an MSAGNet checkpoint ({type(exc).__name__}: {exc})") from None
        h = module.hparams
        config = TrainConfig(lr=h.lr, weight_decay=h.weight_decay, seed=h.seed, loss=h.get("loss", "gene_pcc"),
                             model=MSAGNetConfig(**h.model))
        model = cls(config)
        model.module_ = module
        return model
