"""MSAGNet's 2D variant as a benchmark method (the ASIGN paper's "ASIGN 2D" row).

Images only: the network sees each section's within-section spot graph and no
cross-layer edges, so it runs in the 2D protocol (train on some sections, predict others
from their H&E alone) as well as the 3D one.
"""

from __future__ import annotations

import numpy as np
import torch

from stimpute.models.base import Method, register_method
from stimpute.models.msagnet import MSAGNetConfig


@register_method
class MSAGNet2DMethod(Method):
    """MSAGNet (2D variant: within-section graph, no cross-layer edges) from images alone."""

    name = "msagnet2d"

    def __init__(self, max_epochs: int = 200):
        self.max_epochs = max_epochs

    def fit_predict(self, prepared, train, targets, seed=0):
        from stimpute.impute import graph_batch
        from stimpute.train import TrainConfig, fit, torch_threads

        config = TrainConfig(seed=seed, max_epochs=self.max_epochs, model=MSAGNetConfig(variant="2d"))
        batch, _ = graph_batch(prepared, list(train), config.seed, config.val_fraction)
        module = fit(batch, config)
        with torch.no_grad(), torch_threads(config.threads):
            out = module(batch).numpy()
        off = prepared.offsets
        return {i: np.asarray(out[off[i]:off[i + 1]], np.float32) for i in targets}
