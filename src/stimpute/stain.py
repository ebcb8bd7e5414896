"""Macenko stain normalisation, implemented with numpy from the published description.

Macenko et al. (ISBI 2009): in optical density (OD) space an H&E pixel is a non-negative
mix of two stain vectors. The vectors are found as the extreme angles (robust 1st/99th
percentiles) of tissue OD pixels projected on the plane of the two largest principal
directions; stain concentrations follow by least squares. Normalising rescales each
stain's concentration so its 99th percentile matches a reference and re-renders with the
reference stain vectors.

Stains are fitted once per section (on a thumbnail), not per patch: a patch of fat or
stroma alone does not contain both stains, and per-patch fits would differ between
neighbouring spots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stimpute.errors import StimputeError

IO = 240.0  # background (glass) intensity used for OD
OD_MIN = 0.15  # pixels with less optical density in any channel are glass
ANGLE_PERCENTILE = 1.0
# Reference H and E OD vectors (columns) and 99th-percentile concentrations, the values
# commonly used with Macenko normalisation.
REF_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REF_MAX_CONC = np.array([1.9705, 1.0308])


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB to optical density -log(I / IO), clipped at 0."""
    return np.maximum(-np.log((rgb.astype(np.float32) + 1.0) / IO), 0.0)


@dataclass
class MacenkoNormalizer:
    """Maps patches of one section to the reference stain appearance (callable on a patch)."""

    stains: np.ndarray  # (3, 2) OD vectors of H and E, unit norm
    max_conc: np.ndarray  # (2,) 99th-percentile concentrations

    @classmethod
    def fit(cls, rgb: np.ndarray, source: str | None = None) -> "MacenkoNormalizer":
        """Estimate the stain vectors of an RGB image (typically a section thumbnail)."""
        od = optical_density(rgb).reshape(-1, 3)
        od = od[(od > OD_MIN).all(axis=1)]
        if len(od) < 100:
            raise StimputeError(source, "too little stained tissue to fit Macenko stain vectors")
        _, vecs = np.linalg.eigh(np.cov(od.T))
        plane = vecs[:, [2, 1]]  # two largest principal directions
        plane *= np.sign(plane.sum(axis=0))  # orient towards positive OD
        proj = od @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)  # H absorbs more red
        stains /= np.linalg.norm(stains, axis=0, keepdims=True)
        conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
        max_conc = np.maximum(np.percentile(conc, 99, axis=1), 1e-6)
        return cls(stains=stains, max_conc=max_conc)

    @classmethod
    def fit_section(cls, section, max_side: int = 2048) -> "MacenkoNormalizer":
        thumb, _ = section.image.thumbnail(max_side)
        return cls.fit(thumb, source=section.source or section.name)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        od = optical_density(rgb).reshape(-1, 3)
        conc = od @ np.linalg.pinv(self.stains).T  # (n, 2)
        conc *= (REF_MAX_CONC / self.max_conc).astype(np.float32)
        out = IO * np.exp(-conc @ REF_STAINS.T.astype(np.float32))
        return np.clip(out, 0, 255).astype(np.uint8).reshape(rgb.shape)
