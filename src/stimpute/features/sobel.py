"""Sobel gradient maps of spot patches: the morphology 3DMoEST routes its experts by, and the
`sobel_gradients` array of its H5 layout (shared by the model and the H5 writer)."""

from __future__ import annotations

import cv2
import numpy as np

from stimpute.patches import SCALES_UM, iter_patches

SOBEL_SIZE = 32  # side of the stored gradient map (the 3DMoEST H5 `sobel_gradients`)


def sobel_gradients(section, size: int = SOBEL_SIZE) -> np.ndarray:
    """(n_spots, size, size) float32 Sobel gradient magnitude of each spot patch.

    Uses `adata.obsm["sobel_gradients"]` when the section carries it (3DMoEST H5 input);
    otherwise reads the spot patch (`SCALES_UM[0]` µm) at 4 × `size` px, takes the Sobel
    magnitude of its grey levels (0..1) and area-averages it down to `size`.
    """
    stored = section.adata.obsm.get("sobel_gradients")
    if stored is not None:
        return np.asarray(stored, np.float32)
    maps = np.empty((section.n_spots, size, size), np.float32)
    for batch in iter_patches(section, SCALES_UM[:1], out_size=4 * size, batch_size=64):
        for j, patch in zip(batch.index, batch.patches[:, 0]):
            grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
            magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
            maps[j] = cv2.resize(magnitude, (size, size), interpolation=cv2.INTER_AREA)
    return maps
