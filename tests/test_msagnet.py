"""MSAGNet: shapes and gradients of both variants, what each variant reads, the spot loss."""

import pytest
import torch

from stimpute.models.msagnet import CROSS, MSAGNet, MSAGNetConfig, gene_loss, spot_loss

N, S, D, G = 30, 3, 16, 7


def _graph(seed=0, n_edges=120):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, N, (2, n_edges), generator=gen)
    edge_type = torch.randint(0, 2, (n_edges,), generator=gen)
    return edge_index, edge_type, torch.rand(n_edges, generator=gen)


def _model(variant):
    torch.manual_seed(0)
    return MSAGNet(D, G, S, MSAGNetConfig(width=32, heads=4, transformer_layers=1, variant=variant))


@pytest.mark.parametrize("variant", ["2d", "3d"])
def test_forward_backward_shapes(variant):
    model = _model(variant)
    x = torch.randn(N, S, D)
    pred = model(x, *_graph())
    assert pred.shape == (N, G)
    loss = spot_loss(pred, torch.randn(N, G))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_2d_variant_ignores_cross_layer_edges_and_3d_reads_them():
    x = torch.randn(N, S, D)
    edge_index, edge_type, weight = _graph()
    rewired = edge_index.clone()
    cross = edge_type == CROSS
    rewired[0, cross] = (rewired[0, cross] + 7) % N
    for variant, same in (("2d", True), ("3d", False)):
        model = _model(variant).eval()
        with torch.no_grad():
            a = model(x, edge_index, edge_type, weight)
            b = model(x, rewired, edge_type, weight)
        assert torch.allclose(a, b, atol=1e-6) is same


def test_cross_attention_reads_neighbour_regions():
    """The spot token attends over the regions of its neighbours (more than one key)."""
    model = _model("2d").eval()
    x = torch.randn(N, S, D)
    edge_index = torch.tensor([[1], [0]])  # spot 1 is a within-section neighbour of spot 0
    changed = x.clone()
    changed[1, 1:] += 5.0  # only spot 1's region tokens
    with torch.no_grad():
        before, after = (model._cross_attend([e(v[:, s]) for s, e in enumerate(model.embed)], edge_index) for v in (x, changed))
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(before[2], after[2])  # spot 2 has no neighbours: only its own regions


def test_spot_loss_is_zero_for_a_perfect_prediction_and_weights_its_terms():
    truth = torch.randn(10, G)
    assert float(spot_loss(truth, truth)) == pytest.approx(0.0, abs=1e-6)
    flipped = -truth  # PCC −1 per spot: 0.25 · 2 plus the MSE part
    mse = float(((2 * truth) ** 2).mean())
    assert float(spot_loss(flipped, truth)) == pytest.approx(0.75 * mse + 0.5, rel=1e-5)


def test_config_is_checked():
    with pytest.raises(ValueError):
        MSAGNet(D, G, S, MSAGNetConfig(variant="4d"))
    with pytest.raises(ValueError):
        MSAGNet(D, G, S, MSAGNetConfig(width=30, heads=4))


def test_gene_loss_rewards_correlation_across_spots_per_gene():
    truth = torch.tensor([[1.0, 5.0], [2.0, 4.0], [3.0, 3.0]])
    assert float(gene_loss(truth, truth)) == pytest.approx(0.0, abs=1e-6)
    shifted = truth + 1.0  # every gene's map right, its level off by one: only the MSE term
    assert float(gene_loss(shifted, truth)) == pytest.approx(0.5, rel=1e-5)
    flat = truth.mean(0, keepdim=True).expand_as(truth)  # a constant map scores no correlation
    assert float(gene_loss(flat, truth)) > 0.5
