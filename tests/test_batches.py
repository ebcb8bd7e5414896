"""Node-bounded batches (`stimpute.batches`): the in-neighbourhood gives the full graph's
loss and gradients, mini-batches and inference chunks stay within the node budget."""

from __future__ import annotations

import os

import pytest
import torch

from stimpute.batches import MIN_BATCH_SPOTS, in_neighbourhood, node_chunks
from stimpute.errors import StimputeError
from stimpute.models.msagnet import CROSS, WITHIN, MSAGNet, MSAGNetConfig, gene_loss
from stimpute.threads import LARGE_GRAPH_NODES
from stimpute.models.msagnet_training import (GraphBatch, GraphData, TrainConfig, fit, predict_graph, schedule,
                            threads_for, training_plan)

SMALL = MSAGNetConfig(width=16, heads=2, transformer_layers=1)


def grid_stack(sections: int = 4, side: int = 10, known: tuple[int, ...] = (1,), seed: int = 0) -> GraphBatch:
    """Square-grid sections stacked in z: 4-neighbour within-section edges, cross-layer edges
    between the same grid cell of adjacent sections; labels on the `known` sections."""
    gen = torch.Generator().manual_seed(seed)
    n_sec = side * side
    n = sections * n_sec
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cell = (rows * side + cols).flatten()
    edges, types = [], []
    for s in range(sections):
        for dr, dc in ((0, 1), (1, 0)):
            ok = ((rows + dr < side) & (cols + dc < side)).flatten()
            a = s * n_sec + cell[ok]
            b = a + dr * side + dc
            edges += [torch.stack([a, b]), torch.stack([b, a])]
            types += [WITHIN] * 2 * int(ok.sum())
        if s + 1 < sections:
            a, b = s * n_sec + cell, (s + 1) * n_sec + cell
            edges += [torch.stack([a, b]), torch.stack([b, a])]
            types += [CROSS] * 2 * n_sec
    edge_index = torch.cat(edges, dim=1)
    x = torch.randn(n, 3, 8, generator=gen)
    y = x[:, 0, :5] * 0.5 + x[:, 1, :5] * 0.3 + 0.1 * torch.randn(n, 5, generator=gen)
    labelled = torch.zeros(n, dtype=torch.bool)
    for s in known:
        labelled[s * n_sec:(s + 1) * n_sec] = True
    val = labelled & (torch.rand(n, generator=gen) < 0.25)
    pos = torch.stack([cols.flatten().repeat(sections), rows.flatten().repeat(sections),
                       torch.arange(sections).repeat_interleave(n_sec)], dim=1).float()
    return GraphBatch(x, edge_index, torch.as_tensor(types), torch.rand(edge_index.shape[1], generator=gen), y,
                      labelled & ~val, val, pos)


def _model(batch: GraphBatch) -> MSAGNet:
    torch.manual_seed(0)
    model = MSAGNet(batch.x.shape[2], batch.y.shape[1], 3, SMALL).eval()  # eval: no dropout draw to tell apart
    model.set_feature_scaling(batch.x)
    return model


def test_the_in_neighbourhood_gives_the_full_graph_loss_and_gradients():
    batch = grid_stack()
    model = _model(batch)
    seeds = torch.nonzero(batch.train_mask).flatten()
    full = gene_loss(model(batch.x, batch.edge_index, batch.edge_type, batch.edge_weight)[seeds], batch.y[seeds])
    full.backward()
    full_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    sub = in_neighbourhood(seeds, batch.edge_index, len(batch.x), MSAGNet.reach, batch.edge_type)
    assert len(sub.nodes) == 300  # sections 0-2: section 3 is two cross-layer edges away
    assert len(in_neighbourhood(seeds, batch.edge_index, len(batch.x), 2).nodes) > 300  # two hops over every edge reach it
    nodes = sub.nodes
    part = gene_loss(model(batch.x[nodes], sub.edge_index, batch.edge_type[sub.edge_mask],
                           batch.edge_weight[sub.edge_mask])[sub.seeds], batch.y[nodes][sub.seeds])
    part.backward()
    assert torch.allclose(part, full, atol=1e-6)
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, full_grads[k], atol=1e-6), k
    one_hop = in_neighbourhood(seeds, batch.edge_index, len(batch.x), 1)  # a smaller field is not enough
    with torch.no_grad():
        short = model(batch.x[one_hop.nodes], one_hop.edge_index, batch.edge_type[one_hop.edge_mask],
                      batch.edge_weight[one_hop.edge_mask])[one_hop.seeds]
    assert not torch.allclose(short, model(batch.x, batch.edge_index, batch.edge_type, batch.edge_weight)[seeds],
                              atol=1e-4)


