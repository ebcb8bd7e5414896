"""`stimpute.threads`: small steps on one thread, every pool restored after its block."""

from __future__ import annotations

import os

import cv2
import torch
from threadpoolctl import threadpool_info

from stimpute.threads import LARGE_GRAPH_NODES, blas_threads, opencv_threads, threads_for_size, torch_threads


def test_small_steps_run_on_one_thread_and_large_ones_on_every_core():
    assert threads_for_size(LARGE_GRAPH_NODES - 1) == 1
    assert threads_for_size(LARGE_GRAPH_NODES) == (os.cpu_count() or 1)


def test_each_pool_is_set_during_its_block_and_restored_after():
    before = torch.get_num_threads(), cv2.getNumThreads(), [p["num_threads"] for p in threadpool_info()]
    with torch_threads(1), opencv_threads(1), blas_threads(1):
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert (torch.get_num_threads(), cv2.getNumThreads(), [p["num_threads"] for p in threadpool_info()]) == before
