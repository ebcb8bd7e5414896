"""Moved to `stimpute.files` (issue 26: a leaf every layer may write through); this name still imports."""

import sys

from stimpute import files

sys.modules[__name__] = files
