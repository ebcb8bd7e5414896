"""Several processes (Lightning's `--devices/--num-nodes/--strategy`, e.g. DDP): only the
process of global rank 0 writes into the output folder.

Lightning's DDP runs the whole command once per process: the launcher starts the
command again for every other local rank at the first Lightning run, when features are
encoded (`stimpute.features.parallel`) or training begins (`torchrun`, SLURM and the other
nodes of a multi-node run start it themselves). Every process reads the inputs and
prepares the same data, encodes its share of the spots, trains its share of the batches,
and goes on to the end of the command. Rank 0 owns OUT as any run does. Every other rank works in a private
scratch folder, removed when the command ends: the feature caches and checkpoints that
OUT already holds are linked into it (read, never written: an atomic write replaces the
link, not its target), and OUT's run manifest is copied so the scratch run sees what
rank 0 sees (a fresh, resumed or forced run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stimpute.errors import StimputeWarning

RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")  # set by Lightning, torchrun or SLURM
WORLD_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")  # how many processes the launcher started
SHARED = ("cache", "checkpoints", "features")  # folders of OUT the other ranks read (caches, checkpoints)

_launch = {"processes": None, "warned": False}  # this command's request (`launch`); the stray-variable warning


@contextmanager
def launch(devices: int | str | None = 1, num_nodes: int | None = 1) -> Iterator[None]:
    """Run a command that asked for `devices` per machine on `num_nodes` machines (its
    `--devices/--num-nodes`): within it, only a request for several processes makes the
    rank variables of the environment count (`global_rank`)."""
    before = dict(_launch)
    _launch.update(processes=_requested_processes(devices, num_nodes), warned=False)
    try:
        yield
    finally:
        _launch.update(before)


def _requested_processes(devices, num_nodes) -> int | None:
    """Processes asked for: devices per machine × machines; None where Lightning decides
    (`auto`, -1: every GPU)."""
    text = str(1 if devices is None else devices).strip()
    per_machine = len(text.split(",")) if "," in text else int(text) if text.isdigit() else None
    nodes = int(num_nodes or 1)
    return None if per_machine is None else per_machine * nodes


def global_rank() -> int:
    """This process's global rank: non-zero only where a launcher set one of
    `RANK_VARIABLES` (the global rank is 0 exactly where every one of them is 0) and the
    launch runs more processes than that rank: as many as this command's
    `--devices/--num-nodes` ask for (`launch`) or, where they leave it open (outside a
    command, `--devices auto`), the launcher's world size (`WORLD_VARIABLES`). Otherwise the
    variable is a stray (a multi-task SLURM step, an exported shell variable): one warning,
    and rank 0."""
    rank = max(_variable(name) for name in RANK_VARIABLES)
    if rank == 0:
        return 0
    requested = _launch["processes"]
    limit = requested if requested is not None else max(_variable(name) for name in WORLD_VARIABLES)
    if rank < limit:
        return rank
    if not _launch["warned"]:
        _launch["warned"] = True
        stray = ", ".join(f"{name}={os.environ[name]}" for name in RANK_VARIABLES if _variable(name))
        warnings.warn(f"{stray} in the environment, but this launch runs {max(limit, 1)} process(es): running as rank 0 "
                      "(a stray variable? unset it; --devices/--num-nodes share the work among processes)",
                      StimputeWarning, stacklevel=2)
    return 0


def _variable(name: str) -> int:
    """An environment variable's integer value; 0 where it is unset or not an integer."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else 0


def is_rank_zero() -> bool:
    return global_rank() == 0


@contextmanager
def rank_output(out: str | Path) -> Iterator[Path]:
    """`out` on rank 0; on any other rank, a scratch folder that reads `out`'s caches and
    checkpoints through links and is removed at the end (module docstring)."""
    from stimpute.files import MANIFEST_FILE

    out = Path(out)
    if is_rank_zero():
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"stimpute-rank{global_rank()}-"))
    try:
        for name in SHARED:
            for source in sorted((out / name).rglob("*")) if (out / name).is_dir() else []:
                if source.is_file():
                    link = scratch / source.relative_to(out)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(source.resolve())
        if (out / MANIFEST_FILE).is_file():
            shutil.copyfile(out / MANIFEST_FILE, scratch / MANIFEST_FILE)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
