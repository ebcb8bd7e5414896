"""The synthetic 3D tissue generator and the packaged HER2-ST mini stack."""

from __future__ import annotations

import numpy as np
import pytest

from stimpute.datasets import her2st_mini_stack, synthetic_stack, synthetic_truth
from stimpute.expression import normalize_log1p


def test_same_seed_same_stack_other_seed_other_stack(synthetic):
    again = synthetic_stack(3, seed=0)
    for a, b in zip(synthetic, again):
        assert np.array_equal(a.xy, b.xy) and (a.adata.X != b.adata.X).nnz == 0
        assert np.array_equal(a.image.read_region(0, 0, *a.image.size), b.image.read_region(0, 0, *b.image.size))
    other = synthetic_stack(1, seed=1)
    assert not np.array_equal(other[0].image.read_region(0, 0, 2000, 2000), synthetic[0].image.read_region(0, 0, 2000, 2000))


def test_count_seed_draws_the_counts_again_and_nothing_else():
    """`count_seed`: a second measurement of the same stack (same tissue, image, spots)."""
    first, again = synthetic_stack(2, seed=3, n_genes=20, image_size=600, tissue_radius_um=250.0, count_seed=1), \
        synthetic_stack(2, seed=3, n_genes=20, image_size=600, tissue_radius_um=250.0)
    for a, b in zip(first, again):
        assert np.array_equal(a.xy, b.xy) and np.array_equal(a.image.read_region(0, 0, 600, 600),
                                                             b.image.read_region(0, 0, 600, 600))
        assert (a.adata.X != b.adata.X).nnz > 0.5 * a.adata.X.nnz
        totals = [np.log1p(np.asarray(x.adata.X.sum(axis=0)).ravel()) for x in (a, b)]
        assert np.corrcoef(*totals)[0, 1] > 0.9  # the same genes are high and low: the same expression model


def test_stack_shape_and_geometry(synthetic):
    assert synthetic.names == ["S0", "S1", "S2"] and synthetic.measured == synthetic.names
    for s in synthetic:
        assert 100 < s.n_spots < 400 and s.adata.n_vars == 60
        assert s.spot_diameter_px == pytest.approx(27.5)
        W, H = s.image.size
        assert np.all(s.xy >= 0) and np.all(s.xy < [W, H])
    assert [s.z_um for s in synthetic] == [0.0, 10.0, 20.0]


def test_known_transforms_map_tissue_onto_tissue(synthetic):
    """Spots of section 1 mapped with the ground truth land on tissue of section 0, and the
    latent programmes there agree (adjacent sections are near-identical slices)."""
    truth = synthetic_truth(synthetic)
    T = truth.to_reference(1)
    assert np.allclose(truth.to_reference(0), np.eye(3))
    assert np.allclose(np.abs(np.linalg.det(T[:2, :2])), 1.0)  # rigid (±1 with a flip)
    xy = synthetic[1].xy @ T[:2, :2].T + T[:2, 2]
    ref = synthetic[0].xy
    nearest = np.argmin(((xy[:, None] - ref[None]) ** 2).sum(-1), axis=1)
    dist = np.sqrt(((xy - ref[nearest]) ** 2).sum(-1))
    assert np.median(dist) < 50  # within a spot pitch (100 µm = 50 px)
    p1, p0 = truth.programmes[1], truth.programmes[0][nearest]
    r = [np.corrcoef(p1[:, k], p0[:, k])[0, 1] for k in range(p1.shape[1])]
    assert min(r) > 0.8


def test_transforms_include_rotation_and_flip_across_seeds():
    dets, angles = [], []
    for seed in range(6):  # small blocks: the transforms are drawn the same way at any size
        truth = synthetic_truth(synthetic_stack(2, seed=seed, n_genes=5, tissue_radius_um=250.0, image_size=600))
        T = truth.to_reference(1)
        dets.append(np.sign(np.linalg.det(T[:2, :2])))
        angles.append(np.degrees(np.arctan2(T[1, 0], T[0, 0])))
    assert -1 in dets and 1 in dets
    assert np.ptp(angles) > 90


def test_expression_is_driven_by_programmes_that_drive_texture(synthetic):
    """Expression–texture link: image darkness (nuclei) in each spot explains expression."""
    s, truth = synthetic[0], synthetic_truth(synthetic)
    expr = normalize_log1p(s.adata)
    r = s.spot_diameter_px
    darkness = np.array([255 - s.image.read_region(x - r, y - r, 2 * r, 2 * r).mean() for x, y in s.xy])
    prog = truth.programmes[0]
    # the tumour programme (dense large nuclei) darkens the tissue, adipose lightens it
    assert np.corrcoef(darkness, prog[:, 0])[0, 1] > 0.3
    assert np.corrcoef(darkness, prog[:, 3])[0, 1] < -0.3
    # and the same programmes explain expression: a linear fit from programmes to genes
    X = np.c_[prog, np.ones(len(prog))]
    coef, *_ = np.linalg.lstsq(X, expr, rcond=None)
    resid = expr - X @ coef
    r2 = 1 - resid.var(0) / np.maximum(expr.var(0), 1e-9)
    assert np.median(r2) > 0.3
    # and image texture alone predicts expression (ridge on colour + darkness per spot)
    colour = np.array([s.image.read_region(x - r, y - r, 2 * r, 2 * r).reshape(-1, 3).mean(0) for x, y in s.xy])
    F = np.c_[colour, darkness, np.ones(len(prog))]
    coef, *_ = np.linalg.lstsq(F, expr, rcond=None)
    pcc = [np.corrcoef(F @ coef[:, g], expr[:, g])[0, 1] for g in range(expr.shape[1]) if expr[:, g].std() > 0]
    assert np.mean(pcc) > 0.3


