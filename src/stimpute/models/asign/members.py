"""ASIGN's image members: what each one's spot image says about its expression.

A member learns from the known sections' spots outside the hold-out (`held`, the same
for every member), keeps its honest prediction at the held-out spots (`held_`, for the
fusion's calibration) and predicts any section of a stack (`predict`). `restore` rebuilds a
saved member: MSAGNet from its weights, the feature probes by fitting them again on the
known spots the model stores (their fit is deterministic, so the same state results).

- `msagnet_3d`: MSAGNet on the 3D graph (`stimpute.models.msagnet_model.MSAGNet3D`);
- `kernel_ridge`: the RBF kernel ridge probe, which also leaves each known spot's residual
  (measured minus out-of-sample prediction) for the cross-layer transfer;
- `ridge`: the HEST linear probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stimpute.models.baselines import KernelRidge, Ridge, flat_features, probe_residuals, seeded_subset
from stimpute.models.msagnet_model import MSAGNet3D
from stimpute.prepare import PreparedStack
from stimpute.timing import timed

PROBE_MAX_SPOTS = 4000  # the kernel ridge's n × n kernel: 128 MB and seconds at this size


class MSAGNetMember:
    """MSAGNet on the 3D graph, trained on the known spots outside the hold-out."""

    name = "msagnet_3d"

    def __init__(self, config):
        self.model = MSAGNet3D(config)

    def fit(self, prepared: PreparedStack, known: list[int], held: dict, seed: int, checkpoints=None,
            progress: bool = False) -> "MSAGNetMember":
        self.model.fit(prepared, known, seed, checkpoints=checkpoints, progress=progress)
        out = self.model.predict(prepared, known)
        self.held_ = np.concatenate([out[i][held[i]] for i in known])
        return self

    def predict(self, prepared: PreparedStack, targets: list[int]) -> dict[int, np.ndarray]:
        return self.model.predict(prepared, targets)

    def save(self, folder: Path) -> None:
        self.model.save(folder)

    @classmethod
    def restore(cls, folder: Path, prepared: PreparedStack, known: list[int], config) -> "MSAGNetMember":
        member = cls(config)
        member.model.module_ = MSAGNet3D.load(folder).module_
        return member


class RidgeMember:
    """The linear probe: fitted on every known spot for the targets, and once more without
    the hold-out for its honest prediction there."""

    name = "ridge"

    def __init__(self, config=None):
        self.probe = Ridge()

    @timed("training")
    def fit(self, prepared, known, held, seed, checkpoints=None, progress=False) -> "RidgeMember":
        self._fit_all(prepared, known, seed)
        x = np.concatenate([flat_features(prepared, [i])[~held[i]] for i in known])
        y = np.concatenate([prepared.known_expression(i)[~held[i]] for i in known])
        honest = self.probe.model(*x.shape, seed).fit(x, y)
        self.held_ = np.concatenate([honest.predict(flat_features(prepared, [i])[held[i]]) for i in known])
        return self

    def _fit_all(self, prepared, known, seed) -> None:
        x = flat_features(prepared, known)
        self.fitted_ = self.probe.model(*x.shape, seed).fit(x, np.concatenate([prepared.known_expression(i) for i in known]))

    def predict(self, prepared, targets):
        return {t: self.fitted_.predict(flat_features(prepared, [t])).astype(np.float32) for t in targets}

    def save(self, folder: Path) -> None:
        """Nothing beyond the known spots the model stores (`restore` fits again)."""

    @classmethod
    def restore(cls, folder, prepared, known, config) -> "RidgeMember":
        member = cls()
        member._fit_all(prepared, known, config.seed)
        return member


class KernelRidgeMember(RidgeMember):
    """The kernel ridge probe, and the residuals it leaves at every known spot (`residual`:
    measured minus out-of-sample prediction, for the transfer; from the fit on every known
    spot, and as `residual_honest` from the fit without the hold-out). Beyond
    `PROBE_MAX_SPOTS` known spots it learns from a seeded random subset of them; the
    others are predicted out of sample like held-out spots."""

    name = "kernel_ridge"

    def __init__(self, config=None):
        self.probe = KernelRidge()

    @timed("training")
    def fit(self, prepared, known, held, seed, checkpoints=None, progress=False) -> "KernelRidgeMember":
        x, y, keep = self._fit_all(prepared, known, seed)
        honest, self.residual_honest = probe_residuals(x, y, {i: ~held[i] & keep[i] for i in known}, seed)
        self.held_by_section = [honest.predict(x[i][held[i]]) for i in known]
        self.held_ = np.concatenate(self.held_by_section)
        return self

    def _fit_all(self, prepared, known, seed):
        x = {i: flat_features(prepared, [i]) for i in known}
        y = {i: prepared.known_expression(i) for i in known}
        keep = dict(zip(known, seeded_subset([len(y[i]) for i in known], PROBE_MAX_SPOTS, seed)))
        self.fitted_, self.residual = probe_residuals(x, y, keep, seed)
        return x, y, keep


MEMBERS = {m.name: m for m in (MSAGNetMember, KernelRidgeMember, RidgeMember)}
