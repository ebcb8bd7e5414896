"""Wall time and peak memory of the pipeline's stages (read, features, registration, ...).

Stages are marked in the code with `@timed("features")` on a function or
`with stage("writing"):` around a block; both cost nothing unless a `recording()` is
active, as it is during `stimpute impute` (which writes the result as `timings.json`).
A stage entered several times (features of each section) accumulates its seconds; a
stage entered again while it runs (a timed function calling another) is counted once.

CPU seconds (`user_s`, `sys_s`) are the whole process's, every thread's, while the stage
was open: a stage that runs beside a thread (the models' imports during registration) is
charged that thread's work too. They tell where system CPU goes (page faults of big
arrays, threads spinning), which wall seconds on a shared machine hide.

Peak memory is the process's peak resident set (Linux VmHWM), reset at the start of each
stage through /proc/self/clear_refs, so each stage reports the largest RSS reached while
it ran (everything the process holds at that time, not only what the stage added). Where
the kernel offers no resettable peak, it is the process peak so far.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

STAGES = ("read", "features", "registration", "graph", "training", "propagation", "fusion", "writing")
TIMINGS_FILE = "timings.json"


@dataclass
class StageRecord:
    seconds: float = 0.0
    peak_mib: float = 0.0
    calls: int = 0
    user_s: float = 0.0
    sys_s: float = 0.0


class StageTimer:
    """Seconds, process CPU seconds and peak RSS (MiB) per stage name; stages may nest."""

    def __init__(self):
        self.records: dict[str, StageRecord] = {}
        self._open: list[str] = []

    @contextmanager
    def stage(self, name: str):
        if name in self._open:  # already inside this stage (a timed function calling another): counted once
            yield
            return
        self._credit_peak()  # what the enclosing stages reached so far, before the reset
        reset_peak_rss()
        self._open.append(name)
        start, cpu = time.perf_counter(), os.times()
        try:
            yield
        finally:
            record = self.records.setdefault(name, StageRecord())
            record.seconds += time.perf_counter() - start
            now = os.times()
            record.user_s += now.user - cpu.user
            record.sys_s += now.system - cpu.system
            record.calls += 1
            self._credit_peak()
            self._open.pop()

    def _credit_peak(self) -> None:
        peak = proc_status_mib("VmHWM")
        for name in self._open:
            record = self.records.setdefault(name, StageRecord())
            record.peak_mib = max(record.peak_mib, peak)

    def to_dict(self) -> dict:
        return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()}
                for name, r in self.records.items()}

    def write(self, path: str | Path) -> Path:
        from stimpute.files import write_text_atomic

        return write_text_atomic(Path(path), json.dumps({"stages": self.to_dict()}, indent=1))


_ACTIVE: list[StageTimer] = []


@contextmanager
def recording():
    """Record every marked stage run inside the block; yields the `StageTimer`."""
    timer = StageTimer()
    _ACTIVE.append(timer)
    try:
        yield timer
    finally:
        _ACTIVE.remove(timer)


def stage(name: str):
    """Context manager timing a block as stage `name` (a no-op when nothing records)."""
    return _ACTIVE[-1].stage(name) if _ACTIVE else nullcontext()


def timed(name: str):
    """Decorator: every call of the function is timed as stage `name`."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)

        return run

    return wrap


def records_stages(fn):
    """Decorator for a command that writes into a folder argument `out`: its marked stages,
    and the whole call as `total`, go to `out/timings.json` when it returns."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = signature.bind(*args, **kwargs).arguments["out"]
        with recording() as timer:
            with timer.stage("total"):
                result = fn(*args, **kwargs)
        timer.write(Path(out) / TIMINGS_FILE)
        return result

    return run


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_status_mib(field_name: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; NaN where absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
