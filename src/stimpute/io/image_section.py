"""H&E-only sections: an image file given as a stack member (no spots yet, no counts).

The section is named by the file name without its extension and starts with zero spots;
`stimpute.register.grid` lays its virtual spots once the stack is registered. Its scale
comes from `--um-per-px`, else the image's metadata (WSI mpp, TIFF resolution, a HEST
metadata JSON beside it), else the measured sections' (serial sections are usually
scanned alike), with a warning line.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from stimpute.data import Section
from stimpute.errors import InputError
from stimpute.image import IMAGE_SUFFIXES, SectionImage
from stimpute.io.geometry import check_um_per_px, hest_geometry, image_um_per_px
from stimpute.errors import warn_default


def is_image_file(path: Path) -> bool:
    """An image file given where a section is expected."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def refuse_images(paths, command: str) -> None:
    """One error line for the first H&E image alone among `paths`: `command` needs measured spots."""
    for path in paths:
        if is_image_file(Path(path)):
            raise InputError(path, f"an H&E image alone has no measured spots: `stimpute {command}` takes sections "
                                   "with spots and counts (images alone: impute, register, predict, advise, info)")


def read_image_section(path: str | Path, um_per_px: float | None = None, default_um_per_px: float | None = None,
                       default_source: str = "the measured sections") -> Section:
    """An H&E-only Section from an image file (see module docstring).

    Raises InputError when the scale is unknown and no `default_um_per_px` is given.
    """
    path = Path(path)
    image = SectionImage.open(path)
    source = "--um-per-px" if check_um_per_px(um_per_px) else None
    if not um_per_px:
        found = image_um_per_px(path)
        meta = hest_geometry(path)
        if meta.um_per_px:
            um_per_px, source = meta.um_per_px, meta.sources["um_per_px"]
        elif found:
            um_per_px, source = found
    if not um_per_px:
        if not default_um_per_px:
            raise InputError(path, "micrometres per pixel unknown (no resolution in the image metadata): pass --um-per-px")
        warn_default(path, "micrometres per pixel", default_um_per_px, f"µm/px, as {default_source}; pass --um-per-px")
        um_per_px, source = default_um_per_px, default_source.removeprefix("the ")
    adata = ad.AnnData(
        X=sparse.csr_matrix((0, 0), dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index([], dtype=str, name="spot")),
    )
    adata.obsm["spatial"] = np.zeros((0, 2))
    return Section(name=path.stem, adata=adata, image=image, um_per_px=float(um_per_px), source=str(path),
                   report={"image_only": True, "geometry": {"um_per_px": source}})
