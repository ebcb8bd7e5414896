"""How many threads a step runs on, and the blocks that set them (a leaf: imports its
libraries where a block is entered).

A step over fewer than `LARGE_GRAPH_NODES` spots runs on one thread: splitting it gains
nothing, and on a busy machine the second thread of a pool (torch's OpenMP, numpy's and
scikit-learn's BLAS, OpenCV's) waits for a core at every parallel call. Kernel ridge over a
few hundred spots on a busy 2-core machine: 0.2-0.3 CPU s on one thread, 3.8-5.1 on two;
ASIGN's fusion, 0.3 against 3.5-6.6. Larger steps use every core.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

LARGE_GRAPH_NODES = 5_000  # from this many spots (graph nodes) a step is big enough to share across cores


def threads_for_size(n: int) -> int:
    """Threads for a step over `n` spots: one below `LARGE_GRAPH_NODES`, else every core."""
    return (os.cpu_count() or 1) if n >= LARGE_GRAPH_NODES else 1


def torch_threads(n: int):
    """Run a block with `n` torch intra-op threads, restoring the previous setting."""
    import torch

    return _set_during(torch.get_num_threads, torch.set_num_threads, n)


@contextmanager
def blas_threads(n: int):
    """Run a block with numpy's and scikit-learn's BLAS and OpenMP pools on `n` threads."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(n):
        yield


def opencv_threads(n: int):
    """Run a block with OpenCV's pool on `n` threads, restoring the previous setting (the
    same values: OpenCV's parallel loops split rows, not sums)."""
    import cv2

    return _set_during(cv2.getNumThreads, cv2.setNumThreads, n)


@contextmanager
def _set_during(get, set_, n: int):
    """`set_(n)` for the block, then the value `get()` gave before."""
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)
