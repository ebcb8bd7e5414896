"""Deprecated name of `stimpute.figures` (the figures of the CLI's outputs), renamed in issue 26; this name still imports."""

import sys
import warnings

from stimpute import figures

warnings.warn("stimpute.plot is renamed stimpute.figures", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = figures
