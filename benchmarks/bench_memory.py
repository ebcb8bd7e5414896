"""Peak memory of handcrafted feature extraction vs. the number of spots (issue 8, bounded memory).

One synthetic pyramidal TIFF (tiled, JPEG, written tile by tile by `bench_features`) holds a
square grid of spots; sections with 1×, 4× and 16× the spots of the smallest are cut from it
(same image, same spot pitch, grids of n, 2n and 4n spots a side). Each measurement runs
`spot_features(section, "handcrafted")` in a fresh process and reads its peak RSS (VmHWM).
Streaming extraction keeps the peak nearly flat: only the (n_spots, 3, dim) result grows.

Run: `python benchmarks/bench_memory.py [--n-side 16] [--out benchmarks/results]`
Writes `OUT/bench_memory.md` and prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_features import _in_child, _peak_mb, _wsi_spots, write_synthetic_wsi  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTORS = (1, 4, 16)
PITCH_PX = 160
UM_PER_PX = 0.5


def _features_peak(tiff: str, n_side: int) -> dict:
    """Handcrafted features of an `n_side`² spot grid on `tiff`: time, peak RSS, feature bytes."""
    import anndata as ad
    import pandas as pd
    import torch

    torch.set_num_threads(2)
    from stimpute.data import Section
    from stimpute.features import spot_features
    from stimpute.image import SectionImage

    xy = _wsi_spots(n_side, PITCH_PX)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
    adata.obsm["spatial"] = xy
    section = Section("grid", adata, SectionImage.open(tiff), um_per_px=UM_PER_PX)
    base = _peak_mb()
    t = time.perf_counter()
    features = spot_features(section, encoder="handcrafted")
    return {"spots": len(xy), "seconds": time.perf_counter() - t, "peak_mb": _peak_mb(), "import_mb": base,
            "features_mb": features.nbytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-side", type=int, default=16, help="spots a side of the 1× section")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = args.out / "memory_work"
    work.mkdir(parents=True, exist_ok=True)
    largest = args.n_side * int(FACTORS[-1] ** 0.5)
    size = (largest + 1) * PITCH_PX
    tiff = work / f"grid_{size}.tif"
    if not tiff.exists():
        write_synthetic_wsi(tiff, size)
    rows = [f"# Memory benchmark (issue 8): handcrafted features, {size}×{size} px pyramidal TIFF, {UM_PER_PX} µm/px, "
            f"spot pitch {PITCH_PX} px, 3 scales", "",
            f"{os.cpu_count()} CPU cores visible. Peak RSS = VmHWM of a fresh process; 'after imports' is its peak before "
            "extraction starts.", "",
            "| spots | × spots | seconds | peak RSS MB | after imports MB | extraction MB (peak − imports) | × extraction MB | features MB |",
            "|---|---|---|---|---|---|---|---|"]
    first = None
    for factor in FACTORS:
        r = _in_child(_features_peak, str(tiff), args.n_side * int(factor**0.5))
        grown = r["peak_mb"] - r["import_mb"]
        first = first or grown
        rows.append(f"| {r['spots']} | {factor} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['import_mb']:.0f} | "
                    f"{grown:.0f} | {grown / first:.2f} | {r['features_mb']:.1f} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    (args.out / "bench_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
