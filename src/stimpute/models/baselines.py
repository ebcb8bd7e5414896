"""Reference methods every model must beat, under the same `Method` interface.

- `overlap` / `similarity`: the ASIGN paper's two 3D baselines. Each target spot takes the
  expression of the spots of the nearest measured layer that it overlaps after
  registration (disc IoU), or that look most like it (cosine of image features).
- `ridge`: the HEST-Benchmark linear probe: standardise, PCA to 256 dims, ridge.
- `kernel_ridge`: ridge with an RBF kernel on the standardised features, its penalty
  chosen by exact leave-one-out (closed form from one eigendecomposition).
- `knn`: the k nearest training spots in the same PCA feature space.
- `mean`: the per-gene mean of the training sections (a constant map: its per-gene PCC
  is undefined, which the metrics count as 0).
- `transfer`: register, then copy the nearest measured spots; `composite`: ½ `ridge` +
  ½ `transfer` as per-gene z-scores, the simple floor every imputation must clear.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.linear_model import RidgeCV
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from stimpute.combine import zmix
from stimpute.models.base import Method, NotApplicable, register_method
from stimpute.prepare import PreparedStack
from stimpute.register.matching import disc_iou

PCA_DIMS = 256  # HEST-Benchmark: patch embeddings reduced to 256 principal components
RIDGE_ALPHAS = np.logspace(-1, 5, 13)  # chosen by efficient leave-one-out, one alpha for all genes
KNN_K = 10
KERNEL_ALPHAS = np.logspace(-2, 2, 9)  # chosen per fit by exact leave-one-out
KERNEL_GAMMA_SCALE = 0.2  # RBF gamma = 0.2 / n_features (chosen on HER2-ST known C4 → C3 among 0.1, 0.2, 0.5)
SIMILAR_K = 5


def flat_features(prepared: PreparedStack, sections: list[int]) -> np.ndarray:
    """(Σ n_i, n_scales · dim) features of `sections`, spot, 512 and 1024 scales side by side."""
    return np.concatenate([prepared.features[i].reshape(prepared.features[i].shape[0], -1) for i in sections])


def require_train(train: list[int]) -> None:
    if not train:
        raise NotApplicable("no measured section to learn from")


def train_expression(prepared: PreparedStack, train: list[int]) -> np.ndarray:
    """(Σ n_i, n_genes) measured expression of the training sections, in `train` order."""
    require_train(train)
    return np.concatenate([prepared.known_expression(i) for i in train])


def nearest_measured(prepared: PreparedStack, target: int, train: list[int]) -> list[int]:
    """The training sections closest to `target` along z (all of them when tied)."""
    z = np.array([prepared.stack[i].z_um for i in train], np.float64)
    gap = np.abs(z - prepared.stack[target].z_um)
    return [i for i, g in zip(train, gap) if g <= gap.min() + 1e-9]


def overlap_weights(target_xy: np.ndarray, known_xy: np.ndarray, radius: float) -> sparse.csr_matrix:
    """Row-stochastic sparse (n_target, n_known) weights: disc IoU with every overlapping
    known spot; a target spot that overlaps none takes its nearest known spot. Pairs come
    from a KD-tree, so memory grows with the overlaps, not with n_target × n_known."""
    tree = cKDTree(known_xy)
    pairs = cKDTree(target_xy).sparse_distance_matrix(tree, 2 * radius, output_type="coo_matrix")
    rows, cols, values = pairs.row, pairs.col, disc_iou(pairs.data, radius, radius)
    lonely = np.bincount(rows[values > 0], minlength=len(target_xy)) == 0
    if lonely.any():
        lonely_rows = np.flatnonzero(lonely)
        rows = np.r_[rows, lonely_rows]
        cols = np.r_[cols, tree.query(target_xy[lonely])[1]]
        values = np.r_[values, np.ones(len(lonely_rows))]
    weights = sparse.csr_matrix((values, (rows, cols)), shape=(len(target_xy), len(known_xy)))
    weights.eliminate_zeros()
    return sparse.diags(1.0 / np.asarray(weights.sum(axis=1)).ravel()) @ weights


def cosine_top_k(query: np.ndarray, keys: np.ndarray, k: int, chunk: int = 4096) -> sparse.csr_matrix:
    """Row-stochastic sparse (n_query, n_keys) weights: uniform over each query's `k` most
    cosine-similar keys, after z-scoring both with the keys' statistics. Similarities are
    computed `chunk` queries at a time, so memory stays at chunk × n_keys."""
    scaler = StandardScaler().fit(keys)
    q, kk = scaler.transform(query), scaler.transform(keys)
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    kk /= np.linalg.norm(kk, axis=1, keepdims=True) + 1e-12
    k = min(k, len(keys))
    top = np.concatenate([np.argpartition(-(q[i:i + chunk] @ kk.T), k - 1, axis=1)[:, :k]
                          for i in range(0, len(q), chunk)])
    rows = np.repeat(np.arange(len(q)), k)
    return sparse.csr_matrix((np.full(rows.size, 1.0 / k), (rows, top.ravel())), shape=(len(q), len(keys)))


class _FromNearestLayer(Method):
    """Predict each target as a weighted average of spots of its nearest measured layer(s)."""

    @abstractmethod
    def weights(self, prepared: PreparedStack, target: int, known: int) -> np.ndarray:
        """Row-stochastic (n_target_spots, n_known_spots) weights (a sparse matrix)."""

    def fit_predict(self, prepared, train, targets, seed=0):
        require_train(train)
        out = {}
        for t in targets:
            layers = nearest_measured(prepared, t, train)
            out[t] = np.mean([np.asarray(self.weights(prepared, t, k) @ prepared.known_expression(k)) for k in layers], axis=0)
        return out


@register_method
class Overlap(_FromNearestLayer):
    """ASIGN's "overlap" baseline: copy the expression of the overlapping spots (disc IoU
    after registration) of the nearest measured layer."""

    name = "overlap"
    needs_3d = True

    def weights(self, prepared, target, known):
        if prepared.coords_ref is None:
            raise NotApplicable("overlap needs registered spot coordinates (a 3D stack)")
        sections = prepared.stack
        radius = (sections[target].spot_diameter_um + sections[known].spot_diameter_um) / 4 / sections[0].um_per_px
        return overlap_weights(prepared.coords_ref[target], prepared.coords_ref[known], radius)


@register_method
class Similarity(_FromNearestLayer):
    """ASIGN's "similarity" baseline: average the `k` spots of the nearest measured layer
    whose image features are most cosine-similar."""

    name = "similarity"

    def __init__(self, k: int = SIMILAR_K):
        self.k = k

    def weights(self, prepared, target, known):
        return cosine_top_k(flat_features(prepared, [target]), flat_features(prepared, [known]), self.k)


def pca_embedding(n_samples: int, n_features: int, seed: int) -> list:
    """Standardise, then PCA to 256 dims (fewer when there are fewer samples or features)."""
    dims = max(1, min(PCA_DIMS, n_samples - 1, n_features))
    return [StandardScaler(), PCA(n_components=dims, random_state=seed)]


class _Regressor(Method):
    """Fit a scikit-learn regressor from training spots' features to their expression."""

    @abstractmethod
    def model(self, n_samples: int, n_features: int, seed: int) -> Pipeline:
        """An unfitted pipeline for this many training spots and features."""

    def fit_predict(self, prepared, train, targets, seed=0):
        y = train_expression(prepared, train)
        x = flat_features(prepared, train)
        model = self.model(*x.shape, seed).fit(x, y)
        return {t: model.predict(flat_features(prepared, [t])).astype(np.float32) for t in targets}


