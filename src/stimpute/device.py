"""The device policy of every command that trains (`--device cpu|cuda|auto`).

`resolve_device` turns the choice into Lightning's `accelerator` ("cpu" or "cuda"); each
model's config records it (`accelerator`) and hands it to `stimpute.trainer.quiet_trainer`,
so Lightning places the model and data, and its own `devices`/`strategy` flags choose one
GPU or several (DDP) without code of ours. Training on the CPU runs with deterministic
algorithms; on a GPU, nondeterministic operations only warn. Prediction runs on the CPU.
"""

from __future__ import annotations

import torch

from stimpute.errors import StimputeError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """Lightning's `accelerator` for `--device`: "cpu", or "cuda" where a GPU is usable
    ("auto" picks it when there is one); asking for "cuda" without one is an error."""
    if device not in DEVICES:
        raise StimputeError("--device", f"unknown device {device!r} (use {', '.join(DEVICES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise StimputeError("--device", "cuda was asked for but no CUDA GPU is available here (use --device cpu or auto)")
    return "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
