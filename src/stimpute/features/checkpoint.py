"""Loading local weight files into stimpute's encoders, whatever wrapper they were saved in.

Accepted layouts: a bare state dict (torchvision `resnet18-*.pth`, UNI's timm
`pytorch_model.bin`) or a training checkpoint holding it under
`state_dict` / `model` (Lightning, e.g. Ciga et al.'s `tenpercent_resnet18.ckpt`).
Wrapper prefixes (`model.`, `resnet.`, `module.`, ...) are stripped and projection /
classification heads dropped; what is then left must match the model exactly, else the
error names the missing and unexpected keys.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stimpute.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

WRAPPER_PREFIXES = ("module.", "model.", "resnet.", "backbone.", "encoder.", "_orig_mod.")
HEAD_PREFIXES = ("fc.", "_fc.", "head.", "projector.", "projection_head.", "classifier.")
SHOWN_KEYS = 8


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, unwrapped from `state_dict` / `model` containers.
    `mmap`: map the tensors instead of reading them (where the file's format allows it)."""
    import torch

    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format, not legacy files
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            # Training checkpoints pickle their hyper-parameters; the user named this file as
            # trusted weights, as torch.load did by default before 2.6.
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # not a torch file at all (the fallback's error says why)
        raise InputError(path, f"cannot read weight file ({str(exc).splitlines()[0]})") from None
    for container in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(container), dict):
            obj = obj[container]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise InputError(path, "not a state dict: expected a mapping of parameter names to tensors")
    return obj


def fit_state_dict(state: dict[str, torch.Tensor], model: nn.Module, source: str | Path, arch: str) -> dict:
    """`state` renamed to `model`'s keys: wrapper prefixes stripped, heads dropped, checked."""
    renamed = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if not key.startswith(HEAD_PREFIXES):
            renamed[key] = value
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed]
    unexpected = [k for k in renamed if k not in expected]
    wrong = [f"{k} {tuple(renamed[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items() if k in renamed and renamed[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{' ...' if len(keys) > SHOWN_KEYS else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
        raise InputError(source, f"weights do not fit the {arch} architecture: " + "; ".join(parts))
    return renamed


def load_weights(model: nn.Module, path: str | Path, arch: str) -> nn.Module:
    """Load a weight file into `model` exactly (see module docstring for accepted layouts)."""
    model.load_state_dict(fit_state_dict(read_state_dict(path), model, path, arch), strict=True)
    return model


def check_weights(path: str | Path, build: Callable[[], nn.Module], arch: str) -> None:
    """Refuse a weight file that cannot be read or does not fit `arch` (what `load_weights`
    would refuse), cheaply: the tensors are mapped, not read, and the model is built on the
    meta device (names and shapes only), so even UNI's ViT-L is checked in about a second."""
    import torch

    with torch.device("meta"):
        model = build()
    fit_state_dict(read_state_dict(path, mmap=True), model, path, arch)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (weights identify cached features)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
