"""Rotation search, coarse to fine against exhaustive: the same candidates, and their CPU seconds.

Run: `python benchmarks/bench_register_search.py [--seeds 20] [--ref PATH]` from the repository
root. On HER2-ST C2/C3/C4 and the synthetic stacks of bench_register.py (3 sections, seeds
0..N-1) it runs `rotation_search` on register_stack's coarse views both ways and prints, per
stack, whether every candidate (angle, mirror, placement matrix, IoU) is the same to the
bit, the CPU seconds a pair of each, and the angles scored on the masks themselves. With
`--ref PATH` (a checkout of another commit) it also runs `register_stack` on the same stacks
under both trees and checks that transforms, pair tables (all but `seconds`) and registered
spots are equal. Exits 1 where anything differs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stimpute.data import Stack
from stimpute.datasets import synthetic_stack
from stimpute.io import read_section
from stimpute.register import COARSE_SIDE, register_stack, rigid
from stimpute.register.masks import section_view

HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"


def stacks(seeds: int):
    """(name, stack) of HER2-ST C2-C4 (where the data are) and the synthetic seeds, made one at a time."""
    if HER2ST.is_dir():
        yield "HER2-ST C2-C4", Stack([read_section(HER2ST / name) for name in ("C2", "C3", "C4")])
    for seed in range(seeds):
        yield f"synthetic seed {seed}", synthetic_stack(n_sections=3, seed=seed)


def compare_search(name: str, stack: Stack) -> bool:
    """One table row: the two searches' candidates on each adjacent pair, and their CPU seconds."""
    extent_um = max(max(s.image.size) * s.um_per_px for s in stack)
    views = [section_view(s, extent_um / COARSE_SIDE) for s in stack]
    seconds, scored, same = np.zeros(2), 0, True
    for fixed, moving in zip(views, views[1:]):
        found = []
        for k, exhaustive in enumerate((True, False)):
            start = time.process_time()
            found.append(rigid.rotation_search(fixed, moving, exhaustive=exhaustive))
            seconds[k] += time.process_time() - start
        same &= len(found[0]) == len(found[1]) and all(
            (a.angle_deg, a.mirrored, a.iou) == (b.angle_deg, b.mirrored, b.iou) and np.array_equal(a.matrix, b.matrix)
            for a, b in zip(*found))
        scored += _scored(fixed, moving)
    pairs = len(views) - 1
    print(f"| {name} | {pairs} | {'yes' if same else '**no**'} | {seconds[0] / pairs:.3f} | {seconds[1] / pairs:.3f} | "
          f"{scored / pairs:.0f} of 240 |", flush=True)
    return same


def _scored(fixed, moving) -> int:
    """Angles the coarse-to-fine search scores on the masks themselves (not the half-side ones)."""
    sides = []
    best_shift = rigid._best_shift
    rigid._best_shift = lambda overlap, *args: sides.append(overlap.side) or best_shift(overlap, *args)
    try:
        rigid.rotation_search(fixed, moving)
    finally:
        rigid._best_shift = best_shift
    return sides.count(max(sides))


def registrations(seeds: int, out: Path) -> None:
    """register_stack's transforms, pair tables (without `seconds`) and spots on every stack, pickled to `out`."""
    results = {}
    for name, stack in stacks(seeds):
        reg = register_stack(stack)
        results[name] = (reg.transforms, reg.pairs.drop(columns="seconds"), reg.coords_ref)
    out.write_bytes(pickle.dumps(results))


def compare_trees(seeds: int, ref: Path) -> bool:
    """register_stack under this tree and under `ref`: True where every output is equal."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = []
        for tree in (Path(__file__).resolve().parents[1], ref.resolve()):
            out = Path(tmp) / f"{len(outputs)}.pkl"
            env = {**os.environ, "PYTHONPATH": str(tree / "src")}
            subprocess.run([sys.executable, __file__, "--seeds", str(seeds), "--registrations", str(out)], env=env, check=True)
            outputs.append(pickle.loads(out.read_bytes()))
    same = True
    for name, (transforms, pairs, coords) in outputs[0].items():
        other = outputs[1][name]
        equal = (all(np.array_equal(a, b) for a, b in zip(transforms, other[0])) and pairs.equals(other[1])
                 and all(np.array_equal(a, b) for a, b in zip(coords, other[2])))
        print(f"| {name} | {'yes' if equal else '**no**'} |")
        same &= equal
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--ref", type=Path, help="checkout of another commit: compare register_stack's outputs with it")
    parser.add_argument("--registrations", type=Path, help=argparse.SUPPRESS)  # the --ref subprocesses' own work
    args = parser.parse_args()
    if args.registrations:
        registrations(args.seeds, args.registrations)
        return
    print("| stack | pairs | same candidates | exhaustive CPU s a pair | coarse to fine CPU s a pair | angles scored at full size |")
    print("|---|---|---|---|---|---|")
    same = all([compare_search(name, stack) for name, stack in stacks(args.seeds)])
    if args.ref:
        print(f"\n| stack | register_stack outputs equal to {args.ref} |\n|---|---|")
        same &= compare_trees(args.seeds, args.ref)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
