"""Fuzzing the input boundary: any spot table and counts matrix gives a result or a clear
StimputeError, never a traceback from deep inside."""

from __future__ import annotations

import anndata as ad
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stimpute import Section, SectionImage, StimputeError
from stimpute.expression import panel_expression, select_panel
from stimpute.io.validate import validate_section

IMAGE = SectionImage(array=np.full((64, 64, 3), 200, np.uint8))
values = st.one_of(st.integers(-3, 50).map(float), st.floats(allow_nan=True, allow_infinity=False, width=32), st.just(0.0))


@st.composite
def sections(draw):
    n = draw(st.integers(1, 12))
    g = draw(st.integers(0, 5))
    counts = draw(arrays(np.float32, (n, g), elements=values))
    xy = draw(arrays(np.float64, (n, 2), elements=st.floats(-20, 90) | st.just(float("nan"))))
    ids = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]) | st.text(min_size=1, max_size=3), min_size=n, max_size=n))
    adata = ad.AnnData(X=counts)
    adata.obs_names = ids
    adata.var_names = [f"G{i}" for i in range(g)]
    adata.obsm["spatial"] = xy
    return Section("fuzz", adata, IMAGE, um_per_px=1.0, source="fuzz.h5ad")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(sections())
def test_validation_and_panel_never_crash(section):
    try:
        section = validate_section(section)
        panel = select_panel(section.adata, n_top=3)
        expr = panel_expression(section, panel)
    except StimputeError as exc:
        assert exc.lines() and all(line.startswith("fuzz") or "gene" in line for line in exc.lines())
        return
    assert np.isfinite(expr).all() and expr.shape == (section.n_spots, len(panel))
