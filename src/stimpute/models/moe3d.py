"""3DMoEST: a morphology-routed sparse mixture of experts that predicts spot counts in 3D.

Each spot is described by its patch features (e.g. UNI), its 3D position (registered x, y
and z in µm, Fourier-encoded) and a Sobel gradient map of its spot patch. A router that
sees only summary statistics of the gradient map (how much edge, how it is spread) sends
the spot to `top_k` of `n_experts` small MLPs; their gate-weighted output is the logit of
each gene's share of the spot's library, plus one share for all genes outside the panel,
so that `library × softmax` is the negative-binomial mean and `log1p(1e4 × share)` is
exactly the project's normalise_total + log1p scale. Training minimises

    NB negative log-likelihood on raw counts (per-gene dispersion)
    + `balance_weight` × load-balancing term (Switch-Transformer style, 1 when uniform)
    + `gradient_weight` × coupled gradient loss,

where the coupled gradient loss asks the predicted difference between neighbouring spots
to follow the measured one, weighted by how alike the two spots' morphology is: smooth
within one tissue compartment, free to jump across a boundary (our reading of the
3DMoEST description). Masked spatial modelling (MSM) replaces the visual features of a
random `mask_prob` share of the spots by a learned token during training, so the experts
also learn from position alone.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning
import numpy as np
import torch
from scipy import sparse
from scipy.spatial import cKDTree
from torch import nn

from stimpute.errors import InputError, StimputeError
from stimpute.expression import TARGET_SUM
from stimpute.files import atomic_write
from stimpute.data import coords_3d
from stimpute.models.base import Model, register_method
from stimpute.prepare import PreparedStack
from stimpute.features.sobel import sobel_gradients

EDGE_LEVELS = (0.05, 0.1, 0.2)  # gradient magnitudes (grey levels / 255 per px) counted as edges


@dataclass(frozen=True)
class MoE3DConfig:
    """Settings of the model and its training (defaults used by the benchmark)."""

    n_experts: int = 6
    top_k: int = 2
    hidden: int = 128
    n_frequencies: int = 6
    min_wavelength_um: float = 400.0  # shortest Fourier wavelength: about two spot pitches
    max_wavelength_um: float = 8000.0  # longest: the size of a section
    use_coords: bool | None = None  # None: when the stack is registered and has > 1 section
    thickness_um: float | None = None  # z spacing for coords_3d (default: the stack's)
    pca_dim: int = 32  # visual features standardised, then PCA on the training spots (0: keep all)
    mask_prob: float = 0.25  # MSM: share of spots whose visual features are masked
    router_noise: float = 0.5  # std of the noise added to router logits in training
    balance_weight: float = 0.01
    gradient_weight: float = 0.1
    dropout: float = 0.5
    epochs: int = 200  # full-batch optimisation steps
    lr: float = 3e-3
    weight_decay: float = 1e-3
    prediction: str = "mean"  # "mean": log1p(1e4 × share); "expected": E[log1p] under the fitted NB
    accelerator: str = "cpu"  # Lightning's, from --device (stimpute.device.resolve_device)
    devices: int | str = 1  # Lightning's devices, num_nodes, strategy (stimpute.device.parallel_options)
    num_nodes: int = 1
    strategy: str = "auto"


PREDICTIONS = ("mean", "expected")


# -- morphology ------------------------------------------------------------------------------
def sobel_summary(maps: np.ndarray) -> np.ndarray:
    """Rotation-invariant router inputs (n, 10): mean, sd, 5 quantiles of the gradient
    magnitude, and the share of pixels above each of `EDGE_LEVELS`."""
    flat = np.asarray(maps, np.float32).reshape(len(maps), -1)
    quantiles = np.quantile(flat, [0.1, 0.25, 0.5, 0.75, 0.9], axis=1).T
    edges = np.stack([(flat > t).mean(axis=1) for t in EDGE_LEVELS], axis=1)
    return np.column_stack([flat.mean(axis=1), flat.std(axis=1), quantiles, edges]).astype(np.float32)


# -- building blocks -------------------------------------------------------------------------
def fourier_frequencies(n: int, min_wavelength: float, max_wavelength: float) -> np.ndarray:
    """`n` frequencies (cycles per unit) spaced geometrically from 1/max to 1/min wavelength."""
    return np.geomspace(1.0 / max_wavelength, 1.0 / min_wavelength, n)


class FourierEncoding(nn.Module):
    """(N, d) positions -> (N, d × 2F): sin(2π f x) for every coordinate and frequency, then cos.

    Feature order: coordinate-major, sin block then cos block per coordinate, frequencies
    ascending within a block.
    """

    def __init__(self, frequencies: np.ndarray):
        super().__init__()
        self.register_buffer("frequencies", torch.as_tensor(frequencies, dtype=torch.float32))

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        angles = 2 * torch.pi * xyz[:, :, None] * self.frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)


class TopKRouter(nn.Module):
    """Router: morphology statistics (N, S) -> sparse gates (N, E) with exactly k non-zeros
    (softmax over the k largest logits) and the dense router probabilities (N, E)."""

    def __init__(self, n_inputs: int, n_experts: int, top_k: int, noise: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..{n_experts}, got {top_k}")
        self.top_k, self.noise = top_k, noise
        self.net = nn.Sequential(nn.Linear(n_inputs, 32), nn.GELU(), nn.Linear(32, n_experts))

    def forward(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(stats)
        if self.training and self.noise > 0:
            logits = logits + self.noise * torch.randn_like(logits)
        top = logits.topk(self.top_k, dim=1)
        gates = torch.zeros_like(logits).scatter(1, top.indices, top.values.softmax(dim=1))
        return gates, logits.softmax(dim=1)


def load_balance_loss(gates: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """E × Σ_e (share of routing slots given to e) × (mean router probability of e); 1 when even."""
    n_experts = gates.shape[1]
    chosen = (gates > 0).float()
    share = chosen.sum(dim=0) / chosen.sum()
    return n_experts * (share * probs.mean(dim=0)).sum()


def nb_log_likelihood(counts: torch.Tensor, mean: torch.Tensor, dispersion: torch.Tensor) -> torch.Tensor:
    """Element-wise log NB(counts; mean, dispersion θ): variance = mean + mean² / θ.

    Same as scipy's `nbinom.logpmf(counts, n=θ, p=θ / (θ + mean))`.
    """
    eps = 1e-8
    log_total = torch.log(dispersion + mean + eps)
    return (
        torch.lgamma(counts + dispersion)
        - torch.lgamma(dispersion)
        - torch.lgamma(counts + 1)
        + dispersion * (torch.log(dispersion + eps) - log_total)
        + counts * (torch.log(mean + eps) - log_total)
    )


def expected_log1p(mean: torch.Tensor, dispersion: torch.Tensor, library: float, max_count: int = 3000,
                   chunk: int = 16) -> torch.Tensor:
    """E[log1p(1e4 × Y / library)] for Y ~ NB(mean, dispersion), (n, G) from (n, G) means.

    log1p of the mean overstates the expected log1p (Jensen), most for sparse genes; this
    sums over counts 0..K (K covers mean + 8 sd, at most `max_count`), `chunk` spots at a time.
    """
    sd = (mean + mean**2 / dispersion).sqrt()
    k = int(min(max_count, float((mean + 8 * sd).max().ceil())))
    y = torch.arange(k + 1, dtype=mean.dtype)
    value = torch.log1p(TARGET_SUM * y / library)
    out = torch.empty_like(mean)
    for a in range(0, len(mean), chunk):
        m = mean[a : a + chunk, :, None]
        out[a : a + chunk] = (nb_log_likelihood(y, m, dispersion[:, None]).exp() * value).sum(dim=-1)
    return out


def coupled_gradient_loss(pred: torch.Tensor, truth: torch.Tensor, edges: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over neighbour pairs (2, P) of ‖(ŷ_i − ŷ_j) − (y_i − y_j)‖² / genes."""
    if edges.shape[1] == 0:
        return pred.sum() * 0.0
    i, j = edges
    diff = (pred[i] - pred[j]) - (truth[i] - truth[j])
    return (weight * diff.pow(2).mean(dim=1)).sum() / weight.sum()


