"""What `stimpute features` wrote into its cache folder, so that a rerun on unchanged inputs
reads no section.

`OUT/features.json` records, per input path and settings (encoder, weights, stain
normalisation), the input's file fingerprint (size and modification time of each of its
files), the cache file, the cache key stored in it and the line the run printed (its head
and tail, around what was done). A rerun
whose inputs, settings and cache files match reports the features as read from the cache
without reading counts or images, or importing anndata and the encoders: the features are
the cache's, unchanged. Anything else (a changed, moved or new input, another encoder, a
cache file rewritten by another run) takes the ordinary path, which checks the content key.
Kept apart from `stimpute.io` and `stimpute.features` (they import anndata) on purpose.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stimpute.files import write_text_atomic

INDEX_FILE = "features.json"
VERSION = 1


def fingerprint(path: str | Path | None) -> list | None:
    """Size and modification time (ns) of a file, or of every file under a folder, by name."""
    if path is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(p.relative_to(path).as_posix() if p != path else p.name, os.stat(p)) for p in files]
    return [[name, st.st_size, st.st_mtime_ns] for name, st in stats]


class FeatureRuns:
    """The index of one cache folder `out` for one set of settings."""

    def __init__(self, out: str | Path, encoder: str, weights: str | Path | None, stain_normalize: bool):
        self.out = Path(out)
        self.settings = {"encoder": encoder, "weights": fingerprint(weights), "stain_normalize": bool(stain_normalize)}
        try:
            index = json.loads((self.out / INDEX_FILE).read_text(encoding="utf-8"))
            self.records = index["runs"] if index.get("version") == VERSION else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.records = {}  # none yet, or unreadable: every input takes the ordinary path

    def _id(self, path: str | Path) -> str:
        return json.dumps([str(Path(path).resolve()), self.settings], sort_keys=True)

    def cached(self, path: str | Path) -> dict | None:
        """The record of `path` when its files, the settings and its cache file are as recorded."""
        record = self.records.get(self._id(path))
        if not isinstance(record, dict) or record.get("inputs") != fingerprint(path):
            return None
        cache = self.out / record["cache_file"]
        if not cache.is_file() or stored_key(cache, self.settings["encoder"]) != record["key"]:
            return None
        return record

    def add(self, path: str | Path, cache_file: Path | None, head: str, tail: str) -> None:
        """Record that `path`'s features are in `cache_file` (printed as `head` + what was done + `tail`)."""
        key = None if cache_file is None else stored_key(cache_file, self.settings["encoder"])
        if key is not None:
            self.records[self._id(path)] = {"inputs": fingerprint(path), "cache_file": Path(cache_file).name, "key": key,
                                            "head": head, "tail": tail}

    def save(self) -> Path:
        return write_text_atomic(self.out / INDEX_FILE, json.dumps({"version": VERSION, "runs": self.records}, indent=1))


def stored_key(cache: Path, encoder: str) -> str | None:
    """The content key a feature cache file holds for `encoder` (None: absent or unreadable)."""
    import h5py

    try:
        with h5py.File(cache, "r") as f:
            key = f[encoder].attrs.get("key") if encoder in f else None
        return key.decode() if isinstance(key, bytes) else key
    except Exception:  # damaged or foreign: the ordinary path rewrites it
        return None
