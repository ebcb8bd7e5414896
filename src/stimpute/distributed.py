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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stimpute.io.run import MANIFEST_FILE

RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")  # set by Lightning, torchrun or SLURM
SHARED = ("cache", "checkpoints", "features")  # folders of OUT the other ranks read (caches, checkpoints)


def global_rank() -> int:
    """This process's global rank: 0 unless a launcher set one of `RANK_VARIABLES` (the
    global rank is 0 exactly where every one of them is 0)."""
    return max((int(os.environ.get(name) or 0) for name in RANK_VARIABLES), default=0)


def is_rank_zero() -> bool:
    return global_rank() == 0


@contextmanager
def rank_output(out: str | Path) -> Iterator[Path]:
    """`out` on rank 0; on any other rank, a scratch folder that reads `out`'s caches and
    checkpoints through links and is removed at the end (module docstring)."""
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
