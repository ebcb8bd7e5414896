#!/usr/bin/env bash
# The stimpute benchmark on the shared HER2-ST sections C2, C3, C4, in one command.
#   benchmarks/run_her2st.sh [OUT_DIR] [more `stimpute benchmark` options, e.g. --methods ridge,knn]
# HER2-ST is found at $STIMPUTE_HER2ST, else ../shared/data/her2st beside the repository.
# OUT_DIR (default benchmarks/results/her2st, git-ignored) is overwritten; its feature
# cache is reused, so reruns skip feature extraction.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
data="${STIMPUTE_HER2ST:-$repo/../shared/data/her2st}"
out="${1:-$repo/benchmarks/results/her2st}"
shift $(( $# > 0 ? 1 : 0 ))
for s in C2 C3 C4; do
  [[ -d "$data/$s" ]] || { echo "error: HER2-ST section $data/$s not found (set STIMPUTE_HER2ST)" >&2; exit 2; }
done
exec stimpute benchmark "$data/C2" "$data/C3" "$data/C4" --out "$out" --force "$@"
