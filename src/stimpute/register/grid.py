"""Virtual spot grids: spots for sections that have only an H&E image.

An unmeasured section given as an image has no spots. After the stack is registered
(registration reads images and tissue masks only), the measured section's spot lattice
is extended over the whole block in the reference frame, so a virtual spot sits exactly
above or below a measured spot wherever the tissue continues; each section keeps the
lattice points that map inside its own image and onto its tissue, in its own pixels.

The lattice is the known section's array: an affine fit of its spot centres (reference
px) to its `array_col`/`array_row` grid, hexagonal when every spot has `col + row` of one
parity (Visium), square otherwise (legacy ST). Without an array grid, the lattice is
estimated from the spots' nearest-neighbour directions. The user may change the spot
diameter and pitch, and lay a finer grid (`grid_scale=0.5`: half the pitch, every
second point on the known spots) for super-resolution maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from stimpute.data import Section, Stack
from stimpute.errors import StimputeError
from stimpute.errors import warn_default
from stimpute.register import StackRegistration, apply_transform, register_stack
from stimpute.register.masks import section_view

MASK_UM_PER_PX = 25.0  # tissue-mask view: finer views lose pale stroma under Otsu (HER2-ST: 10 µm/px misses a third)
MASK_SIDE = 2048  # at most this many px a side (very large slides)
MIN_SPOTS_PER_SECTION = 3
MAX_VIRTUAL_SPOTS = 200_000  # per section: a finer grid takes hours to encode and gigabytes to hold
VISIUM_PITCH_UM, VISIUM_DIAMETER_UM = 100.0, 55.0  # the grid of a stack without any spots (`default_grid`)


@dataclass
class GridOptions:
    """The user's grid: spot diameter and pitch in µm (None: the known section's) and
    `grid_scale`, the pitch multiplier (0.5 = twice as many spots per row)."""

    spot_diameter_um: float | None = None
    pitch_um: float | None = None
    grid_scale: float = 1.0

    def __post_init__(self):
        for name in ("spot_diameter_um", "pitch_um", "grid_scale"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise StimputeError(f"--{name.replace('_', '-')}", f"must be a positive number, got {value}")


@dataclass
class Lattice:
    """Spot lattice in reference px: point(i, j) = origin + basis @ (i, j) for integer
    (i, j), with i + j even when `hexagonal` (Visium's array_col/array_row convention)."""

    origin: np.ndarray
    basis: np.ndarray  # (2, 2): columns are the reference-px steps of one array column / row
    hexagonal: bool

    @property
    def cell_area(self) -> float:
        """Area per lattice point (reference px²): hexagonal lattices use every second index pair."""
        return abs(float(np.linalg.det(self.basis))) * (2 if self.hexagonal else 1)

    @property
    def pitch(self) -> float:
        """Centre-to-centre distance of neighbouring points (reference px)."""
        steps = [(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0) and not (self.hexagonal and (i + j) % 2)]
        return float(min(np.linalg.norm(self.basis @ np.array(s, float)) for s in steps))

    def scaled(self, factor: float) -> "Lattice":
        """The same lattice with steps multiplied by `factor` (about the same origin)."""
        return Lattice(self.origin, self.basis * factor, self.hexagonal)

    def points_in(self, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lattice points (reference px) whose indices fall within the box spanned by
        `corners` (reference px), and their (i, j) indices."""
        uv = np.linalg.solve(self.basis, (corners - self.origin).T).T
        lo, hi = np.floor(uv.min(0)).astype(int) - 1, np.ceil(uv.max(0)).astype(int) + 1
        i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        ij = np.c_[i.ravel(), j.ravel()]
        if self.hexagonal:
            ij = ij[(ij.sum(1) % 2) == 0]
        return self.origin + ij @ self.basis.T, ij


def known_lattice(section: Section, coords_ref: np.ndarray) -> Lattice:
    """The known section's spot lattice in reference px (see module docstring)."""
    obs = section.adata.obs
    if {"array_col", "array_row"} <= set(obs.columns) and section.n_spots >= 3:
        grid = obs[["array_col", "array_row"]].to_numpy(np.float64)
        A = np.c_[grid, np.ones(len(grid))]
        coef, *_ = np.linalg.lstsq(A, coords_ref, rcond=None)
        if abs(np.linalg.det(coef[:2].T)) > 1e-9:
            parity = np.unique(np.round(grid.sum(1)).astype(int) % 2)
            return Lattice(origin=coef[2], basis=coef[:2].T, hexagonal=len(parity) == 1)
    return _estimated_lattice(section, coords_ref)


def _estimated_lattice(section: Section, coords_ref: np.ndarray) -> Lattice:
    """Lattice from spot positions alone: pitch and direction of nearest neighbours; six
    neighbours at one pitch mean hexagonal, four square."""
    if section.n_spots < 3:
        raise StimputeError(section.source or section.name, "too few spots to infer the spot grid for virtual spots")
    tree = cKDTree(coords_ref)
    dist, idx = tree.query(coords_ref, k=min(7, len(coords_ref)))
    pitch = float(np.median(dist[:, 1]))
    near = (dist[:, 1:] < 1.2 * pitch) & (dist[:, 1:] > 0.8 * pitch)
    hexagonal = np.median(near.sum(1)) > 4
    vectors = (coords_ref[idx[:, 1:]] - coords_ref[:, None, :])[near]
    period = np.pi / 3 if hexagonal else np.pi / 2
    angles = np.arctan2(vectors[:, 1], vectors[:, 0]) * (2 * np.pi / period)
    theta = float(np.angle(np.exp(1j * angles).mean())) * period / (2 * np.pi)
    u = np.array([np.cos(theta), np.sin(theta)])
    v = np.array([-u[1], u[0]])
    basis = np.c_[u * pitch / 2, v * pitch * np.sqrt(3) / 2] if hexagonal else np.c_[u * pitch, v * pitch]
    return Lattice(origin=coords_ref[0], basis=basis, hexagonal=bool(hexagonal))


def virtual_spots(section: Section, to_ref: np.ndarray, lattice: Lattice, spot_diameter_um: float) -> AnnData:
    """AnnData of the lattice points on `section`'s tissue: obs_names `<col>x<row>`,
    `obs["array_col"/"array_row"]` the lattice indices, `obsm["spatial"]` own pixels.

    `to_ref` maps the section's pixels to reference px (its registration transform).
    """
    W, H = section.image.size
    corners = apply_transform(to_ref, np.array([[0, 0], [W, 0], [0, H], [W, H]], float))
    xy_ref, ij = lattice.points_in(corners)
    xy = apply_transform(np.linalg.inv(to_ref), xy_ref)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < W) & (xy[:, 1] < H)
    xy, ij = xy[inside], ij[inside]
    view = section_view(section, max(MASK_UM_PER_PX, max(W, H) * section.um_per_px / MASK_SIDE))
    at = np.round(apply_transform(view.to_view, xy)).astype(int)
    h, w = view.shape
    at = np.clip(at, 0, [w - 1, h - 1])
    on_tissue = view.mask[at[:, 1], at[:, 0]]
    xy, ij = xy[on_tissue], ij[on_tissue]
    if len(xy) < MIN_SPOTS_PER_SECTION:
        raise StimputeError(section.source or section.name,
                            f"only {len(xy)} virtual spot(s) fall on the tissue (spot diameter {spot_diameter_um:g} µm); "
                            "check the image, its µm/px (--um-per-px) or --pitch-um")
    obs = pd.DataFrame({"array_col": ij[:, 0], "array_row": ij[:, 1]},
                       index=pd.Index([f"{c}x{r}" for c, r in ij], name="spot"))
    adata = AnnData(X=sparse.csr_matrix((len(xy), 0), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = xy
    return adata


def _check_spot_count(section: Section, pitch_um: float, cell_um2: float, grid_scale: float) -> None:
    """Refuse a grid of `cell_um2` µm² per point (pitch `pitch_um`, grid scale included) that
    would lay more than `MAX_VIRTUAL_SPOTS` on `section`'s image, counted as the image area
    over the area per point (rotation and translation change neither): before any work."""
    W, H = section.image.size
    count = W * H * section.um_per_px ** 2 / cell_um2
    if count > MAX_VIRTUAL_SPOTS:
        raise StimputeError(section.source or section.name,
                            f"--grid-scale {grid_scale:g} at a {pitch_um:.3g} µm pitch would lay about {count:,.0f} virtual "
                            f"spots on this image, over the limit of {MAX_VIRTUAL_SPOTS:,} per section: raise "
                            "--grid-scale or --pitch-um")


def _grid_size_um(stack: Stack, known: list[int], options: GridOptions) -> tuple[float, float]:
    """Pitch (µm) and area per point (µm²) of the virtual grid `place_virtual_spots` will lay,
    from the known section's lattice in its own pixels (the same lattice up to a rigid move)."""
    if known:
        anchor = stack[known[0]]
        own = known_lattice(anchor, anchor.xy)
        pitch_um, cell_um2 = own.pitch * anchor.um_per_px, own.cell_area * anchor.um_per_px ** 2
    else:
        pitch_um = options.pitch_um or VISIUM_PITCH_UM
        cell_um2 = default_lattice(pitch_um).cell_area
    factor = (options.pitch_um / pitch_um if options.pitch_um else 1.0) * options.grid_scale
    return pitch_um * factor, cell_um2 * factor ** 2


def default_lattice(pitch_px: float) -> Lattice:
    """A hexagonal (Visium) lattice of the given pitch in reference px, origin at (0, 0)."""
    return Lattice(origin=np.zeros(2), basis=np.diag([pitch_px / 2, pitch_px * np.sqrt(3) / 2]), hexagonal=True)


def place_virtual_spots(stack: Stack, known: list[int], options: GridOptions | None = None,
                        progress: bool = False, default_grid: bool = False) -> StackRegistration:
    """Register `stack` and give each spot-less section a virtual spot grid (module docstring).

    `default_grid`: with no `known` section (a stack of H&E images alone, as `stimpute
    advise` takes), lay a hexagonal grid of the options' pitch and diameter, Visium's
    100/55 µm where not given (with a warning), instead of failing.
    Returns the registration with every section's spots (measured and virtual) in reference px.
    """
    empty = [i for i, s in enumerate(stack) if s.n_spots == 0]
    if empty and not known and not default_grid:
        raise StimputeError(stack[empty[0]].source, "an H&E-only section needs a measured (--known) section to copy its spot grid from")
    options = options or GridOptions()
    if empty:
        pitch_um, cell_um2 = _grid_size_um(stack, known, options)
        for i in empty:
            _check_spot_count(stack[i], pitch_um, cell_um2, options.grid_scale)
    registration = register_stack(stack, progress=progress)
    ref_um = stack[0].um_per_px
    if known:
        anchor = stack[known[0]]
        lattice = known_lattice(anchor, registration.coords_ref[known[0]])
        pitch_um, diameter_um = lattice.pitch * ref_um, anchor.spot_diameter_um
    else:
        pitch_um, diameter_um = default_geometry(stack[0], options)
        lattice = default_lattice(pitch_um / ref_um)
    if options.pitch_um:
        lattice = lattice.scaled(options.pitch_um / pitch_um)
        pitch_um = options.pitch_um
    for i in empty:
        _give_spots(stack[i], registration.transforms[i], lattice, pitch_um, options.spot_diameter_um or diameter_um, options)
    registration.coords_ref = [apply_transform(t, s.xy) for t, s in zip(registration.transforms, stack)]
    return registration


def grid_on_section(section: Section, options: GridOptions | None = None) -> Section:
    """Virtual spots on an H&E-only section by itself, in its own pixels (image-only
    prediction: no stack to register): a hexagonal lattice of the options' pitch and
    diameter (Visium's 100/55 µm where not given, with a warning) over its tissue."""
    options = options or GridOptions()
    pitch_um, diameter_um = default_geometry(section, options)
    _check_spot_count(section, pitch_um * options.grid_scale,
                      default_lattice(pitch_um * options.grid_scale).cell_area, options.grid_scale)
    _give_spots(section, np.eye(3), default_lattice(pitch_um / section.um_per_px), pitch_um, diameter_um, options)
    return section


def default_geometry(section: Section, options: GridOptions) -> tuple[float, float]:
    """Pitch and spot diameter (µm) of a grid no measured section gives: the options',
    else Visium's, with one warning line for each default used."""
    pitch_um, diameter_um = options.pitch_um or VISIUM_PITCH_UM, options.spot_diameter_um or VISIUM_DIAMETER_UM
    for option, value, name in (("pitch_um", pitch_um, "spot pitch"), ("spot_diameter_um", diameter_um, "spot diameter")):
        if getattr(options, option) is None:
            warn_default(section.source or section.name, f"no measured section gives the virtual {name}", value,
                         f"µm, Visium's; pass --{option.replace('_', '-')}")
    return pitch_um, diameter_um


def _give_spots(section: Section, to_ref: np.ndarray, lattice: Lattice, pitch_um: float, diameter_um: float,
                options: GridOptions) -> None:
    """Lay `lattice` (at the options' grid scale) on `section`'s tissue, in place."""
    lattice = lattice.scaled(options.grid_scale)
    section.adata = virtual_spots(section, to_ref, lattice, diameter_um)
    section.spot_diameter_um = diameter_um
    section.pitch_um = pitch_um * options.grid_scale
    section.report.update({"virtual_spots": section.n_spots, "grid_scale": options.grid_scale,
                           "lattice": "hexagonal" if lattice.hexagonal else "square"})
    section.image.release()
