"""Serial-section registration: every section's spots in the first section's pixel frame.

Each section is aligned onto its predecessor, coarse to fine: a rotation and mirror
search over the full circle on tissue masks (`rigid`), then ECC on the stain density (`refine`), kept
only where it improves mask Dice + stain NCC. Pair transforms compose through the chain
i -> i-1 -> ... -> 0. Views are taken at one µm/px for the whole stack, so sections with
different pixel sizes register without extra care; transforms are rigid in µm (a
similarity in pixels when pixel sizes differ) plus a possible mirror.

Hand-written on OpenCV + scikit-image rather than SimpleITK/ANTs/valis: the stage that
matters here (a global search over 360° and the mirror) is not what those libraries do
out of the box, rigid ECC refinement is one OpenCV call, and it adds no heavy dependency.
No non-rigid stage: spots are 100 µm discs, and rigid residuals on the test data stay
well under a spot radius.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from stimpute.data import Section, Stack
from stimpute.errors import StimputeError, StimputeWarning
from stimpute.register.masks import View, section_view, section_views, tissue_mask
from stimpute.register.refine import pair_quality, refine_ecc
from stimpute.register.rigid import Candidate, rotation_search
from stimpute.threads import opencv_threads
from stimpute.timing import timed

COARSE_SIDE = 256  # px of the largest image's side in the rotation-search views
FINE_SIDE = 1024  # px of the largest image's side in the refinement views, at most
SPOT_PX = 8  # refinement view px across the smallest spot: finer buys the spots nothing (ECC is sub-pixel)
MAX_OFF_TISSUE = 0.5  # share of spots on glass (spot disc off the tissue mask): coordinates are suspect
SUSPECT_OFF_TISSUE = 0.15  # HER2-ST: 0-10 % as given, 17-39 % with pixel x and y swapped
SWAP_MARGIN = 0.1  # ... and swapping them back would put clearly more spots on tissue
MIN_DICE = 0.7  # tissue overlap after alignment: 0.95-0.98 on serial sections, 0.3-0.4 when it failed
N_REFINED = 2  # rotation-search candidates (best by Dice + NCC) that get the ECC refinement
GIVEN_TOLERANCE_UM = 0.5  # stored registered positions must be the spots' own, scaled and shifted, to this
PAIR_COLUMNS = ["fixed", "moving", "dice_before", "dice_coarse", "dice_after", "ncc_coarse", "ncc_after", "angle_deg",
                "mirrored", "refined", "seconds"]

__all__ = ["StackRegistration", "register_stack", "apply_transform", "tissue_mask", "section_view"]


@dataclass
class StackRegistration:
    """Transforms (3x3, section i px -> section 0 px), registered spots and pair quality.

    `pairs` has one row per adjacent pair (moving = section i, fixed = section i-1):
    mask Dice with the slides as placed (`dice_before`), after the coarse search and
    after refinement (`dice_after`), the stain NCC after, the angle and mirror found.
    """

    names: list[str]
    transforms: list[np.ndarray]
    coords_ref: list[np.ndarray]
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_json(self) -> dict:
        """Plain-JSON form: per section its transform; per pair its quality scores."""
        return {
            "reference": self.names[0],
            "convention": "3x3 homogeneous matrix mapping (x, y, 1) in section pixels to the reference section's pixels",
            "sections": [{"name": n, "matrix": t.tolist()} for n, t in zip(self.names, self.transforms)],
            "pairs": self.pairs.to_dict(orient="records"),
        }


def apply_transform(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map (n, 2) points with a 3x3 homogeneous matrix."""
    xy = np.asarray(xy, dtype=np.float64)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


