"""The shift suite: copies of a HER2-ST section with a realistic section-to-section change.

Serial sections of one block differ in staining, focus, compression, tone and scale: a
user's unseen sections differ from the known one more than the three shared sections do
among themselves. Each shift below is fixed (no random draw), so every run of the
validation protocol (`bench_protocol.py`) sees the same copies:

| shift | what changes | how |
|---|---|---|
| `stain` | stain strength and hue | optical density split on the reference H&E basis; haematoxylin × 1.3, eosin × 0.7, both stain vectors turned (H bluer, E pinker), then re-rendered |
| `blur` | focus | Gaussian blur, σ = 2.5 px (≈ 1.7 µm at HER2-ST's 0.67 µm/px) |
| `jpeg` | compression | re-encoded as JPEG at quality 20 |
| `tone` | brightness and contrast | contrast × 0.8 around the mean, brightness + 12, gamma 1.15 |
| `scale` | declared scale | µm per pixel declared 5 % too large (tissue stretch, a wrong scan header): applied when the section is read (`apply_scale`) |

The image shifts write `<name>.jpg` (quality 95 except `jpeg`) beside copies of the
counts and spot table, so the copy is a HER2-ST raw folder read by the same code path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

SHIFTS = ("stain", "blur", "jpeg", "tone", "scale")
SCALE_ERROR = 1.05
STRIP = 1024  # rows processed at a time (bounded memory on 10k px images)
IO = 240.0
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_STAINS = np.stack([_H / np.linalg.norm(_H), _E / np.linalg.norm(_E)], 1)  # Ruifrok's H and E OD vectors
_H2 = _H + np.array([-0.10, 0.0, 0.12])
_E2 = _E + np.array([0.10, -0.08, 0.0])
_SHIFTED = np.stack([_H2 / np.linalg.norm(_H2) * 1.3, _E2 / np.linalg.norm(_E2) * 0.7], 1)


def _stain(rgb: np.ndarray) -> np.ndarray:
    od = np.maximum(-np.log((rgb.astype(np.float32) + 1.0) / IO), 0.0).reshape(-1, 3)
    conc = od @ np.linalg.pinv(_STAINS).T.astype(np.float32)
    residual = od - conc @ _STAINS.T.astype(np.float32)
    out = IO * np.exp(-(np.maximum(conc, 0) @ _SHIFTED.T.astype(np.float32) + residual)) - 1.0
    return np.clip(out, 0, 255).astype(np.uint8).reshape(rgb.shape)


def _tone(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32)
    x = (x - 160.0) * 0.8 + 160.0 + 12.0
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** 1.15
    return np.clip(x, 0, 255).astype(np.uint8)


def shifted_image(rgb: np.ndarray, shift: str) -> np.ndarray:
    """`rgb` (H, W, 3 uint8) with `shift` applied (not `scale`, which is a declared scale)."""
    if shift == "blur":
        return cv2.GaussianBlur(rgb, (0, 0), 2.5)
    per_strip = {"stain": _stain, "tone": _tone, "jpeg": lambda a: a}[shift]
    out = np.empty_like(rgb)
    for y in range(0, rgb.shape[0], STRIP):
        out[y:y + STRIP] = per_strip(rgb[y:y + STRIP])
    return out


def write_shifted(source: Path, out: Path, shift: str) -> Path:
    """A HER2-ST raw folder `out` (same section name) holding `source` with `shift` applied."""
    if (out / ".done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix.lower() not in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
            shutil.copy(f, out / f.name)
    image = next(f for f in source.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
    rgb = cv2.cvtColor(cv2.imread(str(image), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if shift != "scale":
        rgb = shifted_image(rgb, shift)
    quality = 20 if shift == "jpeg" else 95
    cv2.imwrite(str(out / image.name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    (out / ".done").touch()
    return out


def apply_scale(section) -> None:
    """The `scale` shift: the section's µm per pixel declared `SCALE_ERROR` times too large."""
    section.um_per_px *= SCALE_ERROR
