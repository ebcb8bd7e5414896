"""NH²2ST: neighbour-aware expression prediction with dual-scale contrastive learning.

Two branches read cached patch features (`PreparedStack.features`):
- the **query branch** embeds the target spot's features (spot patch and its two context
  windows side by side, the information a linear probe gets);
- the **neighbour branch** embeds the spot-scale patches of its `size`×`size`
  neighbourhood on the section's spot lattice (`neighbour_grid`; missing neighbours are
  masked out of attention and pooling) with a small transformer.
The query attends to its neighbours (cross-attention) and a linear head regresses the
gene panel. During training only, gene encoders embed the spot's expression and its
neighbourhood's mean expression, and InfoNCE losses align image and gene embeddings at
spot scale and at neighbourhood scale (temperatures 0.05/0.05, weights 1.0/0.5) beside
the regression loss. Prediction needs images only.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from stimpute.data import Section
from stimpute.errors import StimputeError
from stimpute.metrics import gene_metrics, pearson_columns
from stimpute.files import atomic_write
from stimpute.models.base import Model, register_method
from stimpute.prepare import PreparedStack
from stimpute.threads import torch_threads
from stimpute.trainer import lightning_checkpoint, lightning_flags, quiet_trainer, split_known

SPOT_SCALE = 0  # index of the spot-scale patch in PreparedStack.features (neighbour tokens)


# ----------------------------------------------------------------------------- lattice


def lattice_positions(section: Section, lattice: str = "auto") -> np.ndarray:
    """Spot (column, row) on a square grid: the section's array indices, hex lattices unfolded.

    `lattice`: "square" (legacy ST, HER2-ST: array_col/array_row are unit steps), "hex"
    (Visium: doubled columns, array_col = 2*c + row % 2, mapped to offset column c) or
    "auto" (hex when array_col + array_row has one parity for every spot).
    """
    obs = section.adata.obs
    if "array_row" not in obs or "array_col" not in obs:
        raise StimputeError(section.source or section.name, 'spots have no obs["array_row"/"array_col"] lattice indices')
    col = obs["array_col"].to_numpy().astype(np.int64)
    row = obs["array_row"].to_numpy().astype(np.int64)
    if lattice == "auto":
        parity = (col + row) % 2
        lattice = "hex" if len(parity) > 1 and (parity == parity[0]).all() else "square"
    if lattice == "hex":
        col = col // 2
    elif lattice != "square":
        raise StimputeError("lattice", f"unknown lattice {lattice!r} (square, hex or auto)")
    return np.c_[col, row]


def neighbour_grid(section: Section, size: int = 5, lattice: str = "auto") -> np.ndarray:
    """Indices (n_spots, size*size) of each spot's neighbourhood, -1 where no spot is there.

    Row-major over (row offset, column offset) in -size//2..size//2, so the spot itself is
    the middle entry. On hex lattices the window spans `size` offset columns per row.
    """
    if size < 1 or size % 2 == 0:
        raise StimputeError("res_neighbor", f"neighbourhood size must be odd and positive, got {size}")
    pos = lattice_positions(section, lattice)
    lookup = {(int(c), int(r)): i for i, (c, r) in enumerate(pos)}
    if len(lookup) != len(pos):
        raise StimputeError(section.source or section.name, "two spots share one array position")
    half = size // 2
    offsets = [(dc, dr) for dr in range(-half, half + 1) for dc in range(-half, half + 1)]
    return np.array([[lookup.get((int(c) + dc, int(r) + dr), -1) for dc, dr in offsets] for c, r in pos],
                    dtype=np.int64).reshape(len(pos), size * size)


# ----------------------------------------------------------------------------- model


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of `a` and `b` (B, E): row i of each is the positive."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, K, E) over the K entries where mask (B, K) is True."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


@dataclass
class NH2STConfig:
    """Hyper-parameters (defaults from the NH²2ST configuration; batch size chosen for CPU)."""

    emb_dim: int = 512
    depth: int = 1
    num_heads: int = 8
    mlp_ratio: float = 1.0
    dropout: float = 0.5
    res_neighbor: int = 5
    temperature_spot: float = 0.05
    temperature_neighbour: float = 0.05
    loss_ratio_spot: float = 1.0
    loss_ratio_neighbour: float = 0.5
    learning_rate: float = 5e-4
    batch_size: int = 32
    max_epochs: int = 200
    patience: int = 20
    val_fraction: float = 0.15
    lattice: str = "auto"
    accelerator: str = "cpu"  # Lightning's, from --device (stimpute.device.resolve_device)
    devices: int | str = 1  # Lightning's devices, num_nodes, strategy (stimpute.device.parallel_options)
    num_nodes: int = 1
    strategy: str = "auto"


class NH2STNet(nn.Module):
    """Query + neighbour branches fused by cross-attention; gene encoders for the contrastive terms.

    `forward(query (B, Dq), neighbours (B, K, Dn), mask (B, K) True=present)` returns the
    standardised prediction (B, G) and the spot- and neighbourhood-scale image embeddings (B, E).
    """

    def __init__(self, query_dim: int, neighbour_dim: int, n_genes: int, cfg: NH2STConfig):
        super().__init__()
        E, K = cfg.emb_dim, cfg.res_neighbor**2
        hidden = max(1, int(E * cfg.mlp_ratio))
        self.query_proj = nn.Sequential(nn.Linear(query_dim, E), nn.LayerNorm(E))
        self.neighbour_proj = nn.Sequential(nn.Linear(neighbour_dim, E), nn.LayerNorm(E))
        self.position = nn.Parameter(torch.zeros(1, K, E))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(E, cfg.num_heads, hidden, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.neighbour_encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(E, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.fuse_norm = nn.LayerNorm(E)
        self.fuse_mlp = nn.Sequential(nn.Linear(E, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, E))
        self.head = nn.Sequential(nn.LayerNorm(E), nn.Dropout(cfg.dropout), nn.Linear(E, n_genes))
        self.gene_spot = _gene_encoder(n_genes, E, cfg.dropout)
        self.gene_neighbour = _gene_encoder(n_genes, E, cfg.dropout)

    def forward(self, query: torch.Tensor, neighbours: torch.Tensor, mask: torch.Tensor):
        q = self.query_proj(query).unsqueeze(1)
        tokens = self.neighbour_encoder(self.neighbour_proj(neighbours) + self.position, src_key_padding_mask=~mask)
        attended, _ = self.cross(q, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        fused = q + attended
        fused = (fused + self.fuse_mlp(self.fuse_norm(fused))).squeeze(1)
        return self.head(fused), q.squeeze(1), masked_mean(tokens, mask)


def _gene_encoder(n_genes: int, dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(n_genes, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))


# ----------------------------------------------------------------------------- data


@dataclass
class SpotTable:
    """Spots of several sections as flat tensors: features, neighbour indices, expression."""

    features: torch.Tensor  # (N, S, D) features at every scale
    neighbours: torch.Tensor  # (N, K) flat indices into features, -1 where missing
    expression: torch.Tensor | None  # (N, G) log1p expression, None when predicting

    def batch(self, idx: torch.Tensor):
        """Query features (B, S*D), neighbour spot-scale features (B, K, D), presence mask (B, K)."""
        nb = self.neighbours[idx]
        return self.features[idx].flatten(1), self.features[nb.clamp_min(0), SPOT_SCALE], nb >= 0


def spot_table(prepared: PreparedStack, sections: list[int], size: int, lattice: str = "auto",
               with_expression: bool = True) -> SpotTable:
    """Stack the spot-scale features (and expression) of `sections`, neighbours re-indexed globally."""
    feats, neighbours, expr, offset = [], [], [], 0
    for i in sections:
        f = np.asarray(prepared.features[i])
        grid = neighbour_grid(prepared.stack[i], size, lattice)
        feats.append(f)
        neighbours.append(np.where(grid >= 0, grid + offset, -1))
        if with_expression:
            expr.append(prepared.known_expression(i))
        offset += len(f)
    return SpotTable(
        torch.as_tensor(np.concatenate(feats), dtype=torch.float32),
        torch.as_tensor(np.concatenate(neighbours)),
        torch.as_tensor(np.concatenate(expr), dtype=torch.float32) if with_expression else None,
    )


# ----------------------------------------------------------------------------- lightning


class NH2STModule(L.LightningModule):
    """Training logic: regression + dual-scale contrastive loss; validation mean per-gene PCC.

    Batches come from `NH2STData`. Feature and expression standardisation statistics are
    buffers, so a checkpoint alone predicts new sections.
    """

    def __init__(self, n_scales: int, in_dim: int, n_genes: int, panel: list[str] | None = None, **config):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = NH2STConfig(**config)
        self.net = NH2STNet(n_scales * in_dim, in_dim, n_genes, self.cfg)
        for name, shape in (("feat_mean", (n_scales, in_dim)), ("feat_std", (n_scales, in_dim)),
                            ("expr_mean", (n_genes,)), ("expr_std", (n_genes,))):
            self.register_buffer(name, torch.zeros(shape) if "mean" in name else torch.ones(shape))
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def standardise_from(self, table: SpotTable, train_idx: torch.Tensor) -> None:
        """Feature and expression standardisation from the training spots `train_idx` only."""
        self.feat_mean.copy_(table.features[train_idx].mean(0))
        self.feat_std.copy_(table.features[train_idx].std(0).clamp_min(1e-6))
        self.expr_mean.copy_(table.expression[train_idx].mean(0))
        self.expr_std.copy_(table.expression[train_idx].std(0).clamp_min(1e-3))

    def _forward(self, query: torch.Tensor, neigh: torch.Tensor, mask: torch.Tensor):
        query = (query - self.feat_mean.flatten()) / self.feat_std.flatten()
        neigh = (neigh - self.feat_mean[SPOT_SCALE]) / self.feat_std[SPOT_SCALE] * mask.unsqueeze(-1)
        return self.net(query, neigh, mask)

    def _standard(self, expression: torch.Tensor) -> torch.Tensor:
        return (expression - self.expr_mean) / self.expr_std

    def training_step(self, batch: dict, batch_idx):
        cfg = self.cfg
        pred, img_spot, img_neigh = self._forward(batch["query"], batch["neighbours"], batch["mask"])
        expr = self._standard(batch["expression"])
        neighbourhood_expr = masked_mean(self._standard(batch["neighbour_expression"]), batch["known"])
        regression = F.mse_loss(pred, expr)
        spot = info_nce(img_spot, self.net.gene_spot(expr), cfg.temperature_spot)
        neighbourhood = info_nce(img_neigh, self.net.gene_neighbour(neighbourhood_expr), cfg.temperature_neighbour)
        loss = regression + cfg.loss_ratio_spot * spot + cfg.loss_ratio_neighbour * neighbourhood
        self.log_dict({"train_loss": loss, "train_mse": regression}, on_step=False, on_epoch=True, batch_size=len(expr))
        return loss

    def validation_step(self, batch: dict, batch_idx):
        pred = self._forward(batch["query"], batch["neighbours"], batch["mask"])[0] * self.expr_std + self.expr_mean
        self._val.append((pred, batch["expression"]))

    def on_validation_epoch_end(self):
        pred, true = (torch.cat(parts).cpu().numpy() for parts in zip(*self._val))
        self._val.clear()
        self.log("val_pcc", float(np.nan_to_num(pearson_columns(pred, true), nan=0.0).mean()))

    @torch.no_grad()
    def predict_table(self, table: SpotTable, batch_size: int = 256) -> np.ndarray:
        """Predicted log1p expression (N, G) of every spot of `table`, from images only."""
        self.eval()
        out = [self._forward(*table.batch(idx))[0] * self.expr_std + self.expr_mean
               for idx in torch.arange(len(table.features)).split(batch_size)]
        return torch.cat(out).numpy()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.cfg.learning_rate)


class NH2STData(L.LightningDataModule):
    """Spots of a `SpotTable` in batches: the training spots shuffled (seeded), the validation
    spots in order. A training batch also carries each spot's neighbours' expression, and
    which of them are training spots (held-out spots never serve as targets)."""

    def __init__(self, table: SpotTable, train_idx: torch.Tensor, val_idx: torch.Tensor, batch_size: int, seed: int):
        super().__init__()
        self.table, self.train_idx, self.val_idx, self.batch_size, self.seed = table, train_idx, val_idx, batch_size, seed
        self.learn_from = torch.zeros(len(table.features), dtype=torch.bool)
        self.learn_from[train_idx] = True

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_idx, self.batch_size, True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_idx, 1024, False)

    def _loader(self, idx: torch.Tensor, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(idx, batch_size=batch_size, shuffle=shuffle,
                                           generator=torch.Generator().manual_seed(self.seed),
                                           drop_last=shuffle and len(idx) > batch_size, collate_fn=self._gather)

    def _gather(self, spots: list[torch.Tensor]) -> dict:
        idx = torch.stack(spots)
        query, neighbours, mask = self.table.batch(idx)
        nb = self.table.neighbours[idx].clamp_min(0)
        return {"query": query, "neighbours": neighbours, "mask": mask, "expression": self.table.expression[idx],
                "neighbour_expression": self.table.expression[nb], "known": mask & self.learn_from[nb]}


def fit_nh2st(table: SpotTable, train_idx: torch.Tensor, val_idx: torch.Tensor, panel: list[str], seed: int = 0,
              cfg: NH2STConfig | None = None, checkpoint: str | Path | None = None) -> NH2STModule:
    """Train on spots `train_idx` of `table`, early-stopping on the mean per-gene PCC of
    `val_idx` (seeded); Lightning's `ModelCheckpoint` keeps the best epoch, whose weights
    are loaded and, with `checkpoint`, copied there."""
    cfg = cfg or NH2STConfig()
    L.seed_everything(seed, workers=True, verbose=False)
    module = NH2STModule(*table.features.shape[1:], table.expression.shape[1], panel=list(panel), **asdict(cfg))
    module.standardise_from(table, train_idx)
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(dirpath=tmp, filename="best", monitor="val_pcc", mode="max", save_weights_only=True,
                               enable_version_counter=False)
        trainer = quiet_trainer(cfg.max_epochs, [EarlyStopping("val_pcc", mode="max", patience=cfg.patience), best],
                                checkpointing=True, **lightning_flags(cfg))
        with warnings.catch_warnings(), torch_threads(1):
            warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
            trainer.fit(module, datamodule=NH2STData(table, train_idx, val_idx, cfg.batch_size, seed))
        module.load_state_dict(torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"])
        if checkpoint is not None and trainer.is_global_zero:
            atomic_write(Path(checkpoint), lambda out: shutil.copyfile(best.best_model_path, out))
        trainer.strategy.barrier("stimpute.best")  # every process has read rank 0's best weights before they go
    return module.eval()


def train_nh2st(prepared: PreparedStack, train: list[int], seed: int = 0, cfg: NH2STConfig | None = None,
                checkpoint: str | Path | None = None) -> NH2STModule:
    """Train on the measured sections `train` (a seeded share of their spots validates)."""
    cfg = cfg or NH2STConfig()
    table = spot_table(prepared, train, cfg.res_neighbor, cfg.lattice)
    held = split_known(len(table.features), cfg.val_fraction, seed)
    if held.all() or not held.any():
        raise StimputeError(prepared.stack[train[0]].name, f"too few spots ({len(held)}) to hold some out for early stopping")
    train_idx, val_idx = (torch.as_tensor(np.flatnonzero(m)) for m in (~held, held))
    return fit_nh2st(table, train_idx, val_idx, prepared.panel, seed, cfg, checkpoint)


def predict_nh2st(module: NH2STModule, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
    """Predicted panel expression of each target section, from its image features only."""
    if list(module.hparams.panel) != list(prepared.panel):
        raise StimputeError("--checkpoint", "the model was trained on a different gene panel than the one given")
    cfg = module.cfg
    return {i: module.predict_table(spot_table(prepared, [i], cfg.res_neighbor, cfg.lattice, with_expression=False))
            for i in targets}


def load_nh2st(path: str | Path) -> NH2STModule:
    """A trained NH²2ST module from a checkpoint written by `train_nh2st`."""
    try:
        return NH2STModule.load_from_checkpoint(path, map_location="cpu").eval()
    except (OSError, KeyError, RuntimeError) as exc:
        raise StimputeError(path, f"not an NH²2ST checkpoint ({exc})") from None


def cross_validate_nh2st(prepared: PreparedStack, sections: list[int], n_folds: int, seed: int = 0,
                         cfg: NH2STConfig | None = None, out_dir: str | Path | None = None) -> pd.DataFrame:
    """k-fold cross-validation by section (`--mode cv`): each fold's sections are predicted
    by a model trained on the others. Returns per-gene rows `fold, section, gene, pcc, mse,
    mae`; with `out_dir`, each fold's checkpoint is saved as `fold<k>.ckpt` there."""
    if not 2 <= n_folds <= len(sections):
        raise StimputeError("--folds", f"need 2 ≤ folds ≤ {len(sections)} measured sections, got {n_folds}")
    rows = []
    for k, held in enumerate(np.array_split(np.array(sections), n_folds)):
        train = [i for i in sections if i not in held]
        ckpt = None if out_dir is None else Path(out_dir) / f"fold{k}.ckpt"
        preds = predict_nh2st(train_nh2st(prepared, train, seed, cfg, ckpt), prepared, list(held))
        for i, pred in preds.items():
            metrics = gene_metrics(pred, prepared.known_expression(i), prepared.panel)
            rows.append(metrics.assign(fold=k, section=prepared.stack[i].name))
    return pd.concat(rows, ignore_index=True)[["fold", "section", "gene", "pcc", "mse", "mae"]]


