"""Built-in data: a synthetic 3D tissue with known ground truth, and a small real HER2-ST stack.

`synthetic_stack` is the test bed of every step. A tissue block is described by K latent
tissue programmes (smooth random fields in x, y and z). Each programme sets both the
look of the tissue (stain colour, nuclei density and size, fat holes) and the expression
of the genes it drives, so expression is learnable from the image. Each section is the
block's slice at its z, rendered as an H&E-like RGB image, then moved on its slide by a
random rigid transform (rotation, translation, optional mirror flip) that is returned as
ground truth. Spots sit on a fixed Visium-like hexagonal array in slide coordinates, as on
a real slide, so spots of different sections do not coincide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anndata as ad
import cv2
import numpy as np
import pandas as pd
from scipy import sparse
from scipy.ndimage import gaussian_filter, map_coordinates

from stimpute.data import Section, Stack
from stimpute.image import SectionImage

TRUTH_KEY = "synthetic_truth"  # Section.report entry holding the generator's transform
PROGRAMMES_KEY = "synthetic_programmes"  # obsm entry: latent programme values per spot

# Look of each programme: stain colour (RGB), nuclei per 1,000 µm², nucleus radius (µm),
# fat-hole density. Programmes beyond these four reuse them with shifted colours.
_PROGRAMME_LOOK = [
    ((205, 120, 175), 9.0, 4.5, 0.0),  # tumour epithelium: dense large nuclei
    ((235, 165, 200), 1.5, 3.0, 0.0),  # stroma: pink, sparse elongated nuclei
    ((190, 110, 190), 14.0, 2.5, 0.0),  # immune infiltrate: very dense small dark nuclei
    ((245, 215, 225), 0.8, 3.0, 1.0),  # adipose: pale with fat holes
]
_NUCLEUS_RGB = np.array([70, 40, 120], float)
_FAT_RADIUS_UM = 30.0


@dataclass(frozen=True)
class SyntheticTruth:
    """Ground truth of a synthetic stack.

    `slide_from_block[i]` maps block-frame pixels to section i's image pixels (3×3).
    """

    slide_from_block: list[np.ndarray]
    programmes: list[np.ndarray]

    def to_reference(self, i: int, ref: int = 0) -> np.ndarray:
        """3×3 map from section i's image pixels to section `ref`'s image pixels."""
        return self.slide_from_block[ref] @ np.linalg.inv(self.slide_from_block[i])


def synthetic_stack(
    n_sections: int = 3,
    seed: int = 0,
    n_genes: int = 60,
    n_programmes: int = 4,
    tissue_radius_um: float = 700.0,
    image_size: int = 2000,
    um_per_px: float = 2.0,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
    thickness_um: float = 10.0,
    max_translation: float = 0.3,
    flip_probability: float = 0.3,
    rotate: bool = True,
    mean_counts: float = 3000.0,
    z_sigma_sections: float = 3.0,
    structure_um: float = 250.0,
    damaged: Sequence[int] = (),
    missing: Mapping[int, tuple[float, float]] | None = None,
    count_seed: int | None = None,
) -> Stack:
    """A stack of `n_sections` serial sections of one synthetic tissue block.

    Every section carries counts (drop them to simulate unmeasured layers). Ground truth:
    `synthetic_truth(stack)`. Deterministic for a given `seed`; about a second a section.

    Harder stacks (defaults leave the stack as it always was): `z_sigma_sections`, how many
    sections the programmes stay alike along z (smaller: faster drift); `structure_um`, the
    size of their patches in x, y; `damaged`, sections whose image is ruined (smeared and
    faded, as a badly fixed or out-of-focus slide: the expression is intact); `missing`,
    {section: (angle in degrees, fraction)}: the tissue beyond a chord at that angle, that
    fraction of the diameter, is torn off (neither image nor spots there). `count_seed`: the
    same tissue, images and spots with the counts drawn again from this seed (a second
    independent measurement of the same stack).
    """
    rng = np.random.default_rng(seed)
    count_rng = None if count_seed is None else np.random.default_rng([seed, count_seed])
    block = _TissueBlock(rng, n_sections, n_programmes, tissue_radius_um, image_size, um_per_px, thickness_um,
                         z_sigma=z_sigma_sections, structure_um=structure_um)
    loadings, baseline, dispersion = _gene_model(rng, n_programmes, n_genes)
    genes = [f"GENE{g:03d}" for g in range(n_genes)]
    lattice = _hex_lattice(image_size, spot_pitch_um / um_per_px)
    sections = []
    for i in range(n_sections):
        canvas, mask, fields = block.render(i, rng, (missing or {}).get(i))
        if i in damaged:
            canvas = _damage(canvas, mask)
        transform = _random_rigid(rng, image_size, block.extent_px, max_translation, flip_probability, rotate)
        image = cv2.warpAffine(canvas, transform[:2], (image_size, image_size), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
        xy, grid = _spots_on_tissue(lattice, mask, transform, spot_diameter_um / um_per_px / 2, image_size)
        block_xy = _apply(np.linalg.inv(transform), xy)
        prog = np.stack([_sample(f, block_xy) for f in fields], axis=1)
        counts = _negative_binomial_counts(rng, prog, loadings, baseline, dispersion, mean_counts)
        if count_rng is not None:  # `rng` still drew the first counts, so the later images stay the same
            counts = _negative_binomial_counts(count_rng, prog, loadings, baseline, dispersion, mean_counts)
        adata = ad.AnnData(
            X=sparse.csr_matrix(counts.astype(np.float32)),
            obs=pd.DataFrame(
                {"array_row": grid[:, 1], "array_col": grid[:, 0]},
                index=pd.Index([f"{c}x{r}" for c, r in grid], name="spot"),
            ),
            var=pd.DataFrame(index=pd.Index(genes, name="gene")),
        )
        adata.obsm["spatial"] = xy
        adata.obsm[PROGRAMMES_KEY] = prog.astype(np.float32)
        sections.append(
            Section(
                name=f"S{i}",
                adata=adata,
                image=SectionImage(array=image),
                um_per_px=um_per_px,
                spot_diameter_um=spot_diameter_um,
                z_um=i * thickness_um,
                source=f"synthetic_stack(seed={seed})[{i}]",
                report={TRUTH_KEY: transform.tolist()},
            )
        )
    return Stack(sections, thickness_um=thickness_um)


def synthetic_truth(stack: Stack) -> SyntheticTruth:
    """The generator's transforms and latent programmes of a `synthetic_stack`."""
    return SyntheticTruth(
        slide_from_block=[np.asarray(s.report[TRUTH_KEY], float) for s in stack],
        programmes=[np.asarray(s.adata.obsm[PROGRAMMES_KEY]) for s in stack],
    )


