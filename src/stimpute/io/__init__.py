"""Readers and writers: every source ends in the same `Section`.

`read_section(path)` recognises the input by its shape:
- a HER2-ST raw folder (`*_selection.tsv` + `*.tsv.gz` + image),
- a project section folder (`section.h5ad` + `image.*`, written by `stimpute convert`),
- an `.h5ad` file with `obsm["spatial"]` and an image (HEST-1k style),
- a Space Ranger `outs/` folder, or the run folder holding it (`stimpute.io.spaceranger`),
- a single-section 3DMoEST `.h5` file (`stimpute.io.moest_h5`; multi-section files are
  converted with `stimpute convert moest-h5`),
- an H&E image alone (JPEG/PNG/TIFF/WSI): an unmeasured section without spots yet
  (`stimpute.io.image_section`; virtual spots come from `stimpute.register.grid`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stimpute.data import Section, Stack
from stimpute.errors import InputError
from stimpute.io.anndata_io import (
    atomic_write,
    read_h5ad_section,
    read_section_folder,
    is_section_folder,
    write_h5ad_atomic,
    write_section,
)
from stimpute.io.geometry import check_um_per_px
from stimpute.io.her2st import is_her2st_folder, read_her2st
from stimpute.io.image_section import is_image_file, read_image_section
from stimpute.io.moest_h5 import is_moest_h5, read_moest_section
from stimpute.io.spaceranger import read_spaceranger, spaceranger_outs
from stimpute.io.validate import validate_section
from stimpute.timing import timed


def read_section(path: str | Path, image: str | Path | None = None, um_per_px: float | None = None) -> Section:
    """Read one section from any supported source (see module docstring), validated.

    Parameters
    ----------
    path
        A HER2-ST folder, a section folder, a Space Ranger `outs/` folder, an `.h5ad`, a
        3DMoEST H5 file or an H&E image alone.
    image
        The H&E image of an `.h5ad` or Space Ranger section (default: found beside it).
    um_per_px
        Micrometres per full-resolution pixel (default: the source's metadata).

    Returns
    -------
    The `Section`: spots (zero-count spots dropped with a warning), counts, lazy image, geometry.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file():
        if path.suffix in (".h5", ".hdf5") and is_moest_h5(path):
            return read_moest_section(path, um_per_px=um_per_px)
        if is_image_file(path):
            return read_image_section(path, um_per_px=um_per_px)
        if path.suffix != ".h5ad":
            raise InputError(path, "unsupported section file: expected an .h5ad, an H&E image or a section folder")
        return read_h5ad_section(path, image=image, um_per_px=um_per_px)
    if is_section_folder(path):
        return read_section_folder(path)
    if is_her2st_folder(path):
        return read_her2st(path)
    if spaceranger_outs(path) is not None:
        return read_spaceranger(path, image=image, um_per_px=um_per_px)
    h5ads = sorted(path.glob("*.h5ad"))
    if len(h5ads) == 1:
        return read_h5ad_section(h5ads[0], image=image, um_per_px=um_per_px)
    raise InputError(
        path,
        "not a section: expected a HER2-ST folder (*_selection.tsv), a section folder "
        "(section.h5ad), a Space Ranger outs/ folder (filtered_feature_bc_matrix.h5 + spatial/) or an .h5ad file",
    )


def read_sections(path: str | Path, um_per_px: float | None = None) -> list[Section]:
    """Every section in `path`.

    Parameters
    ----------
    path
        Anything `read_section` reads, or a `block.h5ad` of `stimpute impute`.
    um_per_px
        The scale of an H&E image alone, as in `read_stack`.

    Returns
    -------
    All sections of a block, else the one section, as a list.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".h5ad":
        import anndata as ad

        from stimpute.io.results import is_result, read_result

        adata = ad.read_h5ad(path, backed="r")
        if is_result(adata.uns) and adata.uns["stimpute"].get("block"):
            adata = adata.to_memory()
            return read_result(path, adata)
    return [read_section(path, um_per_px=um_per_px if is_image_file(path) else None)]


@timed("read")
def read_stack(paths: Sequence[str | Path], thickness_um: float | None = None, um_per_px: float | None = None,
               trained_um_per_px: float | None = None) -> Stack:
    """Read sections given in cutting order into a Stack.

    Parameters
    ----------
    paths
        The sections in cutting order (anything `read_section` reads).
    thickness_um
        Section spacing (z = position × thickness), default the `Stack`'s.
    um_per_px
        The scale of the H&E-only members (image files); without it and without image
        metadata they take the measured sections' median scale, with a warning.
    trained_um_per_px
        Where no section of `paths` is measured: the scale of a trained model's sections
        (`stimpute predict`), taken by H&E-only members the same way, with a warning.

    Returns
    -------
    The `Stack`.
    """
    check_um_per_px(um_per_px)
    images = [is_image_file(Path(p)) for p in paths]
    read = {i: read_section(p) for i, p in enumerate(paths) if not images[i]}
    scales = [s.um_per_px for s in read.values() if s.has_counts]
    default, source = (float(np.median(scales)), "the measured sections") if scales else (trained_um_per_px, "the model's sections")
    for i, p in enumerate(paths):
        if images[i]:
            read[i] = read_image_section(p, um_per_px=um_per_px, default_um_per_px=default, default_source=source)
    sections = [read[i] for i in range(len(paths))]
    return Stack(sections) if thickness_um is None else Stack(sections, thickness_um=thickness_um)


__all__ = [
    "read_section",
    "validate_section",
    "read_stack",
    "read_sections",
    "read_her2st",
    "read_h5ad_section",
    "read_spaceranger",
    "read_image_section",
    "write_section",
    "write_h5ad_atomic",
    "atomic_write",
]
