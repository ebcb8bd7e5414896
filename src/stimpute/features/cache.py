"""On-disk feature cache: one HDF5 file per section, one dataset per (encoder, scale).

Layout of `<cache_dir>/<section>.features.h5`: group `/<encoder>` with attributes `key`
and `spots_per_process` (the spots each process encoded, `stimpute.features.parallel`),
dataset `spot_ids`, and one (n_spots, dim) float32 dataset per scale name. The key is a
SHA-256 over everything the features depend on: the image (file size, mtime and sampled
bytes, or the pixels of an in-memory image), the spot ids and coordinates, the scale
settings, stain normalisation, and the encoder name with its weights' digest. A matching
key is reused; any change recomputes. Files are written to a temporary name and renamed,
so a crash never leaves a half-written cache. An unreadable file (truncated, damaged, not
HDF5) is a miss, with a warning, and is replaced whole by the next write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from stimpute.data import Section
from stimpute.errors import StimputeWarning
from stimpute.files import atomic_write

CACHE_VERSION = 2  # of how patches are made: 2 = resampled by pixel-area averaging (`stimpute.image.resample`)
SAMPLE_CHUNKS = 16  # image bytes hashed: 16 evenly spaced 64 KiB chunks (+ size and mtime)
SAMPLE_BYTES = 1 << 16


def image_fingerprint(section: Section) -> str:
    """Cheap content identity of a section's image (no full read of a large slide)."""
    img = section.image
    if img.path is None:
        return img.array_digest()
    h = hashlib.sha256()
    st = os.stat(img.path)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(img.path, "rb") as fh:
        for off in np.linspace(0, max(st.st_size - SAMPLE_BYTES, 0), SAMPLE_CHUNKS).astype(np.int64):
            fh.seek(int(off))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def feature_key(section: Section, encoder: str, weights_id: str, scales_um: Sequence[float], out_size: int,
                stain_normalize: bool) -> str:
    """The cache key of one section's features under the given settings."""
    spots = hashlib.sha256(section.xy.astype(np.float64).tobytes())
    spots.update("\n".join(section.spot_ids).encode())
    settings = {
        "version": CACHE_VERSION,
        "image": image_fingerprint(section),
        "um_per_px": float(section.um_per_px),
        "spots": spots.hexdigest(),
        "scales_um": [float(s) for s in scales_um],
        "out_size": int(out_size),
        "stain_normalize": bool(stain_normalize),
        "encoder": encoder,
        "weights": weights_id,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | Path, section: Section) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", section.name)
    return Path(cache_dir) / f"{safe}.features.h5"


def read_features(path: Path, encoder: str, key: str, scale_names: Sequence[str]) -> np.ndarray | None:
    """Cached (n_spots, n_scales, dim) features, or None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            group = f.get(encoder)
            if group is None or group.attrs.get("key") != key or not all(s in group for s in scale_names):
                return None
            return np.stack([group[s][()] for s in scale_names], axis=1).astype(np.float32)
    except Exception as exc:  # truncated, damaged or foreign: a miss, rewritten by `write_features`
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        warnings.warn(f"{path}: unreadable feature cache ({reason}); its features are computed again and rewritten",
                      StimputeWarning, stacklevel=2)
        return None


def write_features(path: Path, encoder: str, key: str, scale_names: Sequence[str], spot_ids: Sequence[str],
                   features: np.ndarray, shares: Sequence[int] = ()) -> None:
    """Store features (n_spots, n_scales, dim) under `/encoder`, keeping other encoders' groups
    where the old file reads whole; `shares`: the spots each process encoded, recorded as the
    attribute `spots_per_process`."""

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            _copy_other_encoders(path, f, encoder)
            group = f.create_group(encoder)
            group.attrs["key"] = key
            group.attrs["spots_per_process"] = np.asarray(shares, np.int64)
            group.create_dataset("spot_ids", data=np.asarray(spot_ids, dtype=object), dtype=h5py.string_dtype())
            for s, name in enumerate(scale_names):
                group.create_dataset(name, data=features[:, s].astype(np.float32), compression="gzip")

    atomic_write(path, write)


def _copy_other_encoders(path: Path, target: h5py.File, encoder: str) -> None:
    """Copy every group but `encoder` of the cache file at `path` into `target`; a file that
    does not read whole is dropped (`read_features` has warned), never half-copied."""
    if not path.is_file():
        return
    try:
        with h5py.File(path, "r") as old:
            for name in old:
                if name != encoder:
                    old.copy(old[name], target)
    except Exception:
        for name in list(target):
            del target[name]

