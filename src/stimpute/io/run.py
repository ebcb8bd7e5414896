"""A run owns its output folder: a lock while it runs and a manifest of the files it wrote.

Every command that writes a result folder (impute, train, predict, register, benchmark,
convert) runs inside `run_ownership(out, command, inputs, force)`:

- an `--out` that is, holds or lies inside one of the inputs is refused before any work;
- `out/stimpute.lock` (pid, host, process start time) is held while the run lasts, so a
  second run on the same folder is refused at once; a lock whose process is gone (same
  host) is stale and taken over;
- `out/stimpute-run.json` names every file stimpute runs wrote into the folder, the last
  run's command and whether it finished. A run claims the names it will write
  (`Run.claim`) before writing: an existing file no stimpute run wrote is never replaced
  or deleted, even with `--force`; one an earlier run wrote is replaced only with `--force`
  or when that run is an unfinished (killed) run of the same command, which is resumed.
  Caches (`caches=`) are content-addressed and reused by every command without `--force`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from stimpute.errors import StimputeError

LOCK_FILE = "stimpute.lock"
MANIFEST_FILE = "stimpute-run.json"
STARTING_S = 10.0  # an unreadable lock younger than this belongs to a run that is starting


@dataclass
class Run:
    """The run holding `out`: what earlier runs left (`previous`) and what this one owns."""

    out: Path
    command: str
    force: bool
    previous: dict
    owned: set[str] = field(default_factory=set)
    claimed: list[str] = field(default_factory=list)
    found: dict[str, tuple] = field(default_factory=dict)  # claimed files as they were at the claim

    @property
    def resuming(self) -> bool:
        """The last run in `out` was this command and never finished (killed)."""
        return self.previous.get("command") == self.command and self.previous.get("status") == "running"

    def claim(self, outputs: Sequence[str] = (), caches: Sequence[str] = ()) -> bool:
        """Declare the names (files, or folders ending in "/") this run writes, before writing.

        Raises a StimputeError for an existing file that no stimpute run wrote, and for an
        earlier run's `outputs` unless `--force` is given or that run is being resumed;
        returns True: the claimed names may now be written. Temporary `.part` files a
        killed run left under the claimed names are removed.
        """
        foreign, earlier = [], []
        for name in [*outputs, *caches]:
            files = self._files(name)
            foreign += [f for f in files if not self._owns(f)]
            if name in outputs:
                earlier += files
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise StimputeError(self.out, f"holds {shown}, which no stimpute run wrote here; it is never replaced, "
                                          "even with --force: move it away or choose another --out")
        if earlier and not (self.force or self.resuming):
            shown = ", ".join(earlier[:5]) + (f" (+{len(earlier) - 5} more)" if len(earlier) > 5 else "")
            raise StimputeError(self.out, f"already holds results ({shown}); pass --force to overwrite them")
        for name in [*outputs, *caches]:
            _remove_partial(self.out / name)
            self.found.update({f: _stamp(self.out / f) for f in self._files(name)})
        self.claimed += [n for n in [*outputs, *caches] if n not in self.claimed]
        self._save("running", self.owned | set(self.claimed))
        return True

    def _files(self, name: str) -> list[str]:
        """Files under `name` in `out`, relative, excluding temporary `.part` files."""
        path = self.out / name
        if path.is_dir():
            return sorted(p.relative_to(self.out).as_posix() for p in path.rglob("*")
                          if not p.is_dir() and not p.name.endswith(".part"))
        return [name] if path.exists() or path.is_symlink() else []

    def _owns(self, rel: str) -> bool:
        """Whether a stimpute run wrote `rel`: this folder's manifest says so, or that of a
        subfolder that is itself a run's output (a feature cache from `stimpute features`)."""
        if rel in self.owned or any(rel.startswith(o) for o in self.owned if o.endswith("/")):
            return True
        parts = rel.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            inner = read_manifest(self.out.joinpath(*parts[:depth]))
            if inner:
                name = "/".join(parts[depth:])
                return name == MANIFEST_FILE or name in inner.get("files", [])
        return False

    def _save(self, status: str, owned: set[str]) -> None:
        _write_manifest(self.out, {"format": 1, "command": self.command, "status": status,
                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": sorted(owned)})

    def _finish(self) -> None:
        """Record exactly the files that the owned and claimed names hold now."""
        if self.claimed:
            self._save("finished", {f for name in self.owned | set(self.claimed) for f in self._files(name)})

    def _abandon(self) -> None:
        """A run that failed before writing anything leaves the manifest as it found it."""
        now = {f: _stamp(self.out / f) for name in self.claimed for f in self._files(name)}
        if not self.claimed or now != self.found:
            return
        if self.previous:
            _write_manifest(self.out, self.previous)
        else:
            (self.out / MANIFEST_FILE).unlink(missing_ok=True)


@contextmanager
def run_ownership(out: str | Path, command: str, inputs: Sequence[str | Path | None] = (),
                  force: bool = False) -> Iterator[Run]:
    """Hold `out` for one run of `command` (see the module docstring); yields the `Run`."""
    out = Path(out)
    check_inputs(out, inputs)
    created = _make_folder(out)
    lock = out / LOCK_FILE
    try:
        _acquire(lock, command)
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise
    try:
        run = Run(out, command, force, read_manifest(out))
        run.owned = set(run.previous.get("files", []))
        try:
            yield run
        except BaseException:
            run._abandon()
            raise
        run._finish()
    finally:
        _release(lock)
        if created:
            _remove_if_empty(out)


def read_manifest(out: Path) -> dict:
    """The manifest of `out` ({} where no stimpute run wrote there, or it is unreadable)."""
    try:
        record = json.loads((Path(out) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("files", []), list) else {}


def _write_manifest(out: Path, record: dict) -> None:
    tmp = out / f".{MANIFEST_FILE}.{os.getpid()}.part"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST_FILE)


def check_inputs(out: Path, inputs: Sequence[str | Path | None], folder: bool = True) -> None:
    """Refuse an output location (a folder, or a file where not `folder`) that is, holds or
    lies inside an input."""
    if folder and out.exists() and not out.is_dir():
        raise StimputeError(out, "is a file, not a folder: --out must name a folder")
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given).resolve()
        if path == target:
            problem = f"is the input {given}"
        elif target in path.parents:
            problem = f"holds the input {given}"
        elif path.is_dir() and path in target.parents:
            problem = f"lies inside the input folder {given}"
        else:
            continue
        raise StimputeError(out, f"{problem}: results never go where inputs are; choose another --out")


def _make_folder(out: Path) -> bool:
    """Create `out` (and parents); True where this run created it."""
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        if not out.is_dir():
            raise StimputeError(out, "is a file, not a folder: --out must name a folder") from None
        return False
    except OSError as exc:
        raise StimputeError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    return True


def _acquire(lock: Path, command: str) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "command": command}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None or _alive(holder):
                who = "a run that is starting" if holder is None else \
                    f"stimpute {holder.get('command')} (pid {holder.get('pid')} on {holder.get('host')})"
                raise StimputeError(lock.parent, f"is in use by {who}: wait for it to finish or choose another --out "
                                                 f"(if no such run exists, delete {lock})") from None
            lock.unlink(missing_ok=True)  # stale: the process that held it is gone
            continue
        except OSError as exc:
            raise StimputeError(lock.parent, f"cannot write to the output folder ({exc.strerror or exc})") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return
    raise StimputeError(lock.parent, f"could not take the lock {lock}")


