"""Writing files safely: atomic writes, and the run that owns an output folder (a lock while
it runs, a manifest of the files it wrote). A leaf, so every layer writes through it.

Every command that writes a result folder (impute, train, predict, register, features,
advise, benchmark, convert) runs inside `run_ownership(out, command, inputs, force)`:

- one guard, `check_inputs`, refuses a written path (`--out`, and every name a run claims
  in it) that is, holds or lies inside a path the command reads, spelt as given and with
  symlinks resolved, with or without `--force`; commands that write one file use it too;
- `out/stimpute.lock` is held with an OS advisory lock (`flock`) while the run lasts, so a
  second run on the same folder, or inside it, is refused at once; the kernel releases
  the lock when the process dies, so a killed run's lock is taken over, atomically;
- `out/stimpute-run.json` names every file stimpute runs wrote into the folder, each
  recorded as it is written (`record_write`, called by `atomic_write`), the
  last run's command, id and whether it finished. A run claims the names (files, or
  folders ending in "/") it may write (`Run.claim`) before writing: an existing file no
  stimpute run wrote is never replaced or deleted, even with `--force`; one an earlier run
  wrote is replaced only with `--force` or when that run is an unfinished (killed) run of
  the same command, which is resumed. Caches (`caches=`) are content-addressed and reused
  by every command without `--force`. With `--force`, the earlier outputs this run does
  not write again are removed when it finishes, with one line saying so. Temporary files
  carry the run's id (`.NAME.RUNID.*.part`): a rerun removes only those of the run it
  follows, never a user's `*.part`.

A manifest of an older stimpute may list folders ("cache/"): their files count as that
run's, but are removed only where listed by name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from stimpute.errors import StimputeError, StimputeWarning

LOCK_FILE = "stimpute.lock"
MANIFEST_FILE = "stimpute-run.json"
_ACTIVE: list["Run"] = []  # runs held by this process, found by `record_write` and `temp_prefix`
_LOCKS: set[int] = set()  # descriptors of the locks this process holds
_GUARD = threading.Lock()


def _forget_in_child() -> None:
    """A forked child (a feature worker) drops its copy of the parent's locks and runs: the
    lock must end with the run's process, not outlive it in a worker."""
    for fd in _LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKS.clear()
    _ACTIVE.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@dataclass
