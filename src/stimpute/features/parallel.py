"""Feature extraction shared by several Lightning processes (`--devices/--num-nodes/--strategy`).

Where a command runs as several processes (DDP and its kin: Lightning's launcher starts
the command again for each other local rank at the first `Trainer` run, or `torchrun` and
SLURM start them all; `stimpute.distributed`), `Trainer.predict` shares each section's
spots among them: Lightning's unrepeated distributed sampler hands process r the spots
r, r + P, r + 2P, ... of `stimpute.patches.SpotWindows` (none padded or repeated), each
process encodes its share with a network (on its GPU), and `all_gather_object` gives every process the whole
(n_spots, n_scales, dim) array, since all of them train on it next. Spot indices travel
with the features: each spot is placed by its index, a repeated one counts once, and a
spot no process encoded is an error. On one GPU a network encodes there, through the
same prediction. Strategies that spawn their workers (ddp_spawn, ddp_fork) and one CPU
process encode in the calling process as before (`stimpute.features.spot_features`); the
handcrafted descriptors never come here: one pass over the image (`stimpute.features.dense`)
costs less than sharing it, so every process computes them whole.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from stimpute.errors import StimputeError
from stimpute.features.encoders import Encoder, EncoderSpec
from stimpute.patches import SpotWindows


def prediction_trainer(hardware: dict, spec: EncoderSpec, n_spots: int) -> L.Trainer | None:
    """The Lightning trainer that encodes a section of `n_spots` spots on `hardware`
    (Lightning's accelerator, devices, num_nodes, strategy: `stimpute.trainer.HARDWARE`),
    or None where this process encodes alone (see module docstring)."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from stimpute.trainer import quiet_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(1, **hardware)
    processes = processes_of(trainer)
    if processes == 1:
        return trainer if spec.needs_weights and not isinstance(trainer.accelerator, CPUAccelerator) else None
    command_is_a_rank = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
    return trainer if command_is_a_rank and n_spots >= processes else None


def processes_of(trainer: L.Trainer) -> int:
    """How many processes the trainer runs on (devices per machine × machines)."""
    return trainer.num_devices * trainer.num_nodes


def workers_per_process(trainer: L.Trainer) -> int:
    """Handcrafted descriptor workers of each process: the machine's cores shared by its processes."""
    return max(1, (os.cpu_count() or 1) // trainer.num_devices)


class EncoderModule(L.LightningModule):
    """An `Encoder` for `Trainer.predict`: batches of (spot indices, windows (B, n_scales,
    H, W, 3) uint8) to (spot indices, features (B, n_scales, dim) float32 on the CPU)."""

    def __init__(self, encoder: Encoder, on_batch: Callable[[int], None] | None = None):
        super().__init__()
        self.encoder, self.on_batch = encoder, on_batch
        self.network = encoder.model  # a submodule: Lightning moves it to this process's device

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch if self.network is None else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def predict_step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        index, windows = batch
        b, s = windows.shape[:2]
        feats = self.encoder.encode(windows.flatten(0, 1)).reshape(b, s, -1).float().cpu()
        if self.on_batch is not None:
            self.on_batch(b * s)
        return index.cpu(), feats


def shared_features(spots: SpotWindows, spec: EncoderSpec, weights, random_init: bool, trainer: L.Trainer,
                    batch_size: int, key: str, advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
    """Features (n_spots, n_scales, dim) of every spot, encoded with `spec` (its `weights`,
    or `random_init`) by the trainer's processes together, and how many spots each encoded.
    `key` names what is encoded (the cache key): processes asked for different features
    fail rather than mix them. `advance(n)`: n patches of all processes done (estimated
    from this one's)."""
    encoder = Encoder(spec, weights, random_init, workers_per_process(trainer))
    processes = processes_of(trainer)
    module = EncoderModule(encoder, None if advance is None else lambda n: advance(n * processes))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
        parts = trainer.predict(module, DataLoader(spots, batch_size=batch_size))
    index = torch.cat([p[0] for p in parts]).numpy()
    feats = torch.cat([p[1] for p in parts]).numpy()
    shares = gather((key, index, feats))
    if any(k != key for k, _, _ in shares):
        raise StimputeError(spots.section.source or spots.section.name,
                            "the processes were encoding different features (did they see different feature caches?)")
    return assemble([(i, f) for _, i, f in shares], len(spots), len(spots.sides), encoder.dim)


def gather(share: object) -> list:
    """Every process's `share`, in rank order (just `[share]` in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [share]
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, share)
    return shares


def assemble(shares: list[tuple[np.ndarray, np.ndarray]], n_spots: int, n_scales: int, dim: int) -> tuple[np.ndarray, list[int]]:
    """One (n_spots, n_scales, dim) float32 array from (spot indices, features) shares, each
    spot placed by its index (a spot repeated in several shares counts once, for the first),
    and the number of spots each share added."""
    feats = np.empty((n_spots, n_scales, dim), np.float32)
    done = np.zeros(n_spots, bool)
    counts = []
    for index, values in shares:
        index, first = np.unique(index, return_index=True)
        new = ~done[index]
        feats[index[new]] = values[first[new]]
        done[index[new]] = True
        counts.append(int(new.sum()))
    if not done.all():
        raise RuntimeError(f"{int((~done).sum())} of {n_spots} spots were encoded by no process")
    return feats, counts