def test_her2st_mini_is_packaged_and_small():
    from stimpute.datasets import her2st_mini_path

    stack = her2st_mini_stack()
    assert stack.names == ["C2", "C3", "C4"] and stack.measured == ["C2", "C3", "C4"]
    assert [s.n_spots for s in stack] == [187, 180, 184]
    assert all(s.um_per_px == pytest.approx(4 * 0.687, abs=0.03) for s in stack)
    assert "ERBB2" in stack[1].genes
    size = sum(p.stat().st_size for p in her2st_mini_path().rglob("*") if p.is_file())
    assert size < 8 * 2**20
    assert "Andersson" in (her2st_mini_path() / "README.md").read_text()


def test_her2st_mini_is_anndata_that_tl_takes():
    """The notebook's first line: the same sections as the `Stack`, image in `uns["spatial"]`
    at full detail, and `st.tl` encodes, registers and imputes them as they come."""
    import stimpute as st
    from stimpute.io.inmemory import section_from_anndata

    adatas, stack = st.datasets.her2st_mini(), her2st_mini_stack()
    assert [a.n_obs for a in adatas] == [187, 180, 184] and all("ERBB2" in a.var_names for a in adatas)
    for adata, section in zip(adatas, stack):
        assert list(adata.uns["spatial"]) == [section.name]
        back = section_from_anndata(adata, section.name)
        assert np.array_equal(back.xy, section.xy) and back.um_per_px == pytest.approx(section.um_per_px)
        assert back.image.size == section.image.size and (back.adata.X != section.adata.X).nnz == 0
        patch = (1000, 1000, 64, 64)
        diff = np.abs(back.image.read_region(*patch).astype(int) - section.image.read_region(*patch).astype(int))
        assert diff.mean() < 1.0  # the same JPEG, decoded once as a whole, once as a region

    pair = adatas[:2]  # C2 and C3: enough for every step, in half the time
    st.tl.features(pair)
    assert pair[1].obsm["X_stimpute_features"].shape[0] == 180
    out = st.tl.impute(pair, known="C3", genes=["ERBB2", "GNAS"], members=["ridge"], programs="none")  # registers them too
    assert out[0].shape == (187, 2) and np.isfinite(out[0].X).all() and out[0].X.std(axis=0).min() > 0
    assert out[0].obsm["spatial_3d"].shape == (187, 3) and out[0].uns["stimpute"]["registration"]["reference"] == "C2"


@pytest.fixture(scope="module")
def visium_block(tmp_path_factory):
    from stimpute.datasets import write_visium_block

    return write_visium_block(tmp_path_factory.mktemp("visium"), n_sections=2, spots_per_section=150, seed=3, n_genes=12)


def test_visium_block_is_hest_style_files_with_pyramidal_slides(visium_block):
    """st/<id>.h5ad + wsis/<id>.tif (a tiled pyramid) + metadata/<id>.json, read as sections
    at Visium geometry, spots on tissue, about the requested number per section."""
    import json

    import tiffslide

    from stimpute.io import read_stack

    root = visium_block.root
    stack = read_stack(visium_block.sections)
    assert stack.names == visium_block.ids == ["SYNV00", "SYNV01"]
    for s in stack:
        meta = json.loads((root / "metadata" / f"{s.name}.json").read_text())
        assert meta["pixel_size_um_estimated"] == s.um_per_px == 0.5 and meta["spot_diameter"] == 55.0
        assert s.spot_diameter_px == pytest.approx(110) and 110 < s.n_spots < 200 and s.adata.n_vars == 12
        slide = tiffslide.TiffSlide(root / "wsis" / f"{s.name}.tif")
        assert slide.level_count >= 3 and slide.level_downsamples[1] == pytest.approx(2.0)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        # hexagonal 100 µm pitch: nearest neighbours 200 px apart
        d = np.sqrt(((s.xy[:, None] - s.xy[None]) ** 2).sum(-1)) + np.eye(s.n_spots) * 1e9
        assert np.median(d.min(1)) == pytest.approx(200, abs=1)
        # spots sit on tissue: their windows are darker than the glass corner of the slide
        spot = np.mean([s.image.read_region(x - 20, y - 20, 40, 40).mean() for x, y in s.xy[:20]])
        assert spot < 230 and s.image.read_region(0, 0, 40, 40).mean() > 250


def test_visium_block_truth_gives_noise_free_expression(visium_block):
    from stimpute.datasets import PROGRAMMES_KEY, block_expected_expression
    from stimpute.io import read_section

    s = read_section(visium_block.sections[0])
    expected = block_expected_expression(visium_block.truth, s.adata.obsm[PROGRAMMES_KEY], s.genes)
    measured = normalize_log1p(s.adata)
    r = [np.corrcoef(expected[:, g], measured[:, g])[0, 1] for g in range(s.adata.n_vars)]
    assert np.nanmedian(r) > 0.5
