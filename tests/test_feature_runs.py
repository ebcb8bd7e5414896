"""`stimpute features` rerun on unchanged inputs: answered from `features.json` and the cache,
without reading the sections (no anndata, no torch); any change takes the ordinary path."""

from __future__ import annotations

import json
import os

from tests.helpers import heavy_after, write_her2st_folder


def features(*args) -> tuple[str, list[str]]:
    """`stimpute features ARGS` in a fresh interpreter: what it printed and the heavy libraries it imported."""
    printed = []
    code = f"from stimpute.cli import app\ntry:\n    app({['features', *map(str, args)]!r})\nexcept SystemExit as e:\n    assert not e.code, e.code"
    heavy = heavy_after(code, printed)
    return printed[0], heavy


def test_a_cached_rerun_reads_no_section_and_a_changed_input_is_read_again(tmp_path):
    folders = [write_her2st_folder(tmp_path / name, name=name, n_side=3, seed=i) for i, name in enumerate(("X1", "X2"))]
    out = tmp_path / "cache"
    first, heavy = features(*folders, "--out", out)
    assert first.count("computed") == 2 and "anndata" in heavy
    record = json.loads((out / "features.json").read_text())["runs"]
    assert sorted(r["cache_file"] for r in record.values()) == ["X1.features.h5", "X2.features.h5"]

    again, heavy = features(*folders, "--out", out)
    assert again.count("read from cache") == 2 and heavy == []
    assert [line.split(" read from")[0] for line in again.splitlines()[:2]] == [
        line.split(" computed")[0] for line in first.splitlines() if " computed (" in line]  # same lines, same order

    counts = next(folders[1].glob("*.tsv.gz"))
    os.utime(counts, ns=(counts.stat().st_atime_ns, counts.stat().st_mtime_ns + 10**9))  # X2 touched: read again
    touched, heavy = features(*folders, "--out", out)
    assert touched.count("read from cache") == 2 and "anndata" in heavy  # its content key still matches
    (out / "X1.features.h5").unlink()  # X1's cache gone: computed again
    gone, _ = features(*folders, "--out", out)
    assert gone.count("computed") == 1 and "X1: handcrafted features 8×3×67 computed" in gone
