"""Patch extraction: centring, µm scales, padding, batching, stain normalisation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stimpute.data import Section
from stimpute.image import SectionImage
from stimpute.patches import SCALES_UM, iter_patches, padding_report, window_sizes_px
from stimpute.stain import REF_MAX_CONC, REF_STAINS, IO, MacenkoNormalizer

SCALES = (32.0, 64.0, 128.0)


def make_section(image: np.ndarray, xy: np.ndarray, um_per_px: float = 1.0, name: str = "S") -> Section:
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
    adata.obsm["spatial"] = np.asarray(xy, float)
    return Section(name=name, adata=adata, image=SectionImage(array=image), um_per_px=um_per_px)


def marker_section(seed: int = 0) -> Section:
    """White image with a 5×5 black marker centred on each spot (spots 140 ± 20 px apart)."""
    rng = np.random.default_rng(seed)
    img = np.full((460, 600, 3), 255, np.uint8)
    gx, gy = np.meshgrid(90 + 140 * np.arange(4), 90 + 140 * np.arange(3))
    xy = np.c_[gx.ravel(), gy.ravel()] + rng.integers(-10, 11, (12, 2))
    for x, y in xy:
        img[y - 2 : y + 3, x - 2 : x + 3] = 0
    return make_section(img, xy)


def dark_centroid(patch: np.ndarray) -> np.ndarray:
    w = 255.0 - patch.mean(axis=2)
    ys, xs = np.indices(w.shape)
    return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def test_spot_patch_is_centred_on_the_spot():
    section = marker_section()
    batches = list(iter_patches(section, scales_um=SCALES, out_size=32, batch_size=5))
    patches = np.concatenate([b.patches for b in batches])
    assert patches.shape == (12, 3, 32, 32, 3)
    for spot in patches:
        # scale 0 is read 1:1, its centre pixel at (16, 16); larger scales are resampled
        assert np.allclose(dark_centroid(spot[0]), 16.0, atol=0.01)
        for s in (1, 2):
            assert np.allclose(dark_centroid(spot[s]), 15.75, atol=0.6)


def test_batches_cover_all_spots_in_order_and_stay_bounded():
    section = marker_section()
    batches = list(iter_patches(section, scales_um=SCALES, out_size=16, batch_size=5))
    assert [len(b.index) for b in batches] == [5, 5, 2]
    assert np.array_equal(np.concatenate([b.index for b in batches]), np.arange(12))
    assert all(b.patches.dtype == np.uint8 and b.patches.shape[1:] == (3, 16, 16, 3) for b in batches)


def test_scales_are_in_micrometres():
    section = marker_section()
    section.um_per_px = 2.0
    assert list(window_sizes_px(section, SCALES)) == [16, 32, 64]
    ref = make_section(np.zeros((10, 10, 3), np.uint8), [[5, 5]], um_per_px=0.686)
    assert list(window_sizes_px(ref, SCALES_UM)) == [224, 512, 1024]


def test_edge_spots_are_padded_white_and_reported():
    img = np.zeros((200, 200, 3), np.uint8)  # black tissue everywhere
    section = make_section(img, [[100, 100], [5, 100], [100, 170]])
    assert padding_report(section, SCALES) == {"32um": 1, "64um": 2, "128um": 2}
    patches = next(iter_patches(section, scales_um=SCALES, out_size=32)).patches
    assert patches[0, 0].max() == 0  # fully inside: no padding
    assert (patches[1, 0][:, :5] == 255).all() and (patches[1, 0][:, 12:] == 0).all()


def stained_image(rng, shape=(64, 64)) -> np.ndarray:
    """An image rendered from the reference H&E stains with random concentrations."""
    conc = rng.uniform(0, 1, (*shape, 2)) * REF_MAX_CONC * rng.uniform(0.3, 1, (*shape, 1))
    return np.clip(IO * np.exp(-conc @ REF_STAINS.T), 0, 255).astype(np.uint8)


def test_macenko_recovers_reference_stains_and_is_near_identity_on_them():
    rng = np.random.default_rng(0)
    img = stained_image(rng)
    norm = MacenkoNormalizer.fit(img)
    ref = REF_STAINS / np.linalg.norm(REF_STAINS, axis=0)
    assert (np.abs(norm.stains - ref) < 0.1).all()  # H first, then E
    assert np.abs(norm(img).astype(int) - img).mean() < 8


def test_macenko_maps_a_stain_shift_back():
    rng = np.random.default_rng(1)
    img = stained_image(rng)
    shifted = np.clip(img.astype(int) + [10, -25, 15], 0, 255).astype(np.uint8)
    out = MacenkoNormalizer.fit(shifted)(shifted)
    assert np.abs(out.astype(int) - img).mean() < np.abs(shifted.astype(int) - img).mean()


@pytest.mark.her2st
def test_her2st_c3_patches_all_spots_three_scales(her2st_root):
    from stimpute.io import read_section

    section = read_section(her2st_root / "C3")
    assert padding_report(section) == {"spot": 0, "region512": 0, "region1024": 0}
    n, tissue = 0, []
    for batch in iter_patches(section, batch_size=64):
        n += len(batch.index)
        assert batch.patches.shape[1:] == (3, 224, 224, 3)
        tissue.append((batch.patches[:, 0, 96:128, 96:128].mean(axis=(1, 2, 3)) < 215))
    assert n == section.n_spots
    assert np.concatenate(tissue).mean() > 0.9  # spots sit on tissue
