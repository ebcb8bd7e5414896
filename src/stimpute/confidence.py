"""How far to trust an imputed spot: the agreement of the two independent estimates.

The image model's prediction and the measured expression transferred from the known
sections (`ImputeResult.transferred`, no image model in it) come from different evidence
(histology vs. measured neighbours through the registration); where they agree across
genes, the fused value is less likely to be wrong. (The propagated part is not used: it
carries the kernel ridge prediction, which is also in the model part.) Per-gene confidence is
`ImputeResult.gene_confidence`, the calibration hold-out PCC of the fused value.
"""

from __future__ import annotations

import numpy as np

from stimpute.metrics import pearson_columns


def spot_confidence(model: np.ndarray, propagated: np.ndarray) -> np.ndarray:
    """(n_spots,) PCC across genes between the model and propagated estimates of each spot."""
    return np.nan_to_num(pearson_columns(np.asarray(model).T, np.asarray(propagated).T)).astype(np.float32)