class MoE3DNet(nn.Module):
    """Visual features (N, V), router statistics (N, S) and optional 3D positions (N, 3) ->
    logits (N, G + 1) of each gene's share of the library (+ the rest), gates, router probs."""

    def __init__(self, n_visual: int, n_stats: int, n_out: int, config: MoE3DConfig, use_coords: bool):
        super().__init__()
        c = config
        self.mask_token = nn.Parameter(torch.zeros(n_visual))
        self.visual = nn.Sequential(nn.Linear(n_visual, c.hidden), nn.GELU(), nn.Dropout(c.dropout))
        self.fourier = (
            FourierEncoding(fourier_frequencies(c.n_frequencies, c.min_wavelength_um, c.max_wavelength_um)) if use_coords else None
        )
        n_in = c.hidden + (6 * c.n_frequencies if use_coords else 0)
        self.router = TopKRouter(n_stats, c.n_experts, c.top_k, c.router_noise)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, c.hidden), nn.GELU(), nn.Dropout(c.dropout), nn.Linear(c.hidden, n_out))
            for _ in range(c.n_experts)
        )
        self.log_dispersion = nn.Parameter(torch.zeros(n_out))

    def forward(self, visual, stats, xyz=None, mask=None):
        if mask is not None:
            visual = torch.where(mask[:, None], self.mask_token.expand_as(visual), visual)
        h = self.visual(visual)
        if self.fourier is not None:
            h = torch.cat([h, self.fourier(xyz)], dim=1)
        gates, probs = self.router(stats)
        out = torch.stack([expert(h) for expert in self.experts], dim=1)
        return (gates[:, :, None] * out).sum(dim=1), gates, probs


