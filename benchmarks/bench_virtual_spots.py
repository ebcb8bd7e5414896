"""Virtual spots on H&E-only sections vs imputing the real spots (issue 17 acceptance).

The HER2-ST sections C2 and C4 are handed over as images alone (`sec2.jpg`: C2's JPEG;
`sec4.tif`: C4's image as a tiled TIFF with its µm/px in the resolution tags), their ST
withheld; C3 is measured. `stimpute impute C3 sec2.jpg sec4.tif --known C3` lays virtual
spots on their tissue and imputes them. Each withheld measured spot is paired with the
nearest virtual spot (own pixels: the images are the originals), and per-gene PCC across
the measured spots is compared with `stimpute impute C3 C2 C4 --known C3` on the real
spots (same stack order, panel, seed). Acceptance: the virtual spots' mean per-gene PCC
within 0.02 of the real spots'.

Run: `python benchmarks/bench_virtual_spots.py [--data ../shared/data/her2st] [--out bench-virtual]
[--order C3,C2,C4] [--grid-scale 0.5]`. Writes `OUT/bench_virtual_spots.md` and prints it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import anndata as ad
import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from stimpute.metrics import pearson_columns
from stimpute.expression import panel_expression, top_variable
from stimpute.io import read_section
from stimpute.pipeline import run_impute
from stimpute.register.grid import GridOptions

IMAGE_NAMES = {"C2": "sec2.jpg", "C4": "sec4.tif"}


def make_images(data: Path, folder: Path) -> dict[str, Path]:
    """sec2.jpg (C2's JPEG, no scale in it) and sec4.tif (C4's pixels, µm/px in the tags)."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, file in IMAGE_NAMES.items():
        section = read_section(data / name)
        target = folder / file
        if not target.exists():
            if target.suffix == ".jpg":
                shutil.copyfile(section.image.path, target)
            else:
                Image.MAX_IMAGE_PIXELS = None
                pixels = np.asarray(Image.open(section.image.path).convert("RGB"))
                res = 1e4 / section.um_per_px
                tifffile.imwrite(target, pixels, tile=(512, 512), compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER")
        paths[name] = target
    return paths


def nearest_pcc(out: Path, file_stem: str, measured, panel: list[str]) -> tuple[np.ndarray, float, int]:
    """Per-gene PCC of the nearest virtual spot's prediction at each measured spot, the
    median distance (µm) of the pairs, and the number of virtual spots."""
    virtual = ad.read_h5ad(out / f"{file_stem}.h5ad")
    dist, nearest = cKDTree(np.asarray(virtual.obsm["spatial"])).query(measured.xy)
    pred = np.asarray(virtual[:, panel].X)[nearest]
    return pearson_columns(pred, panel_expression(measured, panel)), float(np.median(dist) * measured.um_per_px), virtual.n_obs


def confidence_check(out: Path, name: str, measured, panel: list[str]) -> float:
    """Spearman ρ between `obs["stimpute_confidence"]` and the spot's actual PCC across genes (real spots)."""
    from scipy.stats import spearmanr

    from stimpute.metrics import spot_pcc

    result = ad.read_h5ad(out / f"{name}.h5ad")
    actual = spot_pcc(np.asarray(result[measured.spot_ids, panel].X), panel_expression(measured, panel))
    return float(spearmanr(result[measured.spot_ids].obs["stimpute_confidence"], actual, nan_policy="omit").statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    parser.add_argument("--out", type=Path, default=Path("bench-virtual"))
    parser.add_argument("--order", default="C3,C2,C4", help="stack order of the three sections (C2/C4 become images)")
    parser.add_argument("--grid-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    order = args.order.split(",")
    images = make_images(args.data, args.out / "images")

    start = time.perf_counter()
    real = run_impute([args.data / n for n in order], "C3", args.out / "real", seed=args.seed, force=True)
    t_real = time.perf_counter() - start
    start = time.perf_counter()
    run_impute([images.get(n, args.data / n) for n in order], "C3", args.out / "virtual", seed=args.seed,
                         force=True, grid=GridOptions(grid_scale=args.grid_scale))
    t_virtual = time.perf_counter() - start

    panel = list(real.metrics.gene.unique())
    top = top_variable(panel_expression(read_section(args.data / "C3"), panel), 50)
    lines = [f"# Virtual spots vs real spots (HER2-ST, known C3, order {','.join(order)}, grid scale {args.grid_scale})", "",
             "| section | spots real / virtual | median pair distance (µm) | real: panel / top-50 PCC | virtual: panel / top-50 PCC | difference (panel) | ρ(confidence, spot PCC) |",
             "|---|---|---|---|---|---|---|"]
    for name, image in images.items():
        measured = read_section(args.data / name)
        pcc_real = real.metrics[real.metrics.section == name].set_index("gene").loc[panel, "pcc"].to_numpy()
        pcc_virtual, distance, n_virtual = nearest_pcc(args.out / "virtual", image.stem, measured, panel)
        r, v = np.nan_to_num(pcc_real), np.nan_to_num(pcc_virtual)
        lines.append(f"| {name} ({image.name}) | {measured.n_spots} / {n_virtual} | {distance:.0f} | {r.mean():.3f} / {r[top].mean():.3f} "
                     f"| {v.mean():.3f} / {v[top].mean():.3f} | {v.mean() - r.mean():+.3f} "
                     f"| {confidence_check(args.out / 'real', name, measured, panel):.2f} |")
    lines += ["", f"Wall time: real {t_real:.0f} s, virtual {t_virtual:.0f} s (2 shared CPU cores). "
              "PCC: per gene across the withheld measured spots (undefined as 0), 250-gene panel of C3 and its top-50 HVGs. "
              "Last column: Spearman ρ, over the real spots, of obs['confidence'] with the spot's actual PCC across genes."]
    text = "\n".join(lines) + "\n"
    (args.out / "bench_virtual_spots.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
