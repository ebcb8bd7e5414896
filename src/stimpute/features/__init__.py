"""Per-spot image features at three scales, from any registered encoder, cached on disk.

`spot_features(section)` returns float32 (n_spots, 3, dim): for each spot (adata order)
the features of its spot patch and of its two context windows (`stimpute.patches`):
network encoders read each window as a patch, the handcrafted descriptors are pooled per
window from per-pixel maps of the whole image (`stimpute.features.dense`).
With `cache_dir`, results are stored per section and reused while image, spots, settings
and weights are unchanged (`stimpute.features.cache`).
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from stimpute.data import Section
from stimpute.distributed import is_rank_zero
from stimpute.features import cache
from stimpute.features.dense import dense_features
from stimpute.features.encoders import ENCODERS, Encoder, get_spec, load_encoder, weights_id
from stimpute.patches import (DEFAULT_BATCH_SIZE, DEFAULT_OUT_SIZE, SCALES_UM, SpotWindows, iter_patches, padding_report,
                              scale_names)
from stimpute.stain import MacenkoNormalizer
from stimpute.timing import timed


@dataclass
class FeatureRun:
    """What one `spot_features` call did (for CLI messages and benchmarks). `shares`: the
    spots each process encoded ([] when read from the cache)."""

    section: str
    encoder: str
    cached: bool
    seconds: float
    n_patches: int
    cache_file: Path | None = None
    padded: dict = field(default_factory=dict)
    shares: list[int] = field(default_factory=list)
    encode_seconds: float = 0.0  # from the first patch to the last, as the progress bar counts

    @property
    def rate(self) -> float:
        """Patches encoded per second: the progress bar's rate (setup and cache writing excluded)."""
        return self.n_patches / self.encode_seconds if self.encode_seconds > 0 else float("nan")


@timed("features")
def spot_features(
    section: Section,
    encoder: str = "handcrafted",
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stain_normalize: bool = False,
    scales_um: Sequence[float] = SCALES_UM,
    random_init: bool = False,
    runs: list[FeatureRun] | None = None,
    hardware: dict | None = None,
) -> np.ndarray:
    """Features (n_spots, len(scales_um), dim) float32 of every spot of `section`.

    `weights`: local weight file for network encoders (never downloaded). `random_init`:
    a seeded random network instead, for tests/benchmarks only. `runs`, if given,
    receives a `FeatureRun` describing whether the cache was hit and how long it took.
    `hardware`: Lightning's accelerator, devices, num_nodes and strategy; several
    processes (DDP) share a network's spots and all return every spot's features
    (`stimpute.features.parallel`); only global rank 0 writes the cache.
    """
    start = time.perf_counter()
    spec = get_spec(encoder)
    names = scale_names(scales_um)
    key = cache.feature_key(section, spec.name, weights_id(spec, weights, random_init), scales_um,
                            DEFAULT_OUT_SIZE, stain_normalize)
    path = None if cache_dir is None else cache.cache_path(cache_dir, section)
    feats = None if path is None else cache.read_features(path, spec.name, key, names)
    hit = feats is not None
    shares = []
    if not hit:
        trainer = _prediction_trainer(hardware, spec, section.n_spots)
        model = Encoder(spec, weights, random_init) if trainer is None and spec.needs_weights else None
        normalizer = MacenkoNormalizer.fit_section(section) if stain_normalize else None
        n_total = section.n_spots * len(names)
        encode_start = time.perf_counter()
        with _progress(progress) as bar:
            task = bar.add_task(f"{section.name} · {spec.name}", total=n_total) if bar else None
            if not spec.needs_weights:  # handcrafted: dense maps pooled per window, once per image
                feats = dense_features(section, scales_um, DEFAULT_OUT_SIZE, normalizer,
                                       (lambda n: bar.advance(task, n)) if bar else None)
                shares = [section.n_spots]
            elif trainer is None:
                feats = np.empty((section.n_spots, len(names), spec.dim), np.float32)
                for batch in read_ahead(iter_patches(section, scales_um, DEFAULT_OUT_SIZE, batch_size, normalizer, raster_order=True)):
                    b, s = batch.patches.shape[:2]
                    feats[batch.index] = model(batch.patches.reshape(b * s, *batch.patches.shape[2:])).reshape(b, s, -1)
                    if bar:
                        bar.advance(task, b * s)
                shares = [section.n_spots]
            else:
                from stimpute.features.parallel import shared_features

                spots = SpotWindows(section, scales_um, DEFAULT_OUT_SIZE, normalizer, raster_order=True)
                feats, shares = shared_features(spots, spec, weights, random_init, trainer, batch_size, key,
                                                (lambda n: bar.advance(task, n)) if bar else None)
                if bar:
                    bar.update(task, completed=n_total)
            encode_seconds = time.perf_counter() - encode_start
        if path is not None and is_rank_zero():
            cache.write_features(path, spec.name, key, names, section.spot_ids, feats, shares)
    if runs is not None:
        runs.append(FeatureRun(section.name, spec.name, hit, time.perf_counter() - start, section.n_spots * len(names),
                               path, padding_report(section, scales_um), shares, 0.0 if hit else encode_seconds))
    return feats


def _prediction_trainer(hardware: dict | None, spec, n_spots: int):
    """Lightning's trainer where several processes, or a network on a GPU, encode
    (`stimpute.features.parallel`); None, without importing Lightning, where one CPU
    process encodes here, and for the handcrafted descriptors, which every process
    computes whole (one pass over the image, `stimpute.features.dense`)."""
    hardware = hardware or {}
    if not spec.needs_weights:  # the handcrafted descriptors: each process computes the whole section (`dense_features`)
        return None
    one_process = hardware.get("devices", 1) == 1 and hardware.get("num_nodes", 1) == 1
    if one_process and hardware.get("accelerator", "cpu") == "cpu":
        return None
    from stimpute.features import parallel

    return parallel.prediction_trainer(hardware, spec, n_spots)


def read_ahead(batches: Iterator, depth: int = 2) -> Iterator:
    """Iterate `batches` from a background thread, up to `depth` items ahead, so reading
    and resampling the next patches overlaps encoding the current ones."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _RateColumn(ProgressColumn):
    """Patches per second since the bar started (`FeatureRun.rate`: the summary line's rate)."""

    def render(self, task) -> Text:
        elapsed = task.elapsed
        return Text(f"{task.completed / elapsed:.1f} patches/s" if elapsed and task.completed else "", style="cyan")


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeRemainingColumn(), transient=False)


__all__ = ["spot_features", "load_encoder", "ENCODERS", "Encoder", "FeatureRun"]
