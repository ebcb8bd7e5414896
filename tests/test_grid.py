"""Virtual spot grids on H&E-only sections, laid in the known section's registered frame."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from stimpute import Stack, StimputeError
from stimpute.datasets import synthetic_stack, synthetic_truth
from stimpute.io import read_section
from stimpute.register import apply_transform
from stimpute.register.grid import GridOptions, Lattice, known_lattice, place_virtual_spots


@pytest.fixture(scope="module")
def block():
    """A synthetic 2-section stack whose second section is handed over as a PNG alone."""
    return synthetic_stack(2, seed=3)


def _image_only(section, folder, name="he_1"):
    path = folder / f"{name}.png"
    Image.fromarray(section.image.read_region(0, 0, *section.image.size)).save(path)
    return read_section(path, um_per_px=section.um_per_px)


def _placed(block, folder, options=None):
    stack = Stack([block[0], _image_only(block[1], folder)])
    return stack, place_virtual_spots(stack, [0], options)


@pytest.fixture(scope="module")
def placed(block, tmp_path_factory):
    """The PNG section's spots placed with the default options (one registration for the tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # registration's checks must not choke on a section without spots
        return _placed(block, tmp_path_factory.mktemp("placed"))


def test_virtual_spots_lie_above_measured_spots(block, placed):
    stack, reg = placed
    virtual, measured = stack[1], block[1]
    assert virtual.name == "he_1" and virtual.report["lattice"] == "hexagonal"
    pitch_px = 100.0 / block[0].um_per_px
    assert 0.7 * measured.n_spots <= virtual.n_spots <= 1.05 * measured.n_spots  # pale fat may read as glass
    assert cKDTree(measured.xy).query(virtual.xy)[0].max() < pitch_px  # no spot on glass
    truth = synthetic_truth(block).to_reference(1, 0)
    in_known = apply_transform(truth, virtual.xy)  # true position of each virtual spot in the known section's pixels
    dist, _ = cKDTree(block[0].xy).query(in_known)
    overlapping = dist < 0.5 * pitch_px
    assert overlapping.mean() > 0.8 and np.median(dist[overlapping]) < 0.1 * pitch_px
    assert np.allclose(reg.coords_ref[1], apply_transform(reg.transforms[1], virtual.xy))
    assert virtual.spot_diameter_um == block[0].spot_diameter_um and not virtual.has_counts


def test_user_pitch_diameter_and_super_resolution(block, placed, tmp_path):
    base = placed[0][1].n_spots
    fine, _ = _placed(block, tmp_path, GridOptions(grid_scale=0.5))
    assert 3.4 * base < fine[1].n_spots < 4.6 * base
    coarse, _ = _placed(block, tmp_path, GridOptions(pitch_um=200.0, spot_diameter_um=80.0))
    assert 0.18 * base < coarse[1].n_spots < 0.32 * base
    assert coarse[1].spot_diameter_um == 80.0 and coarse[1].pitch_um == pytest.approx(200.0)
    with pytest.raises(StimputeError, match="--grid-scale: must be a positive number"):
        GridOptions(grid_scale=0)


def test_square_lattice_from_array_indices_and_from_positions(block):
    rng = np.random.default_rng(0)
    col, row = np.meshgrid(np.arange(5), np.arange(4))
    angle = 0.3
    R = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * 50.0
    xy = np.c_[col.ravel(), row.ravel()] @ R.T + [100, 200]
    section = replace(block[0], adata=block[0].adata[: len(xy)].copy())
    section.adata.obs["array_col"], section.adata.obs["array_row"] = col.ravel(), row.ravel()
    fitted = known_lattice(section, xy + rng.normal(0, 0.5, xy.shape))
    assert not fitted.hexagonal and fitted.pitch == pytest.approx(50.0, rel=0.02)
    del section.adata.obs["array_col"]
    estimated = known_lattice(section, xy)
    assert not estimated.hexagonal and estimated.pitch == pytest.approx(50.0, rel=0.02)
    points, _ = estimated.points_in(np.array([[90, 190], [400, 450]], float))
    assert cKDTree(points).query(xy)[0].max() < 1e-6  # every real spot is a lattice point


def test_hexagonal_lattice_pitch():
    lattice = Lattice(np.zeros(2), np.array([[50.0, 0.0], [0.0, 100.0 * np.sqrt(3) / 2]]), hexagonal=True)
    assert lattice.pitch == pytest.approx(100.0)


def test_image_section_needs_a_known_section(block, tmp_path):
    with pytest.raises(StimputeError, match="needs a measured"):
        place_virtual_spots(Stack([block[0], _image_only(block[1], tmp_path)]), [])