class Run:
    """The run holding `out`: what earlier runs left (`previous`) and what this one owns."""

    out: Path
    command: str
    force: bool
    previous: dict
    inputs: tuple = ()
    id: str = field(default_factory=lambda: f"run-{secrets.token_hex(6)}")
    owned: set[str] = field(default_factory=set)  # files stimpute runs wrote in `out`
    caches: set[str] = field(default_factory=set)  # the owned files that are caches
    stale: set[str] = field(default_factory=set)  # earlier outputs removed at the end unless written again
    claimed: list[str] = field(default_factory=list)  # names claimed, outputs and caches
    cache_names: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)
    legacy: list[str] = field(default_factory=list)  # folders an older stimpute's manifest listed

    def __post_init__(self):
        listed = [f for f in self.previous.get("files", []) if isinstance(f, str)]
        self.legacy = [f for f in listed if f.endswith("/")]
        self.owned = {f for f in listed if not f.endswith("/")}
        self.caches = set(self.previous.get("caches", [])) & self.owned
        if self.force:
            self.stale = self.owned - self.caches
        elif self.resuming:  # finish the killed run's --force
            self.stale = set(self.previous.get("stale", [])) & self.owned

    @property
    def resuming(self) -> bool:
        """The last run in `out` was this command and never finished (killed)."""
        return self.previous.get("command") == self.command and self.previous.get("status") == "running"

    def claim(self, outputs: Sequence[str] = (), caches: Sequence[str] = (), derived: Sequence[str] = ()) -> bool:
        """Declare the names (files, or folders ending in "/") this run writes, before writing.

        Raises a StimputeError for a name that is or reaches an input, for an output named
        twice in this run, for a folder another live run holds, for an existing file that
        no stimpute run wrote, and for an earlier run's `outputs` unless `--force` is given
        or that run is being resumed; returns True: the claimed names may now be written.
        `derived`: outputs drawn from the folder's own results (view.html), replaced
        without `--force`.
        """
        outputs = [*outputs, *derived]
        for name in [*outputs, *caches]:
            check_inputs(self.out / name, self.inputs)
            if name.endswith("/") and (self.out / name).is_dir():
                for lock in (self.out / name).rglob(LOCK_FILE):
                    holder = _live_holder(lock)
                    if holder is not None:
                        raise StimputeError(lock.parent, f"is in use by {_who(holder)}: wait for it to finish or choose another --out")
        twice = sorted({n for n in outputs if n in self.claimed and n not in self.cache_names or list(outputs).count(n) > 1})
        if twice:
            raise StimputeError(self.out / twice[0], "would be written twice by this run: section names must be unique "
                                                     "(after replacing path separators)")
        foreign, earlier = [], []
        for name in [*outputs, *caches]:
            files = self._files(name)
            foreign += [f for f in files if not self.owns(f)]
            if name in outputs and name not in derived:
                earlier += files
        if foreign:
            raise StimputeError(self.out, f"holds {_shown(foreign)}, which no stimpute run wrote here; it is never replaced, "
                                          "even with --force: move it away or choose another --out")
        if earlier and not (self.force or self.resuming):
            raise StimputeError(self.out, f"already holds results ({_shown(earlier)}); pass --force to overwrite them")
        if not self.claimed:
            _remove_temps(self.out, self.previous.get("run"))
        self.claimed += [n for n in [*outputs, *caches] if n not in self.claimed]
        self.cache_names += [n for n in caches if n not in self.cache_names]
        self.stale -= {f for name in caches for f in self._files(name)}
        self._save("running")
        return True

    def record(self, rel: str) -> None:
        """Note in the manifest that this run writes `rel` (relative to `out`), before it is renamed into place."""
        with _GUARD:
            self.written.add(rel)
            self.owned.add(rel)
            self.stale.discard(rel)
            if any(_under(rel, name) for name in self.cache_names):
                self.caches.add(rel)
            self._save("running")

    def keep(self, name: str) -> None:
        """Count the owned files under the claimed `name` as this run's outputs although it
        did not rewrite them (it reused them: a finished training's checkpoints)."""
        for rel in self._files(name):
            if rel in self.owned and rel not in self.written:
                self.record(rel)

    def _files(self, name: str) -> list[str]:
        """Files under `name` in `out`, relative, excluding temporary `.part` files."""
        path = self.out / name
        if path.is_dir():
            return sorted(p.relative_to(self.out).as_posix() for p in path.rglob("*")
                          if not p.is_dir() and not p.name.endswith(".part"))
        return [name.rstrip("/")] if path.exists() or path.is_symlink() else []

    def owns(self, rel: str) -> bool:
        """Whether a stimpute run wrote `rel`: this folder's manifest lists it, or that of a
        subfolder that is itself a run's output (a feature cache from `stimpute features`)."""
        if rel in self.owned or any(_under(rel, folder) for folder in self.legacy):
            return True
        parts = rel.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            inner = read_manifest(self.out.joinpath(*parts[:depth]))
            if inner:
                name = "/".join(parts[depth:])
                return name == MANIFEST_FILE or name in inner.get("files", [])
        return False

    def _save(self, status: str) -> None:
        _write_manifest(self.out, {"format": 1, "command": self.command, "status": status, "run": self.id,
                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": sorted(self.owned) + self.legacy,
                                   "caches": sorted(self.caches), "stale": sorted(self.stale)})

    def _finish(self) -> None:
        """Remove the earlier outputs that a --force run did not write again (one line says
        which), then record the files that stimpute runs wrote and that are still there."""
        if not self.claimed:
            return
        removed = sorted(f for f in self.stale if (self.out / f).is_file() or (self.out / f).is_symlink())
        for rel in removed:
            (self.out / rel).unlink()
            _remove_empty_parents(self.out / rel, self.out)
        if removed:
            warnings.warn(f"{self.out}: --force removed {len(removed)} earlier output(s) that this run does not write "
                          f"again: {_shown(removed)}", StimputeWarning, stacklevel=2)
        self.stale = set()
        self.owned = {f for f in self.owned if (self.out / f).exists()} | {f for d in self.legacy for f in self._files(d)}
        self.caches &= self.owned
        self.legacy = []
        self._save("finished")

    def _abandon(self) -> None:
        """A run that failed before writing anything leaves the manifest as it found it."""
        if not self.claimed or self.written:
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
    if out.exists() and not out.is_dir():
        raise StimputeError(out, "is a file, not a folder: --out must name a folder")
    inputs = tuple(Path(p) for p in inputs if p is not None)
    check_inputs(out, inputs)
    _check_ancestors(out)
    created = _make_folder(out)
    lock = out / LOCK_FILE
    try:
        fd = _acquire(lock, command)
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise
    run = Run(out, command, force, read_manifest(out), inputs)
    _ACTIVE.append(run)
    try:
        try:
            yield run
        except BaseException:
            run._abandon()
            raise
        run._finish()
    finally:
        _ACTIVE.remove(run)
        _release(lock, fd)
        if created:
            _remove_if_empty(out)