def synthetic_registration(stack: Stack):
    """The true `StackRegistration` of a `synthetic_stack` (section i px -> section 0 px),
    from the generator's transforms: what `register_stack` should find."""
    from stimpute.register import StackRegistration, apply_transform

    truth = synthetic_truth(stack)
    transforms = [truth.to_reference(i) for i in range(len(stack))]
    return StackRegistration(stack.names, transforms, [apply_transform(T, s.xy) for T, s in zip(transforms, stack)])


class _TissueBlock:
    """Latent programme fields and tissue outline of one block, in block-frame pixels."""

    def __init__(self, rng, n_sections, n_programmes, radius_um, size, um_per_px, thickness_um, coarse=48,
                 z_sigma=3.0, structure_um=250.0):
        self.size, self.um_per_px, self.thickness_um = size, um_per_px, thickness_um
        self.radius_px = radius_um / um_per_px
        self.n_programmes = n_programmes
        # coarse: side of the field grid (48: ~83 µm cells at `synthetic_stack`'s defaults)
        pad = 6  # extra slices so that smoothing in z has no edge effect
        noise = rng.standard_normal((n_programmes, n_sections + 2 * pad, coarse, coarse))
        cell_um = size * um_per_px / coarse
        sigma_xy = structure_um / cell_um  # programmes vary over a few spots
        fields = gaussian_filter(noise, sigma=(0, z_sigma, sigma_xy, sigma_xy), mode="wrap")[:, pad:-pad]
        fields = (fields - fields.mean()) / fields.std()
        self.fields = 1.0 / (1.0 + np.exp(-2.5 * fields))  # in (0, 1), sharp-ish boundaries
        harmonics = rng.normal(0, 0.08, size=(4, 2))
        self.outline = harmonics  # low-frequency lobes shared by all sections of the block
        self.extent_px = self.radius_px * (1 + np.abs(harmonics).sum())
        self.fat_cells = self._adipocytes(rng, n_sections)

    def _adipocytes(self, rng, n_sections):
        """Fat cells as spheres (x, y px; z µm; radius µm) placed where adipose programmes are
        strong: ~30 µm cells cross several 10 µm sections, so neighbouring sections share
        them, as real serial sections share their larger structures."""
        S, coarse = self.size, self.fields.shape[-1]
        weights = self.fields.mean(axis=1) ** 2
        weights /= weights.sum(0, keepdims=True)
        cell_px = S / coarse
        yy, xx = (np.mgrid[0:coarse, 0:coarse] + 0.5) * cell_px
        inside = np.hypot(xx - S / 2, yy - S / 2) < self.radius_px * 1.3
        z_lo, z_hi = -40.0, (n_sections - 1) * self.thickness_um + 40.0
        cells = []
        for k in range(self.n_programmes):
            fat = _look(k)[3]
            if fat <= 0:
                continue
            # 2D profile density fat·0.25 per 1,000 µm² over a mean chord of ~1.5 R in z
            per_um3 = fat * 0.25 / 1000.0 / (1.5 * _FAT_RADIUS_UM)
            expected = weights[k] * inside * (cell_px * self.um_per_px) ** 2 * (z_hi - z_lo) * per_um3
            n = rng.poisson(expected.sum())
            idx = rng.choice(expected.size, size=n, p=expected.ravel() / expected.sum())
            cy, cx = np.divmod(idx, coarse)
            cells.append(np.c_[(cx + rng.random(n)) * cell_px, (cy + rng.random(n)) * cell_px,
                               rng.uniform(z_lo, z_hi, n), rng.normal(_FAT_RADIUS_UM, 0.2 * _FAT_RADIUS_UM, n)])
        return np.concatenate(cells) if cells else np.zeros((0, 4))

    def render(self, i, rng, torn=None):
        """(canvas RGB uint8, tissue mask, programme fields at full size) of section i;
        `torn`: (angle in degrees, fraction of the diameter) of tissue lost beyond a chord."""
        S = self.size
        fields = [cv2.resize(f[i].astype(np.float32), (S, S), interpolation=cv2.INTER_CUBIC) for f in self.fields]
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        mask = self.inside_distance(xx, yy) > 0
        if torn is not None:
            angle, fraction = np.deg2rad(torn[0]), torn[1]
            along = (xx - S / 2) * np.cos(angle) + (yy - S / 2) * np.sin(angle)
            mask &= along < self.radius_px * (1 - 2 * fraction)
        weights = np.stack(fields) ** 2
        weights /= weights.sum(0, keepdims=True)
        colour = np.zeros((S, S, 3), np.float32)
        for k in range(self.n_programmes):
            rgb, *_ = _look(k)
            colour += weights[k][..., None] * np.asarray(rgb, np.float32)
        colour += rng.normal(0, 6, colour.shape).astype(np.float32)
        canvas = np.where(mask[..., None], np.clip(colour, 0, 255), 255.0).astype(np.uint8)
        for k in range(self.n_programmes):
            _, density, radius_um, _ = _look(k)
            self._draw_nuclei(canvas, rng, weights[k] * mask, density, radius_um)
        self._draw_fat(canvas, mask, i * self.thickness_um)
        canvas = cv2.GaussianBlur(canvas, (3, 3), 0.7)
        return canvas, mask, fields

    def inside_distance(self, bx, by):
        """Signed distance (block px) of block-frame points inside the tissue outline (> 0: tissue)."""
        dx, dy = bx - self.size / 2, by - self.size / 2
        angle = np.arctan2(dy, dx)
        radius = self.radius_px * (1 + sum(a * np.cos((k + 2) * angle + b) for k, (a, b) in enumerate(self.outline)))
        return radius - np.hypot(dx, dy)

    def fields_at(self, i, bx, by):
        """(n_programmes, *bx.shape) programme values of section i at block-frame points, cubic
        interpolation of the field grid (as `render`'s resize, without a full-size image)."""
        scale = self.fields.shape[-1] / self.size
        coords = np.stack([(np.asarray(by) + 0.5) * scale - 0.5, (np.asarray(bx) + 0.5) * scale - 0.5])
        return np.stack([map_coordinates(f[i], coords, order=3, mode="nearest") for f in self.fields])

    def _draw_nuclei(self, canvas, rng, intensity, density, radius_um):
        """Nuclei (dark discs) as a Poisson process: new cells in every section."""
        expected = intensity * density * self.um_per_px**2 / 1000.0
        n = rng.poisson(expected.sum())
        if n == 0:
            return
        idx = rng.choice(expected.size, size=n, p=expected.ravel() / expected.sum())
        ys, xs = np.divmod(idx, self.size)
        radii = np.maximum(1, rng.normal(radius_um, 0.2 * radius_um, n) / self.um_per_px)
        colours = np.clip(_NUCLEUS_RGB + rng.normal(0, 12, (n, 3)), 0, 255).astype(int)
        for x, y, r, rgb in zip(xs, ys, radii, colours):
            cv2.circle(canvas, (int(x), int(y)), int(round(r)), tuple(int(v) for v in rgb), -1, lineType=cv2.LINE_AA)

    def _draw_fat(self, canvas, mask, z_um):
        """The profile of each fat cell that this section cuts: a white disc."""
        x, y, zc, R = self.fat_cells.T
        r_um = np.sqrt(np.clip(R**2 - (z_um - zc) ** 2, 0, None))
        for cx, cy, r in zip(x[r_um > 2], y[r_um > 2], r_um[r_um > 2] / self.um_per_px):
            if mask[min(int(cy), self.size - 1), min(int(cx), self.size - 1)]:
                cv2.circle(canvas, (int(cx), int(cy)), int(round(r)), (250, 248, 250), -1, lineType=cv2.LINE_AA)