@register_method
class Ridge(_Regressor):
    """HEST-Benchmark linear probe on patch features (alpha by leave-one-out)."""

    name = "ridge"

    def model(self, n_samples, n_features, seed):
        return make_pipeline(*pca_embedding(n_samples, n_features, seed), RidgeCV(alphas=RIDGE_ALPHAS))


class KernelRidgeLOO(RegressorMixin, BaseEstimator):
    """RBF kernel ridge regression whose penalty is picked from `alphas` by the exact
    leave-one-out error of all outputs: with K = U diag(λ) Uᵀ, the fit is
    H y with H = U diag(λ / (λ + α)) Uᵀ, and the LOO residual is (y − Hy) / (1 − Hᵢᵢ).
    `loo_predictions_`: each training spot's prediction by the fit without it."""

    def __init__(self, gamma_scale: float = KERNEL_GAMMA_SCALE, alphas=KERNEL_ALPHAS):
        self.gamma_scale = gamma_scale
        self.alphas = alphas

    def fit(self, x: np.ndarray, y: np.ndarray) -> "KernelRidgeLOO":
        self.x_, self.gamma_ = np.asarray(x, np.float64), self.gamma_scale / x.shape[1]
        self.mean_ = y.mean(axis=0)
        lam, u = np.linalg.eigh(rbf_kernel(self.x_, gamma=self.gamma_))
        uty = u.T @ (y - self.mean_)
        residuals = []
        for alpha in self.alphas:
            shrink = lam / (lam + alpha)
            fitted = u @ (shrink[:, None] * uty)
            leverage = (u**2) @ shrink
            residuals.append((y - self.mean_ - fitted) / (1 - leverage)[:, None])
        best = int(np.argmin([np.mean(r**2) for r in residuals]))
        self.alpha_ = float(self.alphas[best])
        self.loo_predictions_ = y - residuals[best]
        self.dual_coef_ = u @ (uty / (lam + self.alpha_)[:, None])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return rbf_kernel(np.asarray(x, np.float64), self.x_, gamma=self.gamma_) @ self.dual_coef_ + self.mean_


