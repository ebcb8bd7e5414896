"""Node-bounded batches of a spot graph: training and inference in memory set by a node
budget (`TrainConfig.batch_nodes`, `--batch-nodes`), not by the size of the stack.

A graph network's output at a node depends only on the nodes within its receptive field
(`hops` edges upstream, each hop over every edge type or over some: MSAGNet's
`MSAGNet.reach`, one hop over every edge, then one over within-section edges). So the
prediction at a set of seed nodes computed on their in-neighbourhood (every edge between
its nodes kept) equals the prediction on the whole graph, and so do the loss and its
gradients. Three regimes, chosen by `training_plan`:

1. every node is within reach of the labelled ones and the graph fits the budget: one
   full-graph batch (what stimpute always did; HER2-ST);
2. the in-neighbourhood of all labelled nodes fits: one batch of that subgraph — the
   same loss as full batch, without the unlabelled sections far from the known ones
   (a deep stack's training cost then does not grow with its number of sections);
3. otherwise mini-batches: the labelled spots in spatial order (section, then
   rows: `pos`) are cut into runs whose in-neighbourhoods each fit the budget (a run that
   does not is halved). Spatial runs, because a random seed set's 2-hop neighbourhood
   covers most of its section and the ones next to it (on a Visium grid, 500 random
   spots of 4,000 reach ~90% of them), so it bounds nothing; a band of rows reaches only
   a few more rows and the same band of the neighbouring sections. The per-gene PCC
   loss is then computed within a band of at least `MIN_BATCH_SPOTS` spots (by default
   at most `TrainConfig.band_spots`, 512: several rows of a Visium section) — an
   estimate of the correlation over all known spots that sees the variation along and
   within the band.
   The bands are visited in a seeded random order drawn anew each epoch. Validation
   reads the same bands, and its loss is computed over all their held-out spots at
   the end of the epoch, as on the whole graph.

Inference (`node_chunks`) runs over runs of the nodes asked for (all, or a few sections')
in the same spatial order, each within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from stimpute.errors import StimputeError

MIN_BATCH_SPOTS = 32  # labelled spots per mini-batch, at least: the per-gene PCC needs a sample of spots


@dataclass
class SubgraphBatch:
    """Seeds and their in-neighbourhood: `nodes` (global ids, sorted), the edges among them
    (`edge_index` relabelled to positions in `nodes`; `edge_mask` selects them from the
    graph's edges) and `seeds` (positions of the seed nodes in `nodes`)."""

    nodes: torch.Tensor
    edge_index: torch.Tensor
    edge_mask: torch.Tensor
    seeds: torch.Tensor


Hops = int | Sequence[Sequence[int] | None]  # hops over every edge, or each hop's edge types (None: every type)


def in_neighbourhood(seeds: torch.Tensor, edge_index: torch.Tensor, n_nodes: int, hops: Hops,
                     edge_type: torch.Tensor | None = None) -> SubgraphBatch:
    """Every node whose message can reach a seed within `hops`: a number of hops over every
    edge, or per hop (from the seeds upstream) the edge types it follows (None: every type;
    `edge_type` (E,) tells them apart)."""
    steps = [None] * hops if isinstance(hops, int) else list(hops)
    source, target = edge_index
    member = torch.zeros(n_nodes, dtype=torch.bool)
    member[seeds] = True
    for types in steps:
        follow = member[target]
        if types is not None:
            follow &= torch.isin(edge_type, torch.as_tensor(list(types), dtype=edge_type.dtype))
        member[source[follow]] = True
    nodes = torch.nonzero(member).flatten()
    position = torch.full((n_nodes,), -1, dtype=torch.long)
    position[nodes] = torch.arange(len(nodes))
    edge_mask = member[source] & member[target]
    return SubgraphBatch(nodes, position[edge_index[:, edge_mask]], edge_mask, position[seeds])


def spatial_order(nodes: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """`nodes` sorted by section (z), then row (y), then x of `pos` (N, 3); as given without `pos`."""
    if pos is None:
        return nodes
    p = pos[nodes].detach().cpu().numpy()
    return nodes[torch.as_tensor(np.lexsort((p[:, 0], p[:, 1], p[:, 2])))]


def bounded_runs(ordered: torch.Tensor, edge_index: torch.Tensor, n_nodes: int, hops: Hops, budget: int,
                 parts: int = 1, min_seeds: int = MIN_BATCH_SPOTS,
                 edge_type: torch.Tensor | None = None) -> list[SubgraphBatch]:
    """`ordered` seeds cut into at least `parts` consecutive runs whose in-neighbourhoods hold
    at most `budget` nodes each (a run over budget is halved); raises where that needs runs
    of fewer than `min_seeds` seeds."""
    todo = list(torch.tensor_split(ordered, max(1, min(parts, len(ordered)))))
    done = []
    while todo:
        part = todo.pop(0)
        sub = in_neighbourhood(part, edge_index, n_nodes, hops, edge_type)
        if len(sub.nodes) <= budget:
            done.append(sub)
        elif len(part) >= 2 * min_seeds:
            todo[:0] = list(torch.tensor_split(part, 2))
        else:
            raise StimputeError("--batch-nodes", f"{budget} nodes is too small a batch: {len(part)} spots need "
                                f"{len(sub.nodes)} nodes within the model's reach, and a batch needs at least "
                                f"{min_seeds} spots (the per-gene correlation loss); raise it")
    return done


def node_chunks(n_nodes: int, edge_index: torch.Tensor, hops: Hops, budget: int,
                pos: torch.Tensor | None = None, edge_type: torch.Tensor | None = None,
                nodes: torch.Tensor | None = None) -> list[SubgraphBatch]:
    """`nodes` (default all), in spatial order, in runs whose in-neighbourhoods fit `budget` nodes."""
    ordered = spatial_order(torch.arange(n_nodes) if nodes is None else nodes, pos)
    return bounded_runs(ordered, edge_index, n_nodes, hops, budget, -(-len(ordered) // budget), min_seeds=1,
                        edge_type=edge_type)


def restrict(batch, sub: SubgraphBatch, **masks):
    """`batch` (a `stimpute.models.msagnet_training.GraphBatch`) cut to the subgraph `sub`; `masks` replace its
    train/val masks (over the subgraph's nodes)."""
    return replace(batch, x=batch.x[sub.nodes], edge_index=sub.edge_index, edge_type=batch.edge_type[sub.edge_mask],
                   edge_weight=batch.edge_weight[sub.edge_mask], y=batch.y[sub.nodes],
                   train_mask=masks.get("train_mask", batch.train_mask[sub.nodes]),
                   val_mask=masks.get("val_mask", batch.val_mask[sub.nodes]),
                   pos=None if batch.pos is None else batch.pos[sub.nodes])


def seed_mask(sub: SubgraphBatch) -> torch.Tensor:
    """Boolean mask over the subgraph's nodes: its seeds."""
    mask = torch.zeros(len(sub.nodes), dtype=torch.bool)
    mask[sub.seeds] = True
    return mask
