"""Registration benchmark: synthetic stacks with known transforms, and the HER2-ST C2/C3/C4 pairs.

Run: `python benchmarks/bench_register.py [--seeds 20] [--sections 3]` from the repository
root. Prints two markdown tables: the synthetic spot-position error (in spot diameters,
every section against the truth in the reference frame, so chained errors count) and,
per adjacent HER2-ST pair, tissue-mask Dice before/after, stain NCC and seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from stimpute.data import Stack
from stimpute.datasets import synthetic_stack, synthetic_truth
from stimpute.io import read_section
from stimpute.register import apply_transform, register_stack
from stimpute.register.matching import match_stack, matched_fraction

HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"


def synthetic(seeds: int, n_sections: int) -> None:
    print(f"## Synthetic stacks ({seeds} seeds, {n_sections} sections, random rotation/translation/flip)\n")
    print("| seed | flips | median error | p95 error | seconds |\n|---|---|---|---|---|")
    errors = []
    for seed in range(seeds):
        stack = synthetic_stack(n_sections=n_sections, seed=seed)
        truth = synthetic_truth(stack)
        start = time.perf_counter()
        reg = register_stack(stack)
        seconds = time.perf_counter() - start
        err = np.concatenate([
            np.linalg.norm(reg.coords_ref[i] - apply_transform(truth.to_reference(i), s.xy), axis=1) / s.spot_diameter_px
            for i, s in enumerate(stack) if i > 0
        ])
        errors.append(err)
        flips = int(reg.pairs["mirrored"].sum())
        print(f"| {seed} | {flips} | {np.median(err):.3f} | {np.percentile(err, 95):.3f} | {seconds:.1f} |", flush=True)
    pooled = np.concatenate(errors)
    print(f"\nAll spots: median {np.median(pooled):.3f}, 95th percentile {np.percentile(pooled, 95):.3f} "
          "spot diameters (targets 0.25 / 0.5).\n")


def her2st() -> None:
    if not HER2ST.is_dir():
        print(f"HER2-ST data not found at {HER2ST}: skipped.")
        return
    stack = Stack([read_section(HER2ST / name) for name in ("C2", "C3", "C4")])
    start = time.perf_counter()
    reg = register_stack(stack)
    total = time.perf_counter() - start
    print("## HER2-ST patient C (full-size JPEGs)\n")
    print("| pair | Dice before | Dice after | stain NCC | angle | mirrored | seconds |\n|---|---|---|---|---|---|---|")
    for row in reg.pairs.itertuples():
        print(f"| {row.moving} → {row.fixed} | {row.dice_before:.3f} | {row.dice_after:.3f} | {row.ncc_after:.3f} | "
              f"{row.angle_deg:.0f}° | {row.mirrored} | {row.seconds:.1f} |")
    fractions = matched_fraction(stack, match_stack(stack, reg.coords_ref))
    print(f"\nWhole stack {total:.1f} s (views of every section included). Spots with a cross-layer match: "
          + ", ".join(f"{k} {v:.0%}" for k, v in fractions.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sections", type=int, default=3)
    args = parser.parse_args()
    synthetic(args.seeds, args.sections)
    her2st()


if __name__ == "__main__":
    main()