@register_method
class KernelRidge(_Regressor):
    """RBF kernel ridge on the standardised patch features (penalty by leave-one-out)."""

    name = "kernel_ridge"

    def model(self, n_samples, n_features, seed):
        return make_pipeline(StandardScaler(), KernelRidgeLOO())


def seeded_subset(sizes: list[int], limit: int, seed: int) -> list[np.ndarray]:
    """Per section (of `sizes` spots), the mask of a seeded random subset of at most
    `limit` spots drawn over all sections together."""
    keep = np.zeros(sum(sizes), bool)
    keep[np.random.default_rng(seed).permutation(sum(sizes))[:limit]] = True
    return np.split(keep, np.cumsum(sizes)[:-1])


def probe_residuals(x: dict, y: dict, train: dict, seed: int = 0) -> tuple[Pipeline, dict]:
    """The kernel ridge probe fitted on the `train` spots of each section (dicts by section:
    features, expression, boolean masks), and every spot's residual: measured minus its
    out-of-sample prediction (exact leave-one-out on training spots, a plain prediction
    elsewhere), which is what a cross-layer transfer of residuals carries."""
    sections = list(x)
    xs = np.concatenate([x[i][train[i]] for i in sections])
    model = KernelRidge().model(*xs.shape, seed).fit(xs, np.concatenate([y[i][train[i]] for i in sections]))
    loo = np.split(model[-1].loo_predictions_, np.cumsum([train[i].sum() for i in sections])[:-1])
    residual = {}
    for i, oos in zip(sections, loo):
        predicted = np.empty_like(y[i], dtype=np.float64)
        predicted[train[i]] = oos
        if (~train[i]).any():
            predicted[~train[i]] = model.predict(x[i][~train[i]])
        residual[i] = (y[i] - predicted).astype(np.float32)
    return model, residual


@register_method
class Knn(_Regressor):
    """Distance-weighted mean of the `k` nearest training spots in PCA feature space."""

    name = "knn"

    def __init__(self, k: int = KNN_K):
        self.k = k

    def model(self, n_samples, n_features, seed):
        knn = KNeighborsRegressor(n_neighbors=min(self.k, n_samples), weights="distance")
        return make_pipeline(*pca_embedding(n_samples, n_features, seed), knn)


@register_method
class Mean(Method):
    """Every spot gets the per-gene mean of the training sections."""

    name = "mean"

    def fit_predict(self, prepared, train, targets, seed=0):
        mean = train_expression(prepared, train).mean(axis=0)
        return {t: np.tile(mean, (prepared.stack[t].n_spots, 1)).astype(np.float32) for t in targets}


@register_method
class Transfer(Method):
    """Register, then copy: each target spot gets the Gaussian-weighted mean (σ = one spot
    pitch, k = 4, nothing farther than two pitches) of the measured spots of every known
    section, linked directly through the registration. The rival 3D methods must beat."""

    name = "transfer"
    needs_3d = True

    def fit_predict(self, prepared, train, targets, seed=0):
        from stimpute.evidence import copy_nearest

        require_train(train)
        if prepared.coords_ref is None:
            raise NotApplicable("transfer needs registered spot coordinates (a 3D stack)")
        return copy_nearest(prepared, train, targets)


@register_method
class Composite(Method):
    """½ linear `ridge` + ½ `transfer`, mixed as per-gene z-scores within each target section
    (`stimpute.combine.zmix`): the simplest honest composite of image and registration."""

    name = "composite"
    needs_3d = True

    def fit_predict(self, prepared, train, targets, seed=0):
        ridge = Ridge().fit_predict(prepared, train, targets, seed)
        copied = Transfer().fit_predict(prepared, train, targets, seed)
        return {t: zmix(ridge[t], copied[t], 0.5) for t in targets}
