"""ASIGN's imputation, now `stimpute.models.asign` (a saveable `Model`); the names it always
had are kept importable from here."""

from stimpute.models.asign import (COPY_SHARE, FIXED_SHARE, FUSIONS, MEMBERS, Asign, AsignConfig, FusionWeights,  # noqa: F401
                                   ImputeResult, fit_fusion, impute_stack)
from stimpute.models.msagnet_model import graph_batch  # noqa: F401
from stimpute.trainer import split_known  # noqa: F401