def test_chunked_inference_equals_one_pass_and_chunks_fit_the_budget():
    batch = grid_stack()
    model = _model(batch)
    whole = predict_graph(model, batch, budget=len(batch.x))
    for budget in (150, 90):
        chunks = node_chunks(len(batch.x), batch.edge_index, MSAGNet.reach, budget, batch.pos, batch.edge_type)
        assert all(len(c.nodes) <= budget for c in chunks) and len(chunks) > 1
        assert torch.equal(torch.sort(torch.cat([c.nodes[c.seeds] for c in chunks])).values, torch.arange(len(batch.x)))
        assert torch.allclose(predict_graph(model, batch, budget), whole, atol=1e-5)
        some = torch.arange(len(batch.x) // 3, len(batch.x) // 2)  # a few sections' nodes: only their reach is run
        assert len(node_chunks(len(batch.x), batch.edge_index, MSAGNet.reach, budget, batch.pos, batch.edge_type,
                               some)) < len(chunks)
        assert torch.allclose(predict_graph(model, batch, budget, some), whole[some], atol=1e-5)
    assert torch.equal(predict_graph(model, batch, len(batch.x), some), whole[some])


def test_training_plan_picks_whole_graph_subgraph_or_bounded_mini_batches():
    assert training_plan(grid_stack(sections=4), 400, 2) is None  # all within reach and fits: the whole graph
    batch = grid_stack(sections=5)
    n = len(batch.x)
    sub, = training_plan(batch, n, 2)  # section 4 is out of reach: it is left out even where the graph fits
    assert len(sub.nodes) == 400
    sub, = training_plan(batch, 450, 2)  # the labelled section's 2-hop in-neighbourhood
    assert len(sub.nodes) == 400  # sections 0-3 (section 4 is out of reach)
    plan = training_plan(batch, 300, 2)
    assert len(plan) > 1 and all(len(s.nodes) <= 300 for s in plan)
    labelled = torch.nonzero(batch.train_mask | batch.val_mask).flatten()
    assert torch.equal(torch.sort(torch.cat([s.nodes[s.seeds] for s in plan])).values, labelled)  # every spot once
    assert len(training_plan(batch, n, 2, parts=2)) >= 2  # two processes: a batch each at least
    data = GraphData(batch, 300, hops=2)
    bands = [data.train_dataloader().dataset[i] for i in range(len(plan))]
    assert sum(int(b.train_mask.sum()) for b in bands) == int(batch.train_mask.sum())  # context nodes carry no loss
    assert sum(int(b.val_mask.sum()) for b in bands) == int(batch.val_mask.sum())
    assert all(int((b.train_mask | b.val_mask).sum()) >= MIN_BATCH_SPOTS and len(b.x) <= 300 for b in bands)
    with pytest.raises(StimputeError, match="--batch-nodes: 200 nodes is too small"):
        training_plan(batch, 200, 2)


def test_mini_batch_training_learns_and_resumes_exactly(tmp_path):
    batch = grid_stack(known=(1, 2))
    cfg = dict(patience=100, seed=1, batch_nodes=250, model=SMALL, lr=3e-3)
    full = fit(batch, TrainConfig(max_epochs=24, **cfg), ckpt_dir=tmp_path / "full")
    assert len(full.trainer.datamodule.plan) == 4 and full.trainer.current_epoch == 6  # 24 steps' worth: 6 epochs of 4
    fit(batch, TrainConfig(max_epochs=12, **cfg), ckpt_dir=tmp_path / "part")
    resumed = fit(batch, TrainConfig(max_epochs=24, **cfg), ckpt_dir=tmp_path / "part", resume=tmp_path / "part" / "last.ckpt")
    pred = predict_graph(full.model, batch, 250)
    assert torch.equal(pred, predict_graph(resumed.model, batch, 250))
    held = batch.val_mask
    pcc = torch.corrcoef(torch.stack([pred[held, 0], batch.y[held, 0]]))[0, 1]
    assert pcc > 0.3  # six epochs of four steps: it learns


def test_big_known_sections_take_several_steps_an_epoch_and_as_many_steps_in_all():
    batch = grid_stack(sections=3, known=(1,))  # 100 labelled spots, a graph within budget
    assert training_plan(batch, 10_000, 2, band_spots=100) is None  # up to band_spots: one full-graph step
    bands = training_plan(batch, 10_000, 2, band_spots=40)
    assert len(bands) == 3 and all(len(b.seeds) <= 40 for b in bands)  # ⌈100 / 40⌉ bands, one step each
    assert schedule(TrainConfig(max_epochs=200, patience=20), 1) == (200, 20)  # HER2-ST: as set
    assert schedule(TrainConfig(max_epochs=200, patience=20), 4) == (50, 5)  # the same optimiser steps
    assert schedule(TrainConfig(max_epochs=200, patience=20), 40) == (5, 2)


def test_threads_follow_the_graph_size_unless_set():
    assert threads_for(TrainConfig(threads=3), 10) == 3
    assert threads_for(TrainConfig(), LARGE_GRAPH_NODES - 1) == 1
    assert threads_for(TrainConfig(), LARGE_GRAPH_NODES) == (os.cpu_count() or 1)


def test_early_stopping_counts_only_gains_of_min_delta():
    """Issue 28: training stops once the held-out loss has not improved by `min_delta` for
    `patience` epochs; gains below it (jitter of a flat loss) no longer keep it going."""
    batch = grid_stack(known=(1, 2))
    cfg = dict(max_epochs=60, patience=3, seed=1, model=SMALL, lr=3e-3)
    strict = fit(batch, TrainConfig(min_delta=1.0, **cfg))  # no gain is that large: stops after `patience`
    assert strict.trainer.current_epoch == 4
    loose = fit(batch, TrainConfig(min_delta=0.0, **cfg))
    assert loose.trainer.current_epoch > 4
