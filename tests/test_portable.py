"""The benchmark's resource meter without Linux's /proc, and `msagnet_2d` as a 2D method."""

from __future__ import annotations

import builtins
import math

import numpy as np

from stimpute.benchmark import ResourceMeter, image_only, run_benchmark
from stimpute.models import get_method, load_methods
from tests.test_benchmark import prepared  # noqa: F401  (module fixture)


def test_resource_meter_sees_an_allocation():
    with ResourceMeter(interval=0.005) as meter:
        block = np.ones(128 * 2**20 // 8)  # 128 MiB, touched
        block.sum()
    assert meter.seconds > 0 and meter.peak_mib > 32, meter.peak_mib  # (other pages may be reclaimed meanwhile)


def test_benchmark_runs_without_proc(prepared, tmp_path, monkeypatch):  # noqa: F811
    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    result = run_benchmark(prepared, tmp_path, methods=["mean"], seed=0)
    assert (result.results.status == "ok").all()
    assert result.results.peak_mib.map(lambda v: math.isnan(v) or v >= 0).all()
    assert (tmp_path / "results.csv").is_file()


def test_msagnet_2d_is_a_registered_image_only_method(prepared):  # noqa: F811
    assert "msagnet_2d" in load_methods()
    method = get_method("msagnet_2d", max_epochs=3)
    assert not method.needs_3d
    preds = method.fit_predict(image_only(prepared), [0, 1], [2], seed=0)
    assert set(preds) == {2} and preds[2].shape == (prepared.stack[2].n_spots, len(prepared.panel))
    assert np.isfinite(preds[2]).all()