@timed("registration")
def register_stack(
    stack: Stack,
    progress: bool = False,
    step_deg: float = 3.0,
    n_candidates: int = 4,
    coarse_side: int = COARSE_SIDE,
    fine_side: int = FINE_SIDE,
) -> StackRegistration:
    """Register every section of `stack` onto the first one (see module docstring).

    The rotation search sees `coarse_side` px across the largest image; the refinement
    `SPOT_PX` px across the smallest spot, never more than `fine_side` px across the image.

    Raises StimputeError (naming the file) for a single-section stack, spots outside
    their image, or a section without tissue.
    """
    _check_stack(stack)
    given = given_registration(stack)
    if given is not None:
        return given
    extent_um = max(max(s.image.size) * s.um_per_px for s in stack)
    fine_um = max(extent_um / fine_side, min(s.spot_diameter_um for s in stack) / SPOT_PX)
    views = []  # the last two sections' views: memory does not grow with the stack
    transforms = [np.eye(3)]
    rows = []
    # views are at most `fine_side` px across: OpenCV's pool gains nothing there, and on a busy
    # machine its threads wait for a core (`stimpute.threads`)
    with _progress(progress) as bar, opencv_threads(1):
        task = bar.add_task("registering sections", total=2 * len(stack) - 1)
        for i, section in enumerate(stack):
            views = views[-1:] + [tuple(section_views(section, [extent_um / coarse_side, fine_um]))]
            section.image.release()
            _warn_off_tissue(section, views[-1][1])
            bar.advance(task)
            if i == 0:
                continue
            start = time.perf_counter()
            matrix, quality = _align_pair(views[-2], views[-1], step_deg, n_candidates, section, stack[i - 1])
            transforms.append(transforms[-1] @ matrix)
            rows.append({"fixed": stack[i - 1].name, "moving": section.name, **quality,
                         "seconds": round(time.perf_counter() - start, 3)})
            bar.advance(task)
    coords = [apply_transform(t, s.xy) for t, s in zip(transforms, stack)]
    registration = StackRegistration(stack.names, transforms, coords, pd.DataFrame(rows))
    _warn_poor_overlap(registration.pairs)
    return registration


def given_registration(stack: Stack) -> StackRegistration | None:
    """The registration the sections bring with them, read from no image: every section
    carries its spots' registered x, y in µm of one shared frame (`obsm["coords_3d"]`, as
    a 3DMoEST H5 file gives them), so section i's pixels map to µm by a scale and shift,
    and from there to the first section's pixels. None where a section carries no such
    positions, or they are not its spots' pixels scaled and shifted (its images are
    registered then). `pairs` is empty: no image was compared."""
    to_um = []
    for s in stack:
        given = s.adata.obsm.get("coords_3d")
        if given is None or s.n_spots == 0:
            return None
        scaled = s.xy * s.um_per_px
        shift = (np.asarray(given, np.float64)[:, :2] - scaled).mean(axis=0)
        if np.abs(np.asarray(given, np.float64)[:, :2] - scaled - shift).max() > GIVEN_TOLERANCE_UM:
            return None
        to_um.append(np.array([[s.um_per_px, 0.0, shift[0]], [0.0, s.um_per_px, shift[1]], [0.0, 0.0, 1.0]]))
    transforms = [np.linalg.inv(to_um[0]) @ m for m in to_um]
    coords = [apply_transform(t, s.xy) for t, s in zip(transforms, stack)]
    return StackRegistration(stack.names, transforms, coords, pd.DataFrame(columns=PAIR_COLUMNS))


def off_tissue(section: Section, view: View, positions: list[np.ndarray]) -> list[np.ndarray]:
    """Per (n, 2) array of spot positions in `positions` (section px), the spots whose disc
    misses the tissue mask of `view`; the mask's distance map is made once for all."""
    radius = max(1, int(np.ceil(section.spot_diameter_px / 2 * view.scale)))
    if not view.mask.any():
        return [np.ones(len(xy), bool) for xy in positions]
    distance = ndimage.distance_transform_edt(~view.mask)
    h, w = view.shape
    result = []
    for xy in positions:
        xy = np.rint(apply_transform(view.to_view, xy)).astype(int)
        inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
        on = np.zeros(len(xy), bool)
        # within `radius` of tissue = on the mask dilated by skimage's disk(radius), at any disk size
        on[inside] = distance[xy[inside, 1], xy[inside, 0]] ** 2 <= radius**2
        result.append(~on)
    return result


