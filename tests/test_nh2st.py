"""NH²2ST: neighbour grids on square and hex lattices, the contrastive loss, shapes, a tiny fit."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from stimpute.data import Section
from stimpute.metrics import pearson_columns
from stimpute.expression import panel_expression
from stimpute.image import SectionImage
from stimpute.prepare import PreparedStack
from stimpute.models import get_method
from stimpute.models.nh2st import (NH2ST, NH2STConfig, NH2STNet, info_nce, load_nh2st, neighbour_grid,
                                   predict_nh2st, train_nh2st)
from stimpute.figures import expression_heatmaps


def lattice_section(cols, rows) -> Section:
    """A section with only array indices (and dummy pixels/image) for lattice tests."""
    obs = pd.DataFrame({"array_col": cols, "array_row": rows}, index=[f"s{i}" for i in range(len(cols))])
    adata = ad.AnnData(obs=obs)
    adata.obsm["spatial"] = np.c_[cols, rows].astype(float)
    return Section("L", adata, SectionImage(array=np.full((8, 8, 3), 255, np.uint8)), um_per_px=1.0)


def test_neighbour_grid_square_lattice():
    c, r = np.meshgrid(np.arange(1, 7), np.arange(1, 5))  # 6 columns x 4 rows, HER2-ST style
    section = lattice_section(c.ravel(), r.ravel())
    grid = neighbour_grid(section, size=5)
    assert grid.shape == (24, 25)
    assert (grid[:, 12] == np.arange(24)).all()  # the spot itself in the middle
    lookup = {(cc, rr): i for i, (cc, rr) in enumerate(zip(c.ravel(), r.ravel()))}
    spot = lookup[(3, 2)]
    assert grid[spot, 13] == lookup[(4, 2)]  # right neighbour
    assert grid[spot, 7] == lookup[(3, 1)]  # row above
    assert grid[spot, 0] == -1  # (1, 0): off the array
    assert grid[spot, 24] == lookup[(5, 4)]
    corner = lookup[(1, 1)]
    assert (grid[corner] >= 0).sum() == 9  # a 3x3 quarter window


def test_neighbour_grid_hex_lattice_uses_offset_columns():
    r, c = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    cols, rows = (2 * c + r % 2).ravel(), r.ravel()  # Visium: doubled columns
    section = lattice_section(cols, rows)
    grid = neighbour_grid(section, size=5)
    lookup = {(cc, rr): i for i, (cc, rr) in enumerate(zip(cols, rows))}
    spot = lookup[(4, 2)]  # offset column 2, row 2
    assert grid[spot, 12] == spot
    assert grid[spot, 13] == lookup[(6, 2)]  # same row: next spot two array columns away
    assert grid[spot, 7] == lookup[(5, 1)]  # row above, same offset column: half a pitch right
    assert grid[spot, 6] == lookup[(3, 1)]  # and half a pitch left
    assert (grid[spot] >= 0).all()  # an interior spot has its full 5x5 window
    assert neighbour_grid(section, size=5, lattice="square")[spot, 13] == -1  # odd columns are empty


def test_neighbour_grid_rejects_duplicates_and_even_sizes():
    from stimpute.errors import StimputeError

    with pytest.raises(StimputeError, match="share one array position"):
        neighbour_grid(lattice_section([1, 1], [2, 2]))
    with pytest.raises(StimputeError, match="odd"):
        neighbour_grid(lattice_section([1, 2], [2, 2]), size=4)


def test_contrastive_loss_prefers_aligned_pairs():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(32, 16, generator=gen)
    gene = image + 0.1 * torch.randn(32, 16, generator=gen)
    aligned = info_nce(image, gene, 0.05)
    shuffled = info_nce(image, gene[torch.randperm(32, generator=gen)], 0.05)
    assert aligned < 0.1 < 2.0 < shuffled


def test_net_shapes_and_masking():
    torch.manual_seed(0)
    cfg = NH2STConfig(emb_dim=32, num_heads=4)
    net = NH2STNet(query_dim=21, neighbour_dim=7, n_genes=11, cfg=cfg).eval()
    query, neigh = torch.randn(5, 21), torch.randn(5, 25, 7)
    mask = torch.rand(5, 25) > 0.3
    mask[:, 12] = True
    pred, img_spot, img_neigh = net(query, neigh, mask)
    assert pred.shape == (5, 11) and img_spot.shape == (5, 32) and img_neigh.shape == (5, 32)
    changed = neigh.clone()
    changed[~mask] = 1e3  # features behind the mask must not matter
    assert torch.allclose(net(query, changed, mask)[0], pred, atol=1e-5)


def colour_features(section: Section) -> np.ndarray:
    """Cheap per-spot features (n, 3 scales, 6): mean and sd of RGB in windows of 1, 2, 4 spot diameters."""
    d = section.spot_diameter_px
    out = np.empty((section.n_spots, 3, 6), np.float32)
    for i, (x, y) in enumerate(section.xy):
        for s, k in enumerate((1, 2, 4)):
            patch = section.image.read_region(x - k * d / 2, y - k * d / 2, k * d, k * d).reshape(-1, 3) / 255.0
            out[i, s] = np.r_[patch.mean(0), patch.std(0)]
    return out


@pytest.fixture(scope="module")
def prepared(synthetic):
    panel = synthetic[0].genes[:20]
    return PreparedStack(stack=synthetic, panel=panel, expression=[panel_expression(s, panel) for s in synthetic],
                         features=[colour_features(s) for s in synthetic])


TINY = dict(emb_dim=32, num_heads=4, max_epochs=15, patience=5)


def test_fit_predict_small_synthetic_stack_and_checkpoint(prepared, synthetic, tmp_path):
    model = get_method("nh2st", **TINY)
    preds = model.fit_predict(prepared, train=[0, 1], targets=[2], seed=0)
    assert set(preds) == {2} and preds[2].shape == (synthetic[2].n_spots, len(prepared.panel))
    pcc = np.nan_to_num(pearson_columns(preds[2], prepared.expression[2]))
    assert pcc.mean() > 0.2
    # seeded and deterministic; the saved checkpoint alone reproduces the predictions
    train_nh2st(prepared, [0, 1], seed=0, cfg=NH2STConfig(**TINY), checkpoint=tmp_path / "m.ckpt")
    again = predict_nh2st(load_nh2st(tmp_path / "m.ckpt"), prepared, [2])
    np.testing.assert_allclose(again[2], preds[2], atol=1e-5)
    assert model.save(tmp_path / "model") == tmp_path / "model" / "checkpoints" / "nh2st.ckpt"
    np.testing.assert_allclose(NH2ST.load(tmp_path / "model").predict(prepared, [2])[2], preds[2], atol=1e-5)


def test_cross_validation_by_section(prepared, tmp_path):
    cfg = NH2STConfig(**{**TINY, "max_epochs": 2})
    table = NH2ST(cfg).cross_validate(prepared, [0, 1, 2], n_folds=2, folder=tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["fold0.ckpt", "fold1.ckpt"]
    assert sorted(set(table.section)) == ["S0", "S1", "S2"] and len(table) == 3 * len(prepared.panel)
    assert set(table.fold) == {0, 1}


def test_expression_heatmaps_figure(synthetic, tmp_path):
    values = np.random.default_rng(0).random((synthetic[0].n_spots, 2))
    thumb = np.full((50, 50, 3), 255, np.uint8)
    out = expression_heatmaps(thumb, synthetic[0].xy / 40, ["A", "B"], values, tmp_path / "fig.png", measured=values[::-1])
    assert out.stat().st_size > 1000


def test_expression_maps_paint_each_spot_in_its_colour(tmp_path):
    """The maps are rasterised: each spot's disc, at its true size, takes its value's colour."""
    from matplotlib import colormaps
    from PIL import Image

    xy = np.array([[100.0, 100.0], [300.0, 100.0], [100.0, 300.0], [300.0, 300.0]])
    values = np.array([[0.0], [1.0], [0.0], [1.0]])
    out = expression_heatmaps(np.full((400, 400, 3), 255, np.uint8), xy, ["A"], values, tmp_path / "maps.png", diameter=80.0)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    for value, count in ((0.0, 2), (1.0, 2)):
        colour = (np.array(colormaps["viridis"](value)[:3]) * 255).round()
        solid = np.abs(image - colour).max(-1) <= 3
        assert solid.sum() > count * 0.5 * np.pi * 20 ** 2  # two discs, each well over half a 40 px disc at ~0.9 px/px
    assert Image.open(out).size[0] >= 500  # H&E, the map and its colour bar side by side