def record_write(path: str | Path) -> None:
    """Record `path` in the manifest of the run of this process whose folder holds it (if
    any): every writer calls it just before the file appears under its name."""
    for run, rel in _runs_holding(path):
        run.record(rel)


def temp_prefix(path: str | Path) -> str:
    """The name prefix of a temporary file for `path`: `.NAME.RUNID.` inside a run's folder
    (so a rerun removes exactly the killed run's temporary files), else `.NAME.`."""
    path = Path(path)
    held = _runs_holding(path)
    return f".{path.name}.{held[-1][0].id}." if held else f".{path.name}."


def _runs_holding(path: str | Path) -> list[tuple[Run, str]]:
    target = os.path.abspath(path)
    found = []
    for run in list(_ACTIVE):
        root = os.path.abspath(run.out)
        if target.startswith(root + os.sep):
            found.append((run, Path(os.path.relpath(target, root)).as_posix()))
    return found


def read_manifest(out: Path) -> dict:
    """The manifest of `out` ({} where no stimpute run wrote there, or it is unreadable)."""
    try:
        record = json.loads((Path(out) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or not all(isinstance(record.get(k, []), list) for k in ("files", "caches", "stale")):
        return {}
    return record


def _write_manifest(out: Path, record: dict) -> None:
    tmp = out / f".{MANIFEST_FILE}.{record.get('run', os.getpid())}.part"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST_FILE)


def check_inputs(target: str | Path, inputs: Sequence[str | Path | None]) -> None:
    """The one guard of every written path: refuse a file or folder `target` that is, holds
    or lies inside one of `inputs`, comparing the paths as given (absolute) and with
    symlinks resolved, so an input reached through a link inside `target` counts too."""
    target = Path(target)
    written = {Path(os.path.abspath(target)), target.resolve()}
    for given in inputs:
        if given is None:
            continue
        read = {Path(os.path.abspath(given)), Path(given).resolve()}
        for t in written:
            for path in read:
                if path == t:
                    problem = f"is the input {given}"
                elif t in path.parents:
                    problem = f"holds the input {given}"
                elif path.is_dir() and path in t.parents:
                    problem = f"lies inside the input folder {given}"
                else:
                    continue
                raise StimputeError(target, f"{problem}: results never go where inputs are; choose another --out")


def refuse_if_held(out: str | Path) -> None:
    """Refuse at once an `out` that a live run holds, or that lies inside a folder one holds:
    the check a command makes before it imports its libraries, so a refused run costs a
    fraction of a CPU second. `run_ownership` takes the lock itself later (atomically)."""
    out = Path(out)
    holder = _live_holder(out / LOCK_FILE)
    if holder is not None:
        raise _in_use(out / LOCK_FILE, holder)
    _check_ancestors(out)


def _check_ancestors(out: Path) -> None:
    """Refuse `out` inside a folder that a live run holds: that run owns everything in it."""
    for parent in {*Path(os.path.abspath(out)).parents, *out.resolve().parents}:
        holder = _live_holder(parent / LOCK_FILE)
        if holder is not None:
            raise StimputeError(out, f"lies inside {parent}, which {_who(holder)} holds: wait for it to finish "
                                     "or choose another --out")


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


def _acquire(lock: Path, command: str) -> int:
    """Take `lock` (flock, exclusive, never waiting) and write this process into it; returns
    its descriptor. Atomic: of processes racing for it, exactly one gets it."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "command": command}
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise StimputeError(lock, "is a folder, not stimpute's lock file: remove it or choose another --out") from None
        except OSError as exc:
            raise StimputeError(lock.parent, f"cannot write to the output folder ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _in_use(lock, _read_lock(lock)) from None
            raise StimputeError(lock, f"cannot be locked ({exc.strerror or exc}): choose an --out on a file system "
                                      "that supports file locks") from None
        if not _same_file(fd, lock):  # its holder removed it meanwhile: lock the new one
            os.close(fd)
            continue
        holder = _read_lock(lock)  # a lock file of an older stimpute holds no flock: ask its process
        if holder and holder.get("pid") != os.getpid() and _alive(holder):
            os.close(fd)
            raise _in_use(lock, holder)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        _LOCKS.add(fd)
        return fd
    raise StimputeError(lock.parent, f"could not take the lock {lock}")


def _release(lock: Path, fd: int) -> None:
    try:
        if _same_file(fd, lock):
            lock.unlink()
    finally:
        _LOCKS.discard(fd)
        os.close(fd)


def _live_holder(lock: Path) -> dict | None:
    """The holder recorded in `lock` ({} if unreadable) where a live process holds it, else None."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_lock(lock) or {}
    finally:
        os.close(fd)
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _in_use(lock: Path, holder: dict | None) -> StimputeError:
    return StimputeError(lock.parent, f"is in use by {_who(holder)}: wait for it to finish or choose another --out "
                                      f"(if no such run exists, delete {lock})")


def _who(holder: dict | None) -> str:
    if not holder:
        return "a run that is starting"
    return f"stimpute {holder.get('command')} (pid {holder.get('pid')} on {holder.get('host')})"


def _read_lock(lock: Path) -> dict | None:
    """The holder recorded in `lock`, None where it is missing, empty or unreadable."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def _alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` still runs (assumed so on another host)."""
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


def _remove_temps(out: Path, run_id: str | None) -> None:
    """Delete the temporary files that the run `run_id` (killed) left in `out`: only names
    carrying its id, never a user's `*.part`."""
    if isinstance(run_id, str) and run_id.startswith("run-") and run_id[4:].isalnum():
        for part in out.rglob(f".*.{run_id}.*part"):
            if part.is_file():
                part.unlink(missing_ok=True)


def _under(rel: str, name: str) -> bool:
    return rel == name or (name.endswith("/") and rel.startswith(name))


def _shown(files: Sequence[str]) -> str:
    return ", ".join(files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")


def _remove_empty_parents(path: Path, out: Path) -> None:
    for parent in path.parents:
        if parent == out or out not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def _remove_if_empty(out: Path) -> None:
    try:
        out.rmdir()
    except OSError:
        pass


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (config, gene list) atomically."""
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path`: readers
    see the old file or the whole new one, never a half-written one; `tmp` is removed on failure.
    Inside a run's folder, `tmp` carries the run's id and `path` is recorded in its manifest
    before the rename (`stimpute.files`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".part", dir=path.parent)
    except OSError as exc:
        raise StimputeError(path, f"cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        record_write(path)
        os.replace(tmp, path)
    except OSError as exc:  # disk full, a folder in the way, no permission: the user's to fix
        Path(tmp).unlink(missing_ok=True)
        raise StimputeError(path, f"cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
