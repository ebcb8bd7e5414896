"""MSAGNet as a `Model`, in its two variants (`stimpute.models.msagnet`):

- `msagnet_2d` (the ASIGN paper's "ASIGN 2D" row; `stimpute train --method msagnet_2d`): the
  network sees each section's within-section spot graph and no cross-layer edges, so it
  runs in the 2D protocol (train on some sections, predict others from their H&E alone) as
  well as the 3D one.
- `msagnet_3d`: the 3D graph with cross-layer edges; ASIGN's image member
  (`stimpute.models.asign`), and alone in the benchmark.

Both train on the known spots outside a seeded hold-out (`graph_batch`) and are saved as
the Lightning checkpoint `checkpoints/best.ckpt` of a model folder. The old name `msagnet`
meant the 2D model to `stimpute train` (and in model folders) and the 3D net in the benchmark.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stimpute.errors import InputError
from stimpute.files import atomic_write
from stimpute.models.base import Model, register_method
from stimpute.models.msagnet import MSAGNetConfig
from stimpute.prepare import PreparedStack
from stimpute.trainer import lightning_checkpoint, split_known


def held_out(prepared: PreparedStack, known: list[int], seed: int, val_fraction: float) -> dict[int, np.ndarray]:
    """Per known section, the mask of its spots held out of training (seeded, over all known spots)."""
    off = prepared.offsets
    held = split_known(int(sum(off[i + 1] - off[i] for i in known)), val_fraction, seed)
    return dict(zip(known, np.split(held, np.cumsum([off[i + 1] - off[i] for i in known])[:-1])))


def graph_batch(prepared: PreparedStack, known: list[int], seed: int, val_fraction: float):
    """Tensors for training on the known sections (labels on their spots, a seeded hold-out
    of them for validation: `held_out`)."""
    from stimpute.models.msagnet_training import GraphBatch

    off = prepared.offsets
    y = np.zeros((off[-1], len(prepared.panel)), np.float32)
    train_mask = np.zeros(off[-1], bool)
    val_mask = np.zeros(off[-1], bool)
    for i, held in held_out(prepared, known, seed, val_fraction).items():
        y[off[i]:off[i + 1]] = prepared.known_expression(i)
        train_mask[off[i]:off[i + 1]] = ~held
        val_mask[off[i]:off[i + 1]] = held
    g = prepared.graph
    return GraphBatch(
        x=torch.as_tensor(np.concatenate(prepared.features), dtype=torch.float32),
        edge_index=g.edge_index, edge_type=g.edge_type, edge_weight=g.edge_weight.float(),
        y=torch.as_tensor(y), train_mask=torch.as_tensor(train_mask), val_mask=torch.as_tensor(val_mask),
        pos=getattr(g, "pos", None),
    )


class MSAGNetModel(Model):
    """MSAGNet trained on the known spots of a stack's graph. `config` is a
    `stimpute.models.msagnet_training.TrainConfig` (training settings and the network's sizes)."""

    saved = "checkpoints/best.ckpt"
    epochs_field = "max_epochs"
    variant = ""

    def __init__(self, config=None, max_epochs: int | None = None, **options):
        super().__init__(config, **options)
        if max_epochs is not None:  # the benchmark's option
            self.config = replace(self.config, max_epochs=max_epochs)
        self.module_ = None

    @classmethod
    def default_config(cls):
        from stimpute.models.msagnet_training import TrainConfig

        # the image-only model keeps its schedule (patience 20, every gain counts, lr 1e-3): ASIGN's shorter
        # one was chosen on ASIGN's validation protocol, not on this model
        return TrainConfig(patience=20, min_delta=0.0, lr=1e-3, model=MSAGNetConfig(variant=cls.variant))

    def settings(self) -> dict:
        return self.config.to_dict()

    def fit(self, prepared: PreparedStack, train: list[int], seed: int = 0, checkpoints: Path | None = None,
            progress: bool = False) -> "MSAGNetModel":
        """Train on every spot graph of `prepared` with labels on `train`; `checkpoints` keeps
        `best.ckpt`/`last.ckpt` (a rerun with the same inputs resumes or reuses them)."""
        from stimpute.models.msagnet_training import fit

        self.config = replace(self.config, seed=seed)
        batch = graph_batch(prepared, list(train), seed, self.config.val_fraction)
        self.module_ = fit(batch, self.config, ckpt_dir=checkpoints, progress=progress)
        return self

    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        from stimpute.models.msagnet_training import GraphBatch, predict_graph, threads_for
        from stimpute.threads import torch_threads

        g = prepared.graph
        x = torch.as_tensor(np.concatenate(prepared.features), dtype=torch.float32)
        unlabelled = torch.zeros(len(x), dtype=torch.bool)
        batch = GraphBatch(x, g.edge_index, g.edge_type, g.edge_weight.float(), torch.zeros(len(x), 0), unlabelled,
                           unlabelled, getattr(g, "pos", None))
        off = prepared.offsets
        nodes = torch.cat([torch.arange(off[i], off[i + 1]) for i in targets])
        with torch_threads(threads_for(self.config, len(x))):
            out = predict_graph(self.module_.model, batch, self.config.batch_nodes, nodes).numpy()
        ends = np.cumsum([off[i + 1] - off[i] for i in targets])
        return {i: np.asarray(part, np.float32) for i, part in zip(targets, np.split(out, ends[:-1]))}

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.saved
        atomic_write(path, lambda tmp: torch.save(lightning_checkpoint(self.module_), tmp))
        return path

    @classmethod
    def load(cls, folder: Path) -> "MSAGNetModel":
        from stimpute.models.msagnet_training import MSAGNetModule, TrainConfig

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


@register_method
class MSAGNet2D(MSAGNetModel):
    """MSAGNet (2D variant: within-section graph, no cross-layer edges) from images alone."""

    name = "msagnet_2d"
    variant = "2d"


@register_method
class MSAGNet3D(MSAGNetModel):
    """MSAGNet on the 3D graph (cross-layer edges): ASIGN's image member, alone."""

    name = "msagnet_3d"
    variant = "3d"
    needs_3d = True
