"""Cross-layer matching (analytic disc IoU, top-k) and the 2D/3D spot graphs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from stimpute.data import Section, Stack
from stimpute.errors import StimputeError
from stimpute.graph import CROSS, WITHIN, build_graph, build_graph_2d, load_graph, save_graph, within_edges
from stimpute.image import SectionImage
from stimpute.register.matching import disc_iou, match_spots


def grid_section(name: str, n: int = 5, pitch: float = 20.0, grid: bool = True, diameter_px: float = 10.0) -> Section:
    """n×n square array of spots, `pitch` px apart, on a blank 200 px image at 1 µm/px."""
    col, row = np.meshgrid(np.arange(n), np.arange(n))
    obs = pd.DataFrame({"array_col": col.ravel(), "array_row": row.ravel()} if grid else {},
                       index=[f"{c}x{r}" for c, r in zip(col.ravel(), row.ravel())])
    adata = ad.AnnData(obs=obs)
    adata.obsm["spatial"] = np.c_[col.ravel(), row.ravel()].astype(float) * pitch + 30.0
    image = SectionImage(array=np.full((200, 200, 3), 255, np.uint8))
    return Section(name, adata, image, um_per_px=1.0, spot_diameter_um=diameter_px)


def test_disc_iou_closed_form_matches_pixel_count():
    assert disc_iou(np.array([0.0]), 5, 5)[0] == pytest.approx(1.0)
    assert disc_iou(np.array([10.0, 25.0]), 5, 5).tolist() == [0.0, 0.0]
    assert disc_iou(np.array([0.0]), 2, 4)[0] == pytest.approx(0.25)  # small disc inside: area ratio
    yy, xx = np.mgrid[-60:60:0.05, -60:60:0.05]
    for d, r1, r2 in [(6.0, 5.0, 5.0), (3.0, 4.0, 7.0), (9.0, 3.0, 8.0)]:
        a, b = np.hypot(xx, yy) < r1, np.hypot(xx - d, yy) < r2
        expected = (a & b).sum() / (a | b).sum()
        assert disc_iou(np.array([d]), r1, r2)[0] == pytest.approx(expected, abs=2e-3)


def test_match_spots_overlap_cosine_and_top_k():
    xy_a = np.array([[0.0, 0.0], [100.0, 0.0]])
    xy_b = np.array([[3.0, 0.0], [0.0, 4.0], [100.0, 50.0]])  # the third overlaps nothing
    table = match_spots(xy_a, xy_b, 5.0, 5.0)
    assert set(zip(table["a"], table["b"])) == {(0, 0), (0, 1)}
    assert table["cosine"].isna().all() and np.allclose(table["score"], table["iou"])
    fa = np.array([[1.0, 0.0], [0.0, 1.0]])
    fb = np.stack([np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])] * 3, axis=1)  # (n, 3, d): spot scale used
    table = match_spots(xy_a, xy_b, 5.0, 5.0, fa, fb, k=1)
    assert list(zip(table["a"], table["b"])) == [(0, 1), (0, 0)]  # b0 keeps its own best link (a0)
    row = table.iloc[0]
    assert row["cosine"] == pytest.approx(1.0) and row["score"] == pytest.approx(row["iou"] + 1.0)


def test_within_edges_grid_and_pixel_fallback():
    for section in (grid_section("g"), grid_section("p", grid=False)):
        edges = within_edges(section)
        centre = 12  # (2, 2): its 8-neighbour ring is linked, nothing beyond 2 grid units / 1.5 pitches
        assert {12 + dr * 5 + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)} - {centre} <= set(edges[1, edges[0] == centre])
        length = np.linalg.norm(section.xy[edges[0]] - section.xy[edges[1]], axis=1) / 20.0
        assert length.max() <= (2.0 if "array_row" in section.adata.obs else 1.5) + 1e-9
        assert set(map(tuple, edges.T)) == set(map(tuple, edges[::-1].T))  # both directions


def test_build_graph_3d_contract_and_round_trip(tmp_path):
    stack = Stack([grid_section("A"), grid_section("B", n=4)], thickness_um=10.0)
    coords = [stack[0].xy, stack[1].xy + np.array([4.0, 0.0])]  # B's spots 4 px right of A's
    data = build_graph(stack, coords)
    assert data.num_nodes == 25 + 16
    assert data.section.tolist() == [0] * 25 + [1] * 16
    assert data.spot.tolist() == list(range(25)) + list(range(16))
    assert data.pos.shape == (41, 3) and data.pos[25:, 2].eq(10.0).all()
    cross = data.edge_index[:, data.edge_type == CROSS]
    assert cross.shape[1] == 2 * 16  # each B spot overlaps exactly one A spot, stored both ways
    assert (data.section[cross[0]] != data.section[cross[1]]).all()
    weights = data.edge_weight[data.edge_type == CROSS]
    assert torch.allclose(weights, torch.full_like(weights, float(disc_iou(np.array([4.0]), 5, 5)[0])))
    assert data.edge_weight[data.edge_type == WITHIN].eq(1.0).all()
    assert data.section_names == ["A", "B"]

    path = save_graph(data, tmp_path / "graph.pt")
    back = load_graph(path)
    for key in ("edge_index", "edge_type", "edge_weight", "section", "spot", "pos"):
        assert torch.equal(back[key], data[key])
    assert back.num_nodes == data.num_nodes and back.section_names == ["A", "B"]


def test_build_graph_2d_and_bad_input(tmp_path):
    data = build_graph_2d(grid_section("A"))
    assert data.edge_type.eq(WITHIN).all() and data.num_nodes == 25
    stack = Stack([grid_section("A"), grid_section("B")])
    with pytest.raises(StimputeError, match="coords_ref"):
        build_graph(stack, [stack[0].xy])
    (tmp_path / "bad.pt").write_bytes(b"not a graph")
    with pytest.raises(StimputeError, match="bad.pt"):
        load_graph(tmp_path / "bad.pt")