def _warn_off_tissue(section: Section, view: View) -> None:
    """One warning line where many spots fall on glass (more so than with x and y swapped)."""
    if section.n_spots == 0:  # an H&E-only section: its virtual spots are laid on its tissue later
        return
    off, off_swapped = (spots.mean() for spots in off_tissue(section, view, [section.xy, section.xy[:, ::-1]]))
    if off > MAX_OFF_TISSUE or (off > SUSPECT_OFF_TISSUE and off > off_swapped + SWAP_MARGIN):
        hint = (f"with x and y swapped, only {off_swapped:.0%} would: are the pixel columns swapped?"
                if off > off_swapped + SWAP_MARGIN else "are these the coordinates of another image?")
        warnings.warn(f"{section.source or section.name}: {off:.0%} of the spots lie on glass, not tissue; {hint}",
                      StimputeWarning, stacklevel=3)


def _warn_poor_overlap(pairs: pd.DataFrame) -> None:
    """One warning line per pair whose tissue overlaps poorly after alignment."""
    for pair in pairs.itertuples():
        if pair.dice_after < MIN_DICE:
            warnings.warn(f"registration of {pair.moving} onto {pair.fixed} is doubtful: tissue Dice {pair.dice_after:.2f} after "
                          f"alignment (usually > 0.9); look at figures/overlay_{pair.fixed}_{pair.moving}.png of "
                          "`stimpute register`", StimputeWarning, stacklevel=3)


def _align_pair(fixed: tuple[View, View], moving: tuple[View, View], step_deg: float, n_candidates: int,
                moving_section: Section, fixed_section: Section) -> tuple[np.ndarray, dict]:
    """Best transform moving px -> fixed px among refined rotation-search candidates."""
    (fc, ff), (mc, mf) = fixed, moving
    same_place = np.diag([moving_section.um_per_px / fixed_section.um_per_px] * 2 + [1.0])
    before = pair_quality(ff, mf, same_place)
    scored = [(cand, pair_quality(ff, mf, cand.matrix)) for cand in rotation_search(fc, mc, step_deg, n_candidates)]
    scored.sort(key=lambda cq: -(cq[1]["dice"] + cq[1]["ncc"]))
    best = None
    for cand, coarse in scored[:N_REFINED]:
        options = [(cand.matrix, coarse, False)]
        refined = refine_ecc(ff, mf, cand.matrix)
        if refined is not None:
            options.append((refined, pair_quality(ff, mf, refined), True))
        matrix, quality, was_refined = max(options, key=lambda o: o[1]["dice"] + o[1]["ncc"])
        score = quality["dice"] + quality["ncc"]
        if best is None or score > best[0]:
            best = (score, matrix, cand, coarse, quality, was_refined)
    _, matrix, cand, coarse, quality, was_refined = best
    return matrix, _quality_row(cand, before, coarse, quality, was_refined)


def _quality_row(cand: Candidate, before: dict, coarse: dict, after: dict, refined: bool) -> dict:
    return {
        "dice_before": round(before["dice"], 4),
        "dice_coarse": round(coarse["dice"], 4),
        "dice_after": round(after["dice"], 4),
        "ncc_coarse": round(coarse["ncc"], 4),
        "ncc_after": round(after["ncc"], 4),
        "angle_deg": round(cand.angle_deg, 1),
        "mirrored": bool(cand.mirrored),
        "refined": bool(refined),
    }


def _check_stack(stack: Stack) -> None:
    if len(stack) < 2:
        only = stack[0]
        raise StimputeError(only.source or only.name, "registration needs at least two sections; the stack has only this one")
    for section in stack:
        W, H = section.image.size
        xy = section.xy
        margin = section.spot_diameter_px / 2
        outside = (xy[:, 0] < -margin) | (xy[:, 1] < -margin) | (xy[:, 0] > W + margin) | (xy[:, 1] > H + margin)
        if outside.any():
            raise StimputeError(
                section.image.path or section.source or section.name,
                f"image ({W}x{H} px) is smaller than its spot coordinates: {int(outside.sum())} of "
                f"{len(xy)} spots lie outside it (max x {xy[:, 0].max():.0f}, max y {xy[:, 1].max():.0f}); "
                "wrong image or coordinates of a different resolution?",
            )


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # plain text: no markup to parse (nor rich's emoji table to import while `stimpute.preload` runs)
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), TimeElapsedColumn(), disable=not enabled, transient=True)
