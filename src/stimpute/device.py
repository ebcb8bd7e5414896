"""The device policy of every command that trains (`--device cpu|cuda|auto`, and
Lightning's own `--devices/--num-nodes/--strategy`).

`resolve_device` turns the choice into Lightning's `accelerator` ("cpu" or "cuda"); each
model's config records it (`accelerator`) and hands it to `stimpute.trainer.quiet_trainer`,
so Lightning places the model and data, and its own `devices`/`strategy` flags choose one
GPU or several (DDP) without code of ours. Training on the CPU runs with deterministic
algorithms; on a GPU, nondeterministic operations only warn. Prediction runs on the CPU.

`parallel_options` checks `--devices/--num-nodes/--strategy` by building (not running) the
Lightning trainer they describe, so a bad value is one error line before any work; only
global rank 0 writes outputs (`stimpute.distributed`).
"""

from __future__ import annotations

from stimpute.errors import StimputeError

DEVICES = ("auto", "cpu", "cuda")
ONE_PROCESS = {"devices": 1, "num_nodes": 1, "strategy": "auto"}  # the defaults: one process, one device


def resolve_device(device: str = "auto") -> str:
    """Lightning's `accelerator` for `--device`: "cpu", or "cuda" where a GPU is usable
    ("auto" picks it when there is one); asking for "cuda" without one is an error."""
    if device not in DEVICES:
        raise StimputeError("--device", f"unknown device {device!r} (use {', '.join(DEVICES)})")
    if device == "cpu":
        return "cpu"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise StimputeError("--device", "cuda was asked for but no CUDA GPU is available here (use --device cpu or auto)")
    return "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"


def parallel_options(accelerator: str, devices: str = "1", num_nodes: int = 1, strategy: str = "auto") -> dict:
    """Lightning's `devices`, `num_nodes` and `strategy` from the command line, checked
    against `accelerator`: `devices` a count (-1: all), "auto" or GPU ids ("0,2");
    `strategy` one of Lightning's ("auto", "ddp", "ddp_spawn", "fsdp", ...)."""
    text = str(devices).strip()
    count = text.lstrip("-").isdigit()
    value: int | str = int(text) if count else text
    gpu_ids = text == "auto" or (text and all(part.strip().isdigit() for part in text.split(",")))
    if (value == 0 or value < -1) if count else not gpu_ids:
        raise StimputeError("--devices", f"{devices!r} is not a device count ≥ 1, -1 (all), auto or a list of GPU ids")
    if num_nodes < 1:
        raise StimputeError("--num-nodes", f"must be ≥ 1, got {num_nodes}")
    options = {"devices": value, "num_nodes": int(num_nodes), "strategy": strategy}
    if options != ONE_PROCESS:  # always valid: `stimpute features` then need not import Lightning
        _check_with_lightning(accelerator, options)
    return options


def _check_with_lightning(accelerator: str, options: dict) -> None:
    """Build the trainer the options describe (nothing runs); Lightning's refusal becomes one line."""
    import warnings

    from lightning.pytorch.strategies import StrategyRegistry

    from stimpute.trainer import quiet_trainer

    known = ["auto", *StrategyRegistry.available_strategies()]
    if options["strategy"] not in known:
        raise StimputeError("--strategy", f"unknown strategy {options['strategy']!r} (Lightning's: {', '.join(known[:6])}, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(1, accelerator=accelerator, **options)
    except Exception as exc:  # MisconfigurationException, ValueError, RuntimeError: Lightning's own words
        message = " ".join(str(exc).split())
        raise StimputeError("--devices/--num-nodes/--strategy", f"Lightning refuses {options} on {accelerator}: {message}") from None


def check_batch_nodes(batch_nodes: int) -> int:
    """`--batch-nodes`: the node budget of one graph batch (`stimpute.batches`), a positive count."""
    if batch_nodes < 1:
        raise StimputeError("--batch-nodes", f"must be a positive number of nodes, got {batch_nodes}")
    return int(batch_nodes)
