"""Defaults that the command line shows in `--help` and the Python API shares.

Kept in a module that imports nothing, so the CLI reads them at start-up without loading
the modules that use them (scanpy, anndata).
"""

DEFAULT_PANEL_SIZE = 250  # genes in the imputed panel when none are given: top highly variable genes
DEFAULT_FUSION = "calibrated"  # ASIGN's fusion: per-gene shares fitted on held-out known spots (benchmarks/README.md, the fusion default)