def _damage(canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A ruined section image: the tissue smeared (nuclei no longer resolved) and faded
    halfway to white."""
    smeared = cv2.GaussianBlur(canvas, (0, 0), 6.0).astype(np.float32)
    faded = 0.5 * smeared + 0.5 * 255.0
    return np.where(mask[..., None], faded, canvas).astype(np.uint8)


def _look(k: int):
    rgb, density, radius, fat = _PROGRAMME_LOOK[k % len(_PROGRAMME_LOOK)]
    shift = 12 * (k // len(_PROGRAMME_LOOK))
    return tuple(min(255, c + shift) for c in rgb), density, radius, fat


def _gene_model(rng, n_programmes, n_genes):
    """Each gene is driven by one or two programmes: log mean = baseline + loadings·p."""
    loadings = np.zeros((n_programmes, n_genes))
    for g in range(n_genes):
        drivers = rng.choice(n_programmes, size=rng.integers(1, 3), replace=False)
        loadings[drivers, g] = rng.normal(0, 1.8, len(drivers))
    baseline = rng.normal(0, 1.0, n_genes)
    dispersion = rng.uniform(3.0, 10.0, n_genes)  # NB size r; variance = μ + μ²/r
    return loadings, baseline, dispersion


def _negative_binomial_counts(rng, prog, loadings, baseline, dispersion, mean_counts):
    rates = np.exp(baseline + prog @ loadings)
    rates /= rates.sum(axis=1, keepdims=True)
    library = mean_counts * rng.lognormal(0, 0.25, size=(len(prog), 1))
    mu = rates * library
    return rng.poisson(rng.gamma(dispersion, mu / dispersion))


def _hex_lattice(size, pitch):
    """Visium-like spot centres (x, y) over the slide and their (col, row) array indices."""
    row_step = pitch * np.sqrt(3) / 2
    rows = np.arange(int(size / row_step) + 1)
    cols = np.arange(int(size / pitch) + 1)
    c, r = np.meshgrid(cols, rows)
    x = c * pitch + (r % 2) * pitch / 2
    y = r * row_step
    return np.c_[x.ravel(), y.ravel()], np.c_[2 * c.ravel() + r.ravel() % 2, r.ravel()]


def _random_rigid(rng, size, extent, max_translation, flip_probability, rotate):
    """Block px → slide px: mirror (maybe), rotate about the centre, translate within the slide."""
    centre = size / 2
    theta = rng.uniform(0, 2 * np.pi) if rotate else 0.0
    flip = rng.random() < flip_probability
    room = max(0.0, min(max_translation * size, centre - extent - 4))
    shift = rng.uniform(-room, room, 2)
    c, s = np.cos(theta), np.sin(theta)
    R = np.array([[c, -s], [s, c]]) @ np.diag([-1.0 if flip else 1.0, 1.0])
    T = np.eye(3)
    T[:2, :2] = R
    T[:2, 2] = centre + shift - R @ np.array([centre, centre])
    return T


def _spots_on_tissue(lattice, mask, transform, radius_px, size):
    xy, grid = lattice
    inside = (xy[:, 0] >= radius_px) & (xy[:, 1] >= radius_px) & (xy[:, 0] < size - radius_px) & (xy[:, 1] < size - radius_px)
    xy, grid = xy[inside], grid[inside]
    bx, by = np.round(_apply(np.linalg.inv(transform), xy)).astype(int).T
    ok = (bx >= 0) & (by >= 0) & (bx < size) & (by < size)
    on = np.zeros(len(xy), bool)
    on[ok] = mask[by[ok], bx[ok]]
    return xy[on].astype(np.float64), grid[on].astype(int)


def _apply(T, xy):
    return xy @ T[:2, :2].T + T[:2, 2]


def _sample(field, xy):
    x = np.clip(np.round(xy[:, 0]).astype(int), 0, field.shape[1] - 1)
    y = np.clip(np.round(xy[:, 1]).astype(int), 0, field.shape[0] - 1)
    return field[y, x]


# -- a Visium-size block written as HEST-1k files with pyramidal whole-slide images -----

VISIUM_UM_PER_PX = 0.5
VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_UM = 55.0
TRUTH_FILE = "truth.json"
_PLAN_STEP_PX = 16  # grid of a section's colour and outline maps: smooth at 8 µm, the tiles interpolate them


@dataclass(frozen=True)
class BlockFiles:
    """A synthetic block on disk: `sections` (st/<id>.h5ad, cutting order) and `truth.json`."""

    root: Path
    sections: list[Path]
    truth: Path

    @property
    def ids(self) -> list[str]:
        return [p.stem for p in self.sections]


def write_visium_block(
    out: str | Path,
    n_sections: int = 10,
    spots_per_section: int = 4000,
    seed: int = 0,
    n_genes: int = 60,
    n_programmes: int = 4,
    um_per_px: float = VISIUM_UM_PER_PX,
    thickness_um: float = 10.0,
    tile: int = 512,
    progress: bool = False,
) -> BlockFiles:
    """Write a Visium-like block as HEST-1k files: `st/<id>.h5ad`, `wsis/<id>.tif`, `metadata/<id>.json`.

    The tissue model of `synthetic_stack` at Visium geometry (hexagonal 100 µm pitch, 55 µm
    spots, `um_per_px` ≈ 0.5): the tissue is sized so that about `spots_per_section` spots
    fall on it, which makes slides of ~21,000 px a side at 4,000 spots. Each slide is
    rendered tile by tile into a pyramidal JPEG TIFF (`stimpute.io.wsi`), never whole.
    Every section carries counts (`obsm["spatial"]` in full-resolution pixels, latent
    programmes in `obsm["synthetic_programmes"]`); `truth.json` holds each section's
    block→slide transform and the gene model, so noise-free expression can be computed
    (`block_expected_expression`). Deterministic for a given seed.
    """
    from rich.progress import Progress

    from stimpute.io.anndata_io import write_h5ad_atomic
    from stimpute.files import write_text_atomic
    from stimpute.io.wsi import write_pyramid_tiff

    root = Path(out)
    rng = np.random.default_rng(seed)
    pitch_px = VISIUM_PITCH_UM / um_per_px
    radius_um = np.sqrt(spots_per_section * VISIUM_PITCH_UM**2 * np.sqrt(3) / 2 / np.pi)
    size = int(np.ceil(2 * 1.6 * radius_um / um_per_px / tile)) * tile
    block = _TissueBlock(rng, n_sections, n_programmes, radius_um, size, um_per_px, thickness_um,
                         coarse=max(48, round(size * um_per_px / 83.0)))
    loadings, baseline, dispersion = _gene_model(rng, n_programmes, n_genes)
    genes = pd.Index([f"GENE{g:03d}" for g in range(n_genes)], name="gene")
    lattice_xy, lattice_grid = _hex_lattice(size, pitch_px)
    ids = [f"SYNV{i:02d}" for i in range(n_sections)]
    transforms = []
    n_tiles = -(-size // tile) ** 2
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("writing synthetic Visium block", total=n_sections * n_tiles)
        for i, sid in enumerate(ids):
            T = _random_rigid(rng, size, block.extent_px, 0.3, 0.3, True)
            transforms.append(T)
            margin = VISIUM_SPOT_UM / um_per_px / 2
            keep = np.all((lattice_xy >= margin) & (lattice_xy < size - margin), axis=1)
            bx, by = _apply(np.linalg.inv(T), lattice_xy[keep]).T
            on = block.inside_distance(bx, by) > 0
            xy, grid = lattice_xy[keep][on], lattice_grid[keep][on]
            prog = block.fields_at(i, bx[on], by[on]).T
            counts = _negative_binomial_counts(rng, prog, loadings, baseline, dispersion, 3000.0)
            painter = _SlidePainter(block, i, T, rng)
            tiles = painter.tiles(size, tile, lambda: bar.advance(task))
            write_pyramid_tiff(root / "wsis" / f"{sid}.tif", size, size, tiles, um_per_px, tile)
            adata = ad.AnnData(
                X=sparse.csr_matrix(counts.astype(np.float32)),
                obs=pd.DataFrame({"in_tissue": 1, "array_row": grid[:, 1], "array_col": grid[:, 0],
                                  "pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]},
                                 index=pd.Index([f"{c}x{r}" for c, r in grid], name="spot")),
                var=pd.DataFrame(index=genes),
            )
            adata.obsm["spatial"] = xy
            adata.obsm[PROGRAMMES_KEY] = prog.astype(np.float32)
            adata.uns["spatial"] = {sid: {"scalefactors": {"spot_diameter_fullres": VISIUM_SPOT_UM / um_per_px}}}
            write_h5ad_atomic(adata, root / "st" / f"{sid}.h5ad", force=True)
            meta = {"id": sid, "st_technology": "Visium", "species": "synthetic", "pixel_size_um_estimated": um_per_px,
                    "pixel_size_um_embedded": um_per_px, "spot_diameter": VISIUM_SPOT_UM,
                    "inter_spot_dist": VISIUM_PITCH_UM, "spots_under_tissue": len(xy), "fullres_px_width": size,
                    "fullres_px_height": size, "z_um": i * thickness_um}
            write_text_atomic(root / "metadata" / f"{sid}.json", json.dumps(meta, indent=1))
    truth = {"generator": {"n_sections": n_sections, "spots_per_section": spots_per_section, "seed": seed,
                           "n_genes": n_genes, "n_programmes": n_programmes, "um_per_px": um_per_px,
                           "thickness_um": thickness_um, "tile": tile},
             "genes": list(genes), "loadings": loadings.tolist(), "baseline": baseline.tolist(),
             "sections": [{"id": sid, "slide_from_block": T.tolist()} for sid, T in zip(ids, transforms)]}
    write_text_atomic(root / TRUTH_FILE, json.dumps(truth))
    return BlockFiles(root, [root / "st" / f"{sid}.h5ad" for sid in ids], root / TRUTH_FILE)


def block_expected_expression(truth_file: str | Path, programmes: np.ndarray, genes) -> np.ndarray:
    """Noise-free expression (spots × `genes`) on stimpute's scale, log1p(normalize_total 1e4),
    of spots with latent `programmes` in a block written by `write_visium_block`."""
    truth = json.loads(Path(truth_file).read_text())
    rates = np.exp(np.asarray(truth["baseline"]) + np.asarray(programmes, float) @ np.asarray(truth["loadings"]))
    rates /= rates.sum(axis=1, keepdims=True)
    columns = [truth["genes"].index(g) for g in genes]
    return np.log1p(1e4 * rates[:, columns])


class _SlidePainter:
    """Renders one section's slide tile by tile (the look of `_TissueBlock.render`).

    Colour and tissue outline are smooth: they are computed once on a grid of
    `_PLAN_STEP_PX` px in slide pixels and interpolated into each tile. Nuclei (a Poisson
    process per grid cell, new in each section) and the fat-cell profiles this section
    cuts are listed for the whole slide, sorted by y, and each tile draws those it touches.
    """

    def __init__(self, block: _TissueBlock, i: int, slide_from_block: np.ndarray, rng):
        self.rng, self.um_per_px = rng, block.um_per_px
        g, S = _PLAN_STEP_PX, block.size
        n = -(-S // g)
        centres = np.arange(n) * g + (g - 1) / 2
        sx, sy = np.meshgrid(centres, centres)
        inv = np.linalg.inv(slide_from_block)
        bx, by = _apply(inv, np.c_[sx.ravel(), sy.ravel()]).T
        inside = block.inside_distance(bx, by).reshape(n, n)
        weights = block.fields_at(i, bx, by).reshape(-1, n, n).astype(np.float64) ** 2
        weights /= weights.sum(0, keepdims=True)
        colour = sum(weights[k][..., None] * np.asarray(_look(k)[0], float) for k in range(block.n_programmes))
        self.plan = np.dstack([colour, inside]).astype(np.float32)  # (n, n, 4): RGB and signed distance
        tissue = inside > 0
        nuclei = []
        for k in range(block.n_programmes):
            _, density, radius_um, _ = _look(k)
            counts = rng.poisson(weights[k] * tissue * density * (g * block.um_per_px) ** 2 / 1000.0).ravel()
            cell = np.repeat(np.arange(counts.size), counts)
            cy, cx = np.divmod(cell, n)
            radii = np.maximum(1, rng.normal(radius_um, 0.2 * radius_um, len(cell)) / block.um_per_px)
            rgb = np.clip(_NUCLEUS_RGB + rng.normal(0, 12, (len(cell), 3)), 0, 255)
            nuclei.append(np.c_[(cx + rng.random(len(cell))) * g, (cy + rng.random(len(cell))) * g, radii, rgb])
        self.nuclei = _sorted_by_y(np.concatenate(nuclei))
        x, y, zc, R = block.fat_cells.T
        r_um = np.sqrt(np.clip(R**2 - (i * block.thickness_um - zc) ** 2, 0, None))
        cut = (r_um > 2) & (block.inside_distance(x, y) > 0)
        fat_xy = _apply(slide_from_block, np.c_[x, y][cut])
        self.fat = _sorted_by_y(np.c_[fat_xy, r_um[cut] / block.um_per_px, np.tile([250.0, 248.0, 250.0], (cut.sum(), 1))])
        self.noise = rng.normal(0, 6, (1024, 1024, 3)).astype(np.float32)

    def tiles(self, size: int, tile: int, done=None):
        """Row-major (tile, tile, 3) uint8 tiles of the (size × size) slide."""
        for y0 in range(0, size, tile):
            for x0 in range(0, size, tile):
                yield self.tile(x0, y0, tile)
                if done is not None:
                    done()

    def tile(self, x0: int, y0: int, side: int, pad: int = 2) -> np.ndarray:
        g, n = _PLAN_STEP_PX, side + 2 * pad
        u = ((np.arange(n) + x0 - pad) - (g - 1) / 2) / g
        v = ((np.arange(n) + y0 - pad) - (g - 1) / 2) / g
        maps = cv2.remap(self.plan, *np.meshgrid(u.astype(np.float32), v.astype(np.float32)), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
        oy, ox = self.rng.integers(0, self.noise.shape[0] - n, 2)
        colour = np.clip(maps[..., :3] + self.noise[oy:oy + n, ox:ox + n], 0, 255)
        canvas = np.where(maps[..., 3:] > 0, colour, 255.0).astype(np.uint8)
        for items in (self.nuclei, self.fat):
            for x, y, r, *rgb in _touching(items, x0 - pad, y0 - pad, n):
                cv2.circle(canvas, (int((x - x0 + pad) * 16), int((y - y0 + pad) * 16)), int(r * 16),
                           tuple(int(c) for c in rgb), -1, lineType=cv2.LINE_AA, shift=4)
        return cv2.GaussianBlur(canvas, (3, 3), 0.7)[pad:-pad, pad:-pad]


def _sorted_by_y(items: np.ndarray) -> np.ndarray:
    return items[np.argsort(items[:, 1], kind="stable")] if len(items) else np.zeros((0, 6))


def _touching(items: np.ndarray, x0: float, y0: float, side: int) -> np.ndarray:
    """Rows (x, y, r, ...) of y-sorted discs that reach into the square [x0, x0+side)²."""
    if not len(items):
        return items
    r_max = items[:, 2].max()
    lo, hi = np.searchsorted(items[:, 1], [y0 - r_max, y0 + side + r_max])
    rows = items[lo:hi]
    x, y, r = rows[:, 0], rows[:, 1], rows[:, 2]
    return rows[(x + r >= x0) & (x - r < x0 + side) & (y + r >= y0) & (y - r < y0 + side)]


# -- built-in real data ----------------------------------------------------------------

HER2ST_MINI_SECTIONS = ("C2", "C3", "C4")


def her2st_mini_path() -> Path:
    """Folder of the packaged HER2-ST mini stack (one project section folder per section)."""
    return Path(str(resources.files("stimpute") / "data" / "her2st_mini"))


def her2st_mini() -> list[ad.AnnData]:
    """HER2-ST patient C sections C2, C3, C4 (Andersson et al., Nat Commun 2021), reduced.

    Images are downscaled 4× from the originals and genes limited to those detected in
    ≥1% of spots (`scripts/make_her2st_mini.py`); see the folder's README for citation.

    Returns
    -------
    Three AnnData objects in stack order, ready for `stimpute.tl`: raw counts in `X`, spot
    centres in `obsm["spatial"]` (full-resolution pixels), the whole H&E image as
    `uns["spatial"][name]["images"]["hires"]` (scale 1: the packaged image, no detail lost)
    with its file in `metadata["source_image_path"]`, the geometry in `uns["stimpute"]`.
    """
    from stimpute.io.inmemory import section_to_anndata

    return [section_to_anndata(section, hires_side=max(section.image.size)) for section in her2st_mini_stack()]


def her2st_mini_stack() -> Stack:
    """The same sections as `her2st_mini`, as the `Stack` the file-based steps take."""
    from stimpute.io import read_stack

    root = her2st_mini_path()
    return read_stack([root / name for name in HER2ST_MINI_SECTIONS])
