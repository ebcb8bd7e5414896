"""Make the packaged HER2-ST mini stack from the full shared data (reproducible).

    python scripts/make_her2st_mini.py [SRC] [OUT]

SRC defaults to ../shared/data/her2st, OUT to src/stimpute/data/her2st_mini. Each section
keeps all spots; its image is downscaled 4× (spot coordinates and µm/px follow) and its
counts (stored dense as uint16, read back
as sparse float32) keep the genes detected in ≥1% of the spots of every section of the stack.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from stimpute.data import Section
from stimpute.datasets import HER2ST_MINI_SECTIONS
from stimpute.image import SectionImage
from stimpute.io import read_her2st, write_section

DOWNSCALE = 4
MIN_SPOT_FRACTION = 0.01
JPEG_QUALITY = 80
ROOT = Path(__file__).resolve().parents[1]
CITATION = """# HER2-ST mini stack (patient C, sections C2, C3, C4)

Reduced copy made by `scripts/make_her2st_mini.py`: images downscaled {ds}×, genes limited
to those detected in ≥1% of the spots of every section. Source: Andersson et al.,
"Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell
type interactions", Nature Communications 12, 6012 (2021); Zenodo record 3957257,
GitHub almaan/her2st. Cite it wherever these files are used or redistributed.
"""


def main(src: Path, out: Path) -> None:
    sections = [read_her2st(src / name) for name in HER2ST_MINI_SECTIONS]
    genes = set.intersection(*(set(_detected(s)) for s in sections))
    out.mkdir(parents=True, exist_ok=True)
    for s in sections:
        keep = [g for g in s.genes if g in genes]
        adata = s.adata[:, keep].copy()
        dense = adata.X.toarray()
        assert dense.max() < 2**16, "counts exceed uint16"
        adata.X = dense.astype(np.uint16)  # dense uint16 compresses ~2× better than sparse
        adata.obsm["spatial"] = s.xy / DOWNSCALE
        W, H = s.image.size
        small = Image.fromarray(s.image.read_region(0, 0, W, H)).resize((round(W / DOWNSCALE), round(H / DOWNSCALE)), Image.LANCZOS)
        s.image.release()
        tmp = out / f".{s.name}.jpg"
        small.save(tmp, quality=JPEG_QUALITY, optimize=True)
        mini = Section(s.name, adata, SectionImage.open(tmp), s.um_per_px * DOWNSCALE, s.spot_diameter_um, source=s.source, report=s.report)
        write_section(mini, out, force=True, hires_side=300)
        tmp.unlink()
        print(f"{s.name}: {adata.n_obs} spots, {adata.n_vars} genes, image {small.size}")
    (out / "README.md").write_text(CITATION.format(ds=DOWNSCALE))


def _detected(section: Section) -> list[str]:
    frac = np.asarray((section.adata.X > 0).mean(axis=0)).ravel()
    return [g for g, f in zip(section.genes, frac) if f >= MIN_SPOT_FRACTION]


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]) if args else ROOT.parent / "shared" / "data" / "her2st",
         Path(args[1]) if len(args) > 1 else ROOT / "src" / "stimpute" / "data" / "her2st_mini")