def _read_lock(lock: Path) -> dict | None:
    """The holder recorded in `lock`; None while it is being written; {} when unreadable and old."""
    try:
        record = json.loads(lock.read_text())
        if isinstance(record, dict) and "pid" in record:
            return record
    except (OSError, ValueError):
        pass
    try:
        young = time.time() - lock.stat().st_mtime < STARTING_S
    except OSError:
        return {}  # gone meanwhile: take it
    return None if young else {}


def _alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` still runs (assumed so on another host)."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_time(pid)
    return start is not None and (holder.get("start") in (None, start))


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None for a zombie or
    where /proc is absent: with the pid it identifies a process across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None if Path("/proc/self/stat").exists() else 0
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _release(lock: Path) -> None:
    holder = _read_lock(lock)
    if holder and holder.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _remove_partial(path: Path) -> None:
    """Delete the temporary files a killed write left for `path` (a file, or a folder's files)."""
    if path.is_dir():
        stale = path.rglob(".*.part")
    else:
        stale = path.parent.glob(f".{path.name}.*.part") if path.parent.is_dir() else []
    for part in stale:
        part.unlink(missing_ok=True)


def _stamp(path: Path) -> tuple:
    st = path.lstat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remove_if_empty(out: Path) -> None:
    try:
        out.rmdir()
    except OSError:
        pass
