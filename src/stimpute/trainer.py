"""Training pieces every model shares (a leaf below `models` and `train`): the Lightning
trainer factory (its `accelerator` from `stimpute.device`), the seeded held-out split of
known spots. Lightning is imported where a trainer is made: importing this module stays
cheap (`stimpute.preload`); thread limits are `stimpute.threads`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import lightning as L


def split_known(n_known: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out (validation) spots among `n_known` known spots, seeded."""
    rng = np.random.default_rng(seed)
    held = np.zeros(n_known, bool)
    held[rng.permutation(n_known)[: int(round(val_fraction * n_known))]] = True
    return held


HARDWARE = ("accelerator", "devices", "num_nodes", "strategy")  # config fields handed to the Lightning trainer


def quiet_trainer(max_epochs: int, callbacks=(), *, progress: bool = False, checkpointing: bool = False,
                  accelerator: str = "cpu", devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto",
                  **options) -> L.Trainer:
    """The Lightning trainer every stimpute model trains with: deterministic (on CPU; "warn"
    elsewhere), no logger or model summary, no sanity validation, and without Lightning's
    per-fit banner. Lightning's own `devices`, `num_nodes` and `strategy` (e.g. "ddp")
    run it on several GPUs, processes or machines: no code of ours."""
    import lightning as L

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available"/tips banner on every fit
    return L.Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        deterministic=True if accelerator == "cpu" else "warn",
        callbacks=list(callbacks), logger=False, enable_checkpointing=checkpointing, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, **options,
    )


def lightning_flags(config) -> dict:
    """The Lightning trainer flags a model's config records (`accelerator`, `devices`,
    `num_nodes`, `strategy`; from `--device` and `stimpute.device.parallel_options`)."""
    return {name: getattr(config, name) for name in HARDWARE if hasattr(config, name)}


def lightning_checkpoint(module: L.LightningModule) -> dict:
    """A checkpoint of a trained module's weights that `Module.load_from_checkpoint` reads
    (what `Trainer.save_checkpoint(weights_only=True)` writes, without needing the trainer)."""
    import lightning as L

    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__}
