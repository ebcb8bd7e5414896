"""Readers and writers: every source ends in the same `Section`.

`read_section(path)` recognises the input by its shape:
- a HER2-ST raw folder (`*_selection.tsv` + `*.tsv.gz` + image),
- a project section folder (`section.h5ad` + `image.*`, written by `stimpute convert`),
- an `.h5ad` file with `obsm["spatial"]` and an image (HEST-1k style),
- a single-section 3DMoEST `.h5` file (`stimpute.io.moest_h5`; multi-section files are
  converted with `stimpute convert moest-h5`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from stimpute.data import Section, Stack
from stimpute.errors import InputError
from stimpute.io.anndata_io import (
    read_h5ad_section,
    read_section_folder,
    is_section_folder,
    write_h5ad_atomic,
    write_section,
)
from stimpute.io.her2st import is_her2st_folder, read_her2st
from stimpute.io.moest_h5 import is_moest_h5, read_moest_section
from stimpute.io.validate import validate_section
from stimpute.timing import timed


def read_section(path: str | Path, image: str | Path | None = None, um_per_px: float | None = None) -> Section:
    """Read one section from any supported source (see module docstring), validated."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file():
        if path.suffix in (".h5", ".hdf5") and is_moest_h5(path):
            return read_moest_section(path, um_per_px=um_per_px)
        if path.suffix != ".h5ad":
            raise InputError(path, "unsupported section file: expected an .h5ad or a section folder")
        return read_h5ad_section(path, image=image, um_per_px=um_per_px)
    if is_section_folder(path):
        return read_section_folder(path)
    if is_her2st_folder(path):
        return read_her2st(path)
    h5ads = sorted(path.glob("*.h5ad"))
    if len(h5ads) == 1:
        return read_h5ad_section(h5ads[0], image=image, um_per_px=um_per_px)
    raise InputError(
        path,
        "not a section: expected a HER2-ST folder (*_selection.tsv), a section folder "
        "(section.h5ad) or an .h5ad file",
    )


@timed("read")
def read_stack(paths: Sequence[str | Path], thickness_um: float | None = None) -> Stack:
    """Read sections given in cutting order into a Stack."""
    sections = [read_section(p) for p in paths]
    return Stack(sections) if thickness_um is None else Stack(sections, thickness_um=thickness_um)


__all__ = [
    "read_section",
    "validate_section",
    "read_stack",
    "read_her2st",
    "read_h5ad_section",
    "write_section",
    "write_h5ad_atomic",
]
