"""Stage timing: seconds and peak memory per stage, written by commands as timings.json."""

from __future__ import annotations

import json
import time

import numpy as np

from stimpute.timing import recording, records_stages, stage, timed


def test_stages_accumulate_and_nest_and_cost_nothing_when_not_recording():
    @timed("work")
    def work(n):
        time.sleep(0.01)
        return np.ones(n).sum()

    assert work(3) == 3  # no recorder: runs plainly
    with recording() as timer:
        with stage("outer"):
            work(10)
            big = np.ones(40 * 2**20 // 8)  # 40 MiB
            big[:] = 2
            work(10)
            spin = time.process_time() + 0.05
            while time.process_time() < spin:  # CPU the stage itself burns
                pass
    r = timer.to_dict()
    assert r["work"]["calls"] == 2 and r["work"]["seconds"] >= 0.02
    assert r["outer"]["calls"] == 1 and r["outer"]["seconds"] >= r["work"]["seconds"]
    assert r["outer"]["peak_mib"] >= r["work"]["peak_mib"] > 0
    assert r["outer"]["user_s"] + r["outer"]["sys_s"] >= 0.04 and r["work"]["user_s"] >= 0  # process CPU while open
    del big


def test_records_stages_writes_timings_json_into_out(tmp_path):
    @records_stages
    def command(sections, out, fast=True):
        with stage("read"):
            pass
        return len(sections)

    assert command([1, 2], tmp_path / "run") == 2
    stages = json.loads((tmp_path / "run" / "timings.json").read_text())["stages"]
    assert set(stages) == {"total", "read"} and stages["total"]["seconds"] >= stages["read"]["seconds"]


def test_a_stage_entered_again_while_running_is_counted_once():
    @timed("training")
    def fit():
        time.sleep(0.02)

    @timed("training")
    def member():
        fit()
        time.sleep(0.02)

    with recording() as timer:
        start = time.perf_counter()
        member()
        wall = time.perf_counter() - start
    r = timer.to_dict()["training"]
    assert r["calls"] == 1 and 0.04 <= r["seconds"] <= wall  # counted twice, it would exceed the wall time (a fixed bound failed under load)
