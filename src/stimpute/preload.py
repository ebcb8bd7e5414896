"""Import the libraries a run needs later in a background thread, while it reads and
registers its sections.

`stimpute impute` spends seconds importing scanpy, torch_geometric and Lightning (which
imports torch's compiler and torchmetrics), and its writing stage matplotlib and plotly (and
plotly's property validators, a 3 MB JSON read at the first figure), none of which reading
and registration need; these stages leave a core idle, so importing there costs no wall time.

Safe by construction: while the thread runs, imports are serialised by one re-entrant lock.
The thread imports each of its modules holding it; any other thread that imports a module
not yet fully imported takes it first (so it waits for at most the module the thread is
importing). Two threads never initialise modules at once, so none sees a module
half-initialised, and a thread takes the lock before any import lock of that import, so the
two cannot deadlock (an import that reached a module lock some other way, past the wrapped
`builtins.__import__` and `importlib.import_module`, waits at most `WAIT_S`, then goes on as
without this module). A failed import in the thread is left for the code that needs the module
to meet and report. Results do not depend on it: the same modules are imported, only earlier.
While the thread imports, full garbage collections wait, and what the libraries left behind
is frozen after (`gc.freeze`): collections do not walk those objects, which live as long as the
process, until the run ends (`thawed_after`).
"""

from __future__ import annotations

import builtins
import functools
import gc
import importlib
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

# what `stimpute impute` imports after reading and registering its sections, slowest first:
# the graph and MSAGNet (torch_geometric), training (Lightning), the panel (scanpy), ASIGN;
# s3fs where installed: Lightning imports it to ask whether a checkpoint folder is on S3 (~1 s)
TRAINING_MODULES = ("torch._dynamo", "torch_geometric", "torch_geometric.nn", "torchmetrics", "lightning", "scanpy",
                    "stimpute.models.msagnet_training", "stimpute.models.asign", "s3fs")
# what its writing stage imports: the figures (matplotlib's Agg and 3D axes) and the 3D view (plotly)
WRITING_MODULES = ("stimpute.figures", "matplotlib.backends.backend_agg", "mpl_toolkits.mplot3d", "plotly.graph_objects",
                   "plotly.offline")
FULL_GC_DEFERRED = 1000  # gen-1 collections before a full one while the thread imports (Python's default: 10)
WAIT_S = 60.0  # the longest an import waits for the thread's current module (it takes ~1-3 s)

_ORIGINAL_IMPORT = builtins.__import__
_ORIGINAL_IMPORT_MODULE = importlib.import_module


def _loaded(name: str) -> bool:
    """Whether `name` is imported completely (not absent, not still initialising)."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _absolute(name: str, globals, level: int) -> str:
    """The module a relative import names (as importlib resolves it), "" where unknown."""
    package = (globals or {}).get("__package__") or ""
    bits = package.rsplit(".", level - 1)
    if not package or len(bits) < level:
        return ""
    return f"{bits[0]}.{name}" if name else bits[0]


def _may_load(name: str, fromlist) -> bool:
    """Whether `import name` (`from name import fromlist`) may initialise a module."""
    if not name or not _loaded(name):
        return True
    module = sys.modules[name]
    return any(item != "*" and not hasattr(module, item) for item in fromlist or ())  # a submodule not yet imported


@contextmanager
def preloading(modules: Sequence[str] = TRAINING_MODULES + WRITING_MODULES,
               warm: Sequence[Callable[[], object]] = ()) -> Iterator[threading.Thread | None]:
    """Import `modules` in a background thread during the block (joined at its end), other
    threads' imports of modules not yet loaded serialised with it, then call `warm` there
    (first-use work of those libraries; a failure is ignored, as a failed import is). Where
    imports are already wrapped (a nested or concurrent use), nothing is started; where every
    module is loaded (an earlier run in this process), nothing either, and what is alive is
    frozen at once, as the thread would have frozen it."""
    if builtins.__import__ is not _ORIGINAL_IMPORT or all(_loaded(m) for m in modules):
        if builtins.__import__ is _ORIGINAL_IMPORT:
            gc.freeze()
        yield None
        return
    lock = threading.RLock()
    waiting = [0]  # other threads waiting for the lock: the thread lets them go first

    def load() -> None:
        # no full garbage collection while the libraries load (imports trigger ~10, up to 0.3 s
        # each): their objects live as long as the process. Frozen at the end, later full
        # collections do not walk them either
        thresholds = gc.get_threshold()
        gc.set_threshold(thresholds[0], thresholds[1], max(thresholds[2], FULL_GC_DEFERRED))
        try:
            for step in [functools.partial(_ORIGINAL_IMPORT_MODULE, name) for name in modules] + list(warm):
                while waiting[0]:
                    time.sleep(0.001)
                with lock:
                    try:
                        step()
                    except BaseException:  # noqa: BLE001 - the code that needs it imports it again and reports
                        pass
        finally:
            gc.freeze()
            gc.set_threshold(*thresholds)

    worker = threading.Thread(target=load, name="stimpute-preload", daemon=True)

    def serialised(may_load: bool, do):
        if not may_load or not worker.is_alive() or threading.current_thread() is worker:
            return do()
        waiting[0] += 1
        held = lock.acquire(timeout=WAIT_S)
        waiting[0] -= 1
        try:
            return do()
        finally:
            if held:
                lock.release()

    def gated_import(name, globals=None, locals=None, fromlist=(), level=0):
        return serialised(_may_load(name if level == 0 else _absolute(name, globals, level), fromlist),
                          lambda: _ORIGINAL_IMPORT(name, globals, locals, fromlist, level))

    def gated_import_module(name, package=None):
        return serialised(name.startswith(".") or _may_load(name, ()), lambda: _ORIGINAL_IMPORT_MODULE(name, package))

    builtins.__import__, importlib.import_module = gated_import, gated_import_module
    worker.start()
    try:
        yield worker
    finally:
        worker.join()
        builtins.__import__, importlib.import_module = _ORIGINAL_IMPORT, _ORIGINAL_IMPORT_MODULE


@contextmanager
def thawed_after() -> Iterator[None]:
    """Undo, at the block's end, the freeze that a preloading inside it made (`gc.freeze`
    takes every object alive at that moment, the caller's too: in a long Python session their
    cyclic garbage would never be collected). Full collections walk those objects again after,
    as without the freeze. Left as it is where something froze objects before the block."""
    frozen_before = gc.get_freeze_count()
    try:
        yield
    finally:
        if not frozen_before and gc.get_freeze_count():
            gc.unfreeze()
