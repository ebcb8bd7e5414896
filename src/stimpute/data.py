"""The two objects every step passes along: a `Section` (one tissue slice) and a `Stack`.

A section's spots and counts live in an AnnData so users can hand them to scanpy and
squidpy unchanged: `obs_names` are spot ids, `obs["array_row"/"array_col"]` the array
grid position, `obsm["spatial"]` the spot centre (x, y) in full-resolution pixels of the
section's own image, and `X` the raw counts (sparse; zero genes when the section has no
measured expression). The image stays on disk behind a lazy `SectionImage`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from anndata import AnnData

from stimpute.errors import StimputeError, StimputeWarning, check_text_path
from stimpute.image import SectionImage

DEFAULT_SECTION_THICKNESS_UM = 10.0  # spacing of serial sections when the input gives no z
MAX_NAME_BYTES = 120  # room for suffixes and a temporary file's prefix within a file system's 255


def safe_name(name) -> str:
    """`name` made usable as a file name in an output folder (`<name>.h5ad`, `figures/<name>.png`):
    path separators, control characters and undecodable bytes (from a non-UTF-8 path) become
    "_", a leading "." does too (no "..", no hidden file), an empty name is "_", and it is cut
    to MAX_NAME_BYTES bytes of UTF-8."""
    text = re.sub(r"[/\\\x00-\x1f\x7f\ud800-\udfff]", "_", str(name))
    text = "_" + text[1:] if text.startswith(".") else text or "_"
    while len(text.encode()) > MAX_NAME_BYTES:
        text = text[:-1]
    return text


@dataclass
class Section:
    """One tissue slice: spots (+ counts when measured), its H&E image and its geometry."""

    name: str
    adata: AnnData
    image: SectionImage
    um_per_px: float
    spot_diameter_um: float = 100.0
    pitch_um: float | None = None  # centre-to-centre spot distance; None: estimated from the spots
    z_um: float | None = None
    source: str | None = None
    report: dict = field(default_factory=dict)  # what the reader dropped or assumed

    def __post_init__(self):
        for path in (self.source, self.image.path):  # both are written into the outputs as text
            if path is not None:
                check_text_path(path)
        name = safe_name(self.name)
        if name != self.name:
            warnings.warn(f"{self.source or 'a section'}: the section name {self.name!r} is no safe file name; "
                          f"it is called {name!r}", StimputeWarning, stacklevel=3)
            self.name = name
        if "spatial" not in self.adata.obsm:
            raise StimputeError(self.source or self.name, 'spots have no obsm["spatial"] pixel coordinates')
        if not np.isfinite(self.um_per_px) or self.um_per_px <= 0:
            raise StimputeError(self.source or self.name, f"micrometres per pixel must be > 0, got {self.um_per_px}")

    @property
    def n_spots(self) -> int:
        return self.adata.n_obs

    @property
    def spot_ids(self) -> list[str]:
        return list(self.adata.obs_names)

    @property
    def xy(self) -> np.ndarray:
        """Spot centres (n, 2) as (x, y) in full-resolution pixels of this section's image."""
        return np.asarray(self.adata.obsm["spatial"], dtype=np.float64)

    @property
    def has_counts(self) -> bool:
        return self.adata.n_vars > 0

    @property
    def spot_diameter_px(self) -> float:
        return self.spot_diameter_um / self.um_per_px

    @property
    def genes(self) -> list[str]:
        return list(self.adata.var_names)

    def __repr__(self) -> str:
        W, H = self.image.size if self.image.path is None or self.image.path.exists() else (0, 0)
        return (
            f"Section({self.name!r}, spots={self.n_spots}, genes={self.adata.n_vars}, "
            f"image={W}x{H}, um_per_px={self.um_per_px:.3g}, z_um={self.z_um})"
        )


@dataclass
class Stack:
    """Serial sections of one tissue block in cutting order; any subset carries counts."""

    sections: list[Section]
    thickness_um: float = DEFAULT_SECTION_THICKNESS_UM

    def __post_init__(self):
        self.sections = list(self.sections)
        if not self.sections:
            raise StimputeError(None, "a stack needs at least one section")
        names = [s.name for s in self.sections]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise StimputeError(None, f"section names must be unique in a stack; repeated: {', '.join(dupes)}")
        for i, s in enumerate(self.sections):
            if s.z_um is None:
                s.z_um = i * self.thickness_um

    def __len__(self) -> int:
        return len(self.sections)

    def __iter__(self) -> Iterator[Section]:
        return iter(self.sections)

    def __getitem__(self, key: int | str) -> Section:
        if isinstance(key, str):
            return self.sections[self.index(key)]
        return self.sections[key]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sections]

    def index(self, name: str) -> int:
        """The position of the section `name` (as given, or as `safe_name` made it)."""
        try:
            return self.names.index(name if name in self.names else safe_name(name))
        except ValueError:
            raise StimputeError(
                None, f"section {name!r} is not in the stack (sections: {', '.join(self.names)})"
            ) from None

    @property
    def measured(self) -> list[str]:
        """Names of the sections that carry counts."""
        return [s.name for s in self.sections if s.has_counts]

    def require_3d(self) -> None:
        if len(self) < 2:
            raise StimputeError(None, "a 3D stack needs at least two sections; got one")

    def __repr__(self) -> str:
        return f"Stack({self.names}, measured={self.measured})"


def coords_3d(stack: Stack, coords_ref: Sequence[np.ndarray], thickness_um: float | None = None) -> list[np.ndarray]:
    """(n_i, 3) µm coordinates per section: registered x, y (reference frame) and z.

    x, y = `coords_ref` (pixels of section 0) × section 0's µm/px; z = index × thickness
    (default: the stack's `thickness_um`).
    """
    thickness = stack.thickness_um if thickness_um is None else float(thickness_um)
    scale = stack[0].um_per_px
    return [np.column_stack([np.asarray(xy, float) * scale, np.full(len(xy), i * thickness)]) for i, xy in enumerate(coords_ref)]