class MoE3DModule(lightning.LightningModule):
    """Full-batch training of `MoE3DNet` on the training spots (one batch = all of them, from `MoE3DData`)."""

    def __init__(self, net: MoE3DNet, config: MoE3DConfig):
        super().__init__()
        self.net, self.config = net, config

    def training_step(self, batch, batch_idx):
        c = self.config
        mask = torch.rand(len(batch["visual"]), device=self.device) < c.mask_prob
        logits, gates, probs = self.net(batch["visual"], batch["stats"], batch.get("xyz"), mask)
        share = logits.softmax(dim=1)
        mean = batch["library"][:, None] * share
        nb = -nb_log_likelihood(batch["counts"], mean, self.net.log_dispersion.exp()).mean()
        pred = torch.log1p(TARGET_SUM * share[:, :-1])
        gradient = coupled_gradient_loss(pred, batch["log1p"], batch["edges"], batch["edge_weight"])
        balance = load_balance_loss(gates, probs)
        loss = nb + c.balance_weight * balance + c.gradient_weight * gradient
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)


class MoE3DData(lightning.LightningDataModule):
    """The training spots (inputs, counts and their neighbour pairs) as one full batch,
    `steps` times: one epoch of `steps` optimisation steps."""

    def __init__(self, batch: dict, steps: int):
        super().__init__()
        self.batch, self.steps = batch, steps

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_RepeatedBatch(self.batch, self.steps), batch_size=None)


