"""Start-up and writing of a run: the pipeline imports no training library until it trains,
`stimpute.preload` imports them in a thread meanwhile, without changing what is imported, and
the figures drawn in a thread read arrays of their own."""

from __future__ import annotations

import builtins
import importlib
import sys

from stimpute.preload import _absolute, preloading, thawed_after
from tests.helpers import heavy_after


def test_pipeline_import_leaves_training_libraries_for_later():
    code = ("import stimpute.pipeline, stimpute.tl, stimpute.cli\n"
            "from stimpute.models.msagnet import TrainConfig\n"
            "TrainConfig(seed=1).to_yaml()\n"
            "import sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'scanpy', 'torch_geometric'}))")
    printed = []
    heavy_after(code, printed)
    assert eval(printed[0].strip().splitlines()[-2]) == []


def test_preloading_imports_in_a_thread_and_restores_the_import_hooks():
    code = ("from stimpute.preload import preloading\nimport sys, builtins, importlib, gc\n"
            "before, thresholds = (builtins.__import__, importlib.import_module), gc.get_threshold()\n"
            "with preloading(['json.tool', 'no_such_module_xyz']) as worker:\n"
            "    import csv  # another thread's import meanwhile: serialised with the worker's\n"
            "    assert worker is not None and worker.name == 'stimpute-preload'\n"
            "assert not worker.is_alive() and 'json.tool' in sys.modules and 'csv' in sys.modules\n"
            "assert (builtins.__import__, importlib.import_module) == before and gc.get_threshold() == thresholds\n"
            "assert gc.get_freeze_count() > 0  # what the libraries left behind: out of later full collections\n"
            "try:\n    import no_such_module_xyz\nexcept ModuleNotFoundError as exc:\n    print('missing', exc.name)\n")
    printed = []
    heavy_after(code, printed)
    assert "missing no_such_module_xyz" in printed[0]


def test_a_run_freezes_objects_only_while_it_runs():
    """`thawed_after` (around each `run_impute`) undoes the preloading's `gc.freeze`, which took
    the caller's live objects too, unless the caller had frozen objects itself; the warm-up
    calls run in the thread after the imports, a failing one ignored."""
    code = ("from stimpute.preload import preloading, thawed_after\nimport gc, threading\n"
            "ran = []\n"
            "with thawed_after():\n"
            "    with preloading(['json.tool'], warm=[lambda: 1 / 0, lambda: ran.append(threading.current_thread().name)]):\n"
            "        pass\n"
            "    assert gc.get_freeze_count() > 0 and ran == ['stimpute-preload']\n"
            "assert gc.get_freeze_count() == 0\n"
            "gc.freeze()\nfrozen = gc.get_freeze_count()\n"
            "with thawed_after():\n"
            "    with preloading(['csv']):\n"
            "        pass\n"
            "assert gc.get_freeze_count() >= frozen > 0\ngc.unfreeze()\n"
            "with thawed_after():\n"
            "    with preloading(['csv']) as worker:  # loaded: nothing to import, frozen at once\n"
            "        assert worker is None and gc.get_freeze_count() > 0\n"
            "assert gc.get_freeze_count() == 0\nprint('thawed')\n")
    printed = []
    heavy_after(code, printed)
    assert "thawed" in printed[0]


def test_preloading_starts_nothing_when_all_is_loaded_or_nested():
    with thawed_after(), preloading(["json", "os"]) as worker:
        assert worker is None
    outer_hooks = None
    with preloading(["this_module_does_not_exist_abc"]) as outer:
        outer_hooks = builtins.__import__
        with preloading(["this_module_does_not_exist_def"]) as inner:
            assert inner is None and builtins.__import__ is outer_hooks
        assert outer is not None
    assert builtins.__import__ is not outer_hooks and importlib.import_module("json") is sys.modules["json"]


def test_relative_imports_resolve_as_importlib_does():
    assert _absolute("_coo", {"__package__": "scipy.sparse"}, 1) == "scipy.sparse._coo"
    assert _absolute("_shared.filters", {"__package__": "skimage.filters"}, 2) == "skimage._shared.filters"
    assert _absolute("", {"__package__": "PIL"}, 1) == "PIL"
    assert _absolute("x", {"__package__": "top"}, 3) == "" and _absolute("x", {}, 1) == ""


def test_figure_inputs_are_held_apart_from_the_library_writing_lends_out():
    """impute draws figures in a thread while it writes .h5ad files, and writing lends a
    library's images out of `uns` for a moment: the figure reads its own copy of the refs."""
    import numpy as np

    from stimpute.pipeline import _figure_library

    library = {"images": {"hires": np.zeros((4, 5, 3), np.uint8)}, "scalefactors": {"tissue_hires_scalef": 0.5}}
    held = _figure_library(library)
    library["images"].pop("hires")
    library["scalefactors"].clear()
    assert held["images"]["hires"].shape == (4, 5, 3) and held["scalefactors"] == {"tissue_hires_scalef": 0.5}
