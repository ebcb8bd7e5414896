"""Cross-layer Imputation (CLI): propagate measured expression through the 3D graph and
fuse it with MSAGNet's prediction by self-adaptive weights.

**Propagation.** The known layer's expression diffuses over the row-normalised adjacency
of the 3D graph (edge weights = match scores; within-section and cross-layer edges) for
20 steps, known spots reset after each step (ASIGN). A second, scalar diffusion of the
indicator "is known" gives each spot its *reach* r ∈ [0, 1]: the probability that a
20-step random walk from it meets a measured spot. Dividing by r turns the diffused sum
into the expected measured value at the first hit, so far layers are not shrunk towards
zero; r itself says how strongly (well-matched, near) a spot is tied to measured spots.

**Fusion.** final = w · propagated + (1 − w) · model, with
w[spot, gene] = σ(α_gene + β · logit(r_spot)). α (per gene, as in the paper) and β (the
per-spot term stimpute adds: match quality and distance from the measured layer, both
summarised by the reach) are fitted on held-out known spots, the way the paper hides 25 %
of the known labels: the validation spots of training are hidden, expression is
propagated to them from the other known spots within the known layer(s), and α, β
minimise the squared error of the fused value there, with α shrunk towards the even
split (a few dozen held-out spots give noisy per-gene weights). The model's prediction on
those spots is honest: they were not trained on. Both raw parts are returned. On HER2-ST
the per-spot term is neutral (top-50 PCC within ±0.003 of per-gene-only weights; the fitted
β is slightly negative), likely because within-layer calibration cannot show how
cross-layer match quality matters; it is kept, and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from stimpute.models.base import Method, PreparedStack, register_method
from stimpute.timing import timed
from stimpute.train import GraphBatch, TrainConfig, fit, split_known, torch_threads

PROPAGATION_STEPS = 20
FUSION_STEPS = 300
FUSION_SHRINK = 0.01  # chosen on HER2-ST (0.003-0.1 all help; see bench_impute)


@dataclass
class FusionWeights:
    """Fitted fusion parameters: per-gene logit α and the slope β on the spot's logit reach."""

    gene_logit: np.ndarray
    reach_slope: float = 0.0

    def weights(self, reach: np.ndarray) -> np.ndarray:
        """(n_spots, n_genes) weight of the propagated part."""
        z = self.gene_logit[None, :] + self.reach_slope * _logit(reach)[:, None]
        return 1.0 / (1.0 + np.exp(-z))


@dataclass
class ImputeResult:
    """Per target section (stack index): fused, model and propagated expression, weights, reach."""

    fused: dict[int, np.ndarray]
    model: dict[int, np.ndarray]
    propagated: dict[int, np.ndarray]
    weight: dict[int, np.ndarray]
    reach: dict[int, np.ndarray]
    fusion: FusionWeights
    config: TrainConfig
    calibration: dict = field(default_factory=dict)  # held-out known spots: propagated, model, truth, reach


def adjacency(graph, n_nodes: int, nodes: np.ndarray | None = None) -> sparse.csr_matrix:
    """Row-normalised weighted adjacency of the graph (restricted to `nodes` if given)."""
    src, dst = (t.cpu().numpy() for t in graph.edge_index)
    w = graph.edge_weight.cpu().numpy().astype(np.float64)
    if nodes is not None:
        inside = np.zeros(n_nodes, bool)
        inside[nodes] = True
        keep = inside[src] & inside[dst]
        src, dst, w = src[keep], dst[keep], w[keep]
    A = sparse.csr_matrix((np.clip(w, 0, None), (dst, src)), shape=(n_nodes, n_nodes))
    rows = np.asarray(A.sum(axis=1)).ravel()
    return sparse.diags(np.where(rows > 0, 1.0 / np.maximum(rows, 1e-12), 0.0)) @ A