class _RepeatedBatch(torch.utils.data.Dataset):
    """The same full batch `steps` times: one epoch of `steps` optimisation steps."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.batch


# -- the method ------------------------------------------------------------------------------
@dataclass
class SpotScaler:
    """Training-spot statistics that turn features and Sobel statistics into model inputs:
    visual features standardised, projected on `pca_dim` principal axes (not whitened, so
    noise directions stay small) and scaled to unit mean variance; statistics standardised."""

    v_mean: np.ndarray
    v_sd: np.ndarray
    axes: np.ndarray  # (k, D) principal axes, or (0, D) for no projection
    axes_mean: np.ndarray
    v_scale: float
    s_mean: np.ndarray
    s_sd: np.ndarray

    @classmethod
    def fit(cls, visual: np.ndarray, stats: np.ndarray, pca_dim: int, seed: int) -> "SpotScaler":
        from sklearn.decomposition import PCA

        v_mean, v_sd = visual.mean(axis=0), visual.std(axis=0) + 1e-6
        z = (visual - v_mean) / v_sd
        k = min(pca_dim, len(z) - 1, z.shape[1])
        axes, axes_mean = np.zeros((0, z.shape[1])), np.zeros(z.shape[1])
        if pca_dim and k < z.shape[1]:
            pca = PCA(k, random_state=seed).fit(z)
            axes, axes_mean = pca.components_, pca.mean_
        scaler = cls(v_mean, v_sd, axes, axes_mean, 1.0, stats.mean(axis=0), stats.std(axis=0) + 1e-6)
        scaler.v_scale = float(np.sqrt(scaler.visual(visual).var(axis=0).mean()) + 1e-6)
        return scaler

    def visual(self, v: np.ndarray) -> np.ndarray:
        z = (v - self.v_mean) / self.v_sd
        return ((z - self.axes_mean) @ self.axes.T if len(self.axes) else z) / self.v_scale

    def stats(self, s: np.ndarray) -> np.ndarray:
        return (s - self.s_mean) / self.s_sd


@register_method
class MoE3D(Model):
    """3DMoEST (see module docstring). After `fit_predict`/`predict`, `routing_[i]` holds
    the gates (n_i, n_experts) of every section it saw, for routing maps. Saved as
    `moe3d.pt` in a model folder."""

    name = "moe3d"
    config_class = MoE3DConfig
    saved = "moe3d.pt"

    def __init__(self, config: MoE3DConfig | None = None, **options):
        super().__init__(config, **options)
        self.routing_: dict[int, np.ndarray] = {}
        self.net_: MoE3DNet | None = None
        self.scaler_: SpotScaler | None = None
        self.panel_: list[str] = []
        self.use_coords_ = False
        self.library_ = TARGET_SUM  # median training library size, for "expected" predictions

    @classmethod
    def train_config(cls, epochs: int | None = None) -> MoE3DConfig:
        """Images only, without coordinates; `epochs` (an early-stopping limit elsewhere) does
        not apply: training is `config.epochs` full-batch steps."""
        return MoE3DConfig(use_coords=False)

    def fit_predict(self, prepared: PreparedStack, train: list[int], targets: list[int], seed: int = 0) -> dict[int, np.ndarray]:
        self.fit(prepared, train, seed)
        predictions = self.predict(prepared, sorted(set(train) | set(targets)))
        return {i: predictions[i] for i in targets}

    def fit(self, prepared: PreparedStack, train: list[int], seed: int = 0, checkpoints: Path | None = None,
            progress: bool = False) -> "MoE3D":
        """Train on the measured sections `train` of `prepared` (full batch, seeded)."""
        c = self.config
        if c.prediction not in PREDICTIONS:
            raise StimputeError("moe3d", f"prediction must be one of {', '.join(PREDICTIONS)}, got {c.prediction!r}")
        lightning.seed_everything(seed, workers=True, verbose=False)
        use_coords = c.use_coords if c.use_coords is not None else (prepared.coords_ref is not None and len(prepared.stack) > 1)
        self.use_coords_ = use_coords
        raw = {i: _raw_inputs(prepared, i) for i in train}
        self.scaler_ = SpotScaler.fit(np.concatenate([raw[i][0] for i in train]), np.concatenate([raw[i][1] for i in train]), c.pca_dim, seed)
        self.panel_ = list(prepared.panel)
        inputs = self._inputs(prepared, train, raw)
        counts, library = zip(*(_counts(prepared, i) for i in train))
        batch = {key: torch.cat([inputs[i][key] for i in train]) for key in inputs[train[0]]}
        batch.update(
            counts=torch.as_tensor(np.concatenate(counts)),
            library=torch.as_tensor(np.concatenate(library)),
            log1p=torch.as_tensor(np.concatenate([prepared.known_expression(i) for i in train]), dtype=torch.float32),
        )
        self.library_ = float(batch["library"].median())
        edges, weight = _train_edges(prepared, train, batch["stats"].numpy())
        batch.update(edges=torch.as_tensor(edges), edge_weight=torch.as_tensor(weight))
        net = MoE3DNet(batch["visual"].shape[1], batch["stats"].shape[1], len(self.panel_) + 1, c, use_coords)
        module = MoE3DModule(net, c)
        from stimpute.threads import torch_threads

        with warnings.catch_warnings(), torch_threads(1):  # tiny full-batch steps: threads only add overhead
            warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
            _trainer(c.epochs, c).fit(module, datamodule=MoE3DData(batch, c.epochs))
        self.net_ = net.eval().cpu()
        return self

    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        """log1p(1e4 × predicted share) of every panel gene for the sections `targets`."""
        if self.net_ is None:
            raise StimputeError(None, "moe3d: the model is not trained (call fit or load a saved model)")
        if list(prepared.panel) != self.panel_:
            raise StimputeError(None, "moe3d: the prepared stack's gene panel differs from the model's")
        inputs = self._inputs(prepared, targets)
        predictions = {}
        with torch.inference_mode():
            for i in targets:
                logits, gates, _ = self.net_(inputs[i]["visual"], inputs[i]["stats"], inputs[i].get("xyz"))
                self.routing_[i] = gates.numpy()
                share = logits.softmax(dim=1)[:, :-1].double()
                if self.config.prediction == "expected":
                    dispersion = self.net_.log_dispersion.exp()[:-1].double()
                    predictions[i] = expected_log1p(self.library_ * share, dispersion, self.library_).numpy().astype(np.float32)
                else:
                    predictions[i] = torch.log1p(TARGET_SUM * share).numpy().astype(np.float32)
        return predictions

    def save(self, folder: str | Path) -> Path:
        """Write the trained model (weights, input scaling, panel, settings) to `folder/moe3d.pt`."""
        path = Path(folder) / self.saved
        state = {"config": asdict(replace(self.config, use_coords=self.use_coords_)), "panel": self.panel_,
                 "scaler": asdict(self.scaler_), "library": self.library_,
                 "dims": (self.net_.visual[0].in_features, self.net_.router.net[0].in_features),
                 "state_dict": self.net_.state_dict()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "MoE3D":
        """A model written by `save`, ready to `predict`."""
        path = Path(folder) / cls.saved
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            method = cls(MoE3DConfig(**state["config"]))
            method.panel_, method.scaler_ = list(state["panel"]), SpotScaler(**state["scaler"])
            method.library_ = float(state["library"])
            method.use_coords_ = bool(method.config.use_coords)
            net = MoE3DNet(*state["dims"], len(method.panel_) + 1, method.config, method.use_coords_)
            net.load_state_dict(state["state_dict"])
        except (OSError, KeyError, TypeError, RuntimeError) as exc:
            raise InputError(path, f"not a moe3d model file ({type(exc).__name__}: {exc})") from None
        method.net_ = net.eval()
        return method

    def _inputs(self, prepared: PreparedStack, sections: list[int], raw: dict | None = None) -> dict[int, dict]:
        """Model inputs per section: scaled visual features and statistics, µm coordinates."""
        if self.use_coords_ and prepared.coords_ref is None:
            raise StimputeError(None, "moe3d: this model uses 3D coordinates; the stack has no registration")
        xyz = coords_3d(prepared.stack, prepared.coords_ref, self.config.thickness_um) if self.use_coords_ else None
        out = {}
        for i in sections:
            visual, stats = raw[i] if raw else _raw_inputs(prepared, i)
            out[i] = {"visual": torch.as_tensor(self.scaler_.visual(visual), dtype=torch.float32),
                      "stats": torch.as_tensor(self.scaler_.stats(stats), dtype=torch.float32)}
            if xyz is not None:
                out[i]["xyz"] = torch.as_tensor(xyz[i], dtype=torch.float32)
        return out


def _trainer(steps: int, config: MoE3DConfig) -> lightning.Trainer:
    """A seeded, deterministic, quiet trainer for one epoch of `steps` full-batch steps, on
    the hardware `config` records."""
    from stimpute.trainer import lightning_flags, quiet_trainer

    return quiet_trainer(1, log_every_n_steps=max(1, steps), **lightning_flags(config))


def _raw_inputs(prepared: PreparedStack, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened patch features (all scales) and Sobel statistics of section i."""
    section = prepared.stack[i]
    visual = np.asarray(prepared.features[i], np.float32).reshape(section.n_spots, -1)
    return visual, sobel_summary(sobel_gradients(section))