@register_method
class NH2ST(Model):
    """NH²2ST on cached spot-scale features; trains on `train` sections, predicts from images only.

    Saved as the Lightning checkpoint `checkpoints/nh2st.ckpt` of a model folder.
    """

    name = "nh2st"
    config_class = NH2STConfig
    saved = "checkpoints/nh2st.ckpt"
    epochs_field = "max_epochs"

    def fit(self, prepared: PreparedStack, train: list[int], seed: int = 0, checkpoints: Path | None = None,
            progress: bool = False) -> "NH2ST":
        self.module_ = train_nh2st(prepared, train, seed, self.config)
        return self

    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        return predict_nh2st(self.module_, prepared, targets)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.saved
        atomic_write(path, lambda tmp: torch.save(lightning_checkpoint(self.module_), tmp))
        return path

    @classmethod
    def load(cls, folder: Path) -> "NH2ST":
        module = load_nh2st(Path(folder) / cls.saved)
        model = cls(module.cfg)
        model.module_ = module
        return model

    def cross_validate(self, prepared: PreparedStack, sections: list[int], n_folds: int, seed: int = 0,
                       folder: Path | None = None) -> pd.DataFrame:
        """As `Model.cross_validate`; each fold's checkpoint is `folder/fold<k>.ckpt`."""
        return cross_validate_nh2st(prepared, sections, n_folds, seed, self.config, folder)