@timed("propagation")
def propagate(A: sparse.csr_matrix, known: np.ndarray, values: np.ndarray,
              steps: int = PROPAGATION_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Label propagation with reset: (expected measured value (N, G), reach (N,)).

    Spots never reached get the known spots' mean expression (reach 0).
    """
    n = A.shape[0]
    F = np.zeros((n, values.shape[1]))
    reach = np.zeros(n)
    F[known], reach[known] = values, 1.0
    for _ in range(steps):
        F, reach = A @ F, A @ reach
        F[known], reach[known] = values, 1.0
    reached = reach > 1e-9
    out = np.tile(values.mean(0), (n, 1))
    out[reached] = F[reached] / reach[reached, None]
    return out.astype(np.float32), np.clip(reach, 0.0, 1.0)


@timed("fusion")
def fit_fusion(propagated: np.ndarray, model: np.ndarray, truth: np.ndarray, reach: np.ndarray,
               per_spot: bool = True, steps: int = FUSION_STEPS, shrink: float = FUSION_SHRINK) -> FusionWeights:
    """α (per gene) and β (per-spot reach slope) minimising the fused MSE on held-out spots,
    plus `shrink` · mean(α²): a few dozen held-out spots per gene are noisy, so each gene's
    weight is pulled towards the even split unless its data clearly say otherwise.
    """
    P, M, Y = (torch.as_tensor(a, dtype=torch.float64) for a in (propagated, model, truth))
    r = torch.as_tensor(_logit(reach), dtype=torch.float64)[:, None]
    alpha = torch.zeros(P.shape[1], dtype=torch.float64, requires_grad=True)
    beta = torch.zeros((), dtype=torch.float64, requires_grad=per_spot)
    params = [alpha, beta] if per_spot else [alpha]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        w = torch.sigmoid(alpha[None] + beta * r)
        loss = ((w * P + (1 - w) * M - Y) ** 2).mean() + shrink * (alpha**2).mean()
        loss.backward()
        opt.step()
    return FusionWeights(alpha.detach().numpy(), float(beta.detach()))


def graph_batch(prepared: PreparedStack, known: list[int], seed: int, val_fraction: float) -> tuple[GraphBatch, np.ndarray]:
    """Tensors for training on the known sections, and the known nodes' indices."""
    off = prepared.offsets
    n_genes = len(prepared.panel)
    y = np.zeros((off[-1], n_genes), np.float32)
    known_nodes = np.concatenate([np.arange(off[i], off[i + 1]) for i in known])
    for i in known:
        y[off[i]:off[i + 1]] = prepared.known_expression(i)
    held = split_known(len(known_nodes), val_fraction, seed)
    train_mask = np.zeros(off[-1], bool)
    val_mask = np.zeros(off[-1], bool)
    train_mask[known_nodes[~held]] = True
    val_mask[known_nodes[held]] = True
    g = prepared.graph
    batch = GraphBatch(
        x=torch.as_tensor(np.concatenate(prepared.features), dtype=torch.float32),
        edge_index=g.edge_index, edge_type=g.edge_type, edge_weight=g.edge_weight.float(),
        y=torch.as_tensor(y), train_mask=torch.as_tensor(train_mask), val_mask=torch.as_tensor(val_mask),
    )
    return batch, known_nodes


def impute_stack(prepared: PreparedStack, known: list[int], seed: int = 0, config: TrainConfig | None = None,
                 ckpt_dir=None, resume=None, progress: bool = False, per_spot: bool = True) -> ImputeResult:
    """ASIGN end to end on a prepared stack: train MSAGNet on the `known` sections, propagate
    their expression, fit and apply the fusion (module docstring). Targets: all other sections.
    """
    config = config or TrainConfig(seed=seed)
    batch, known_nodes = graph_batch(prepared, known, config.seed, config.val_fraction)
    module = fit(batch, config, ckpt_dir=ckpt_dir, resume=resume, progress=progress)
    with torch.no_grad(), torch_threads(config.threads):
        model = module(batch).numpy()
    n = int(prepared.offsets[-1])
    values = batch.y.numpy()[known_nodes]
    propagated, reach = propagate(adjacency(prepared.graph, n), known_nodes, values)

    held = batch.val_mask.numpy()
    seeds = batch.train_mask.numpy()
    cal_prop, cal_reach = propagate(adjacency(prepared.graph, n, known_nodes), np.flatnonzero(seeds), batch.y.numpy()[seeds])
    calibration = {"propagated": cal_prop[held], "model": model[held], "truth": batch.y.numpy()[held],
                   "reach": cal_reach[held]}
    fusion = fit_fusion(*calibration.values(), per_spot=per_spot)

    off = prepared.offsets
    result = ImputeResult({}, {}, {}, {}, {}, fusion, config, calibration)
    for i in range(len(prepared.stack)):
        if i in known:
            continue
        rows = slice(off[i], off[i + 1])
        w = fusion.weights(reach[rows]).astype(np.float32)
        result.model[i], result.propagated[i], result.reach[i], result.weight[i] = model[rows], propagated[rows], reach[rows], w
        result.fused[i] = w * propagated[rows] + (1 - w) * model[rows]
    return result


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


# -- registry: the fused output and its two parts, as benchmarkable methods -------------

_LAST: dict = {}  # one-entry memo: `asign` and `msagnet` on the same inputs train once


def _impute_once(prepared: PreparedStack, train: list[int], seed: int, config: TrainConfig | None) -> ImputeResult:
    key = (tuple(train), seed, None if config is None else config.to_yaml())
    if _LAST.get("prepared") is not prepared or _LAST.get("key") != key:
        _LAST.clear()
        _LAST.update(prepared=prepared, key=key, result=impute_stack(prepared, list(train), seed=seed, config=config))
    return _LAST["result"]


class _Asign(Method):
    needs_3d = True
    part = "fused"

    def __init__(self, config: TrainConfig | None = None):
        self.config = config

    def fit_predict(self, prepared, train, targets, seed=0):
        parts = getattr(_impute_once(prepared, train, seed, self.config), self.part)
        return {i: parts[i] for i in targets}


@register_method
class AsignMethod(_Asign):
    """ASIGN: MSAGNet (3D) fused with cross-layer propagation by self-adaptive weights."""

    name = "asign"


@register_method
class MSAGNetMethod(_Asign):
    """MSAGNet (3D graph) prediction alone, without propagation."""

    name = "msagnet"
    part = "model"


@register_method
class PropagationMethod(Method):
    """Cross-layer label propagation alone (no image model)."""

    name = "propagation"
    needs_3d = True

    def fit_predict(self, prepared, train, targets, seed=0):
        known_nodes = np.concatenate([np.arange(prepared.offsets[i], prepared.offsets[i + 1]) for i in train])
        values = np.concatenate([prepared.known_expression(i) for i in train])
        out, _ = propagate(adjacency(prepared.graph, int(prepared.offsets[-1])), known_nodes, values)
        return {i: out[prepared.offsets[i]:prepared.offsets[i + 1]] for i in targets}