def _counts(prepared: PreparedStack, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw panel counts with one extra column for all other genes (n, G + 1), and library size."""
    adata = prepared.stack[i].adata
    prepared.known_expression(i)  # raises a clear error if the section has no counts
    X = adata.X
    library = np.asarray(X.sum(axis=1), np.float64).ravel()
    panel = adata[:, list(prepared.panel)].X
    panel = panel.toarray() if sparse.issparse(panel) else np.asarray(panel)
    rest = np.clip(library - panel.sum(axis=1), 0, None)
    return np.column_stack([panel, rest]).astype(np.float32), library.astype(np.float32)


def _train_edges(prepared: PreparedStack, train: list[int], stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour pairs (2, P) within each training section (≤ 1.5 × the median spot pitch),
    in training-batch rows, and their morphology weights exp(−‖Δstats‖² / median)."""
    pairs, start = [], 0
    for i in train:
        xy = prepared.stack[i].xy
        if len(xy) > 1:
            tree = cKDTree(xy)
            pitch = np.median(tree.query(xy, k=2)[0][:, 1])
            found = np.array(sorted(tree.query_pairs(1.5 * pitch)), dtype=np.int64).reshape(-1, 2)
            pairs.append(found + start)
        start += len(xy)
    edges = np.concatenate(pairs).T if pairs else np.zeros((2, 0), np.int64)
    dist = ((stats[edges[0]] - stats[edges[1]]) ** 2).sum(axis=1)
    weight = np.exp(-dist / (np.median(dist) + 1e-6)) if dist.size else dist
    return edges, weight.astype(np.float32)
