"""Deprecated name of `stimpute.benchmark` (the benchmark harness), renamed in issue 26; this name still imports."""

import sys
import warnings

from stimpute import benchmark

warnings.warn("stimpute.evaluate is renamed stimpute.benchmark", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = benchmark
