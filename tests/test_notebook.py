"""Acceptance (issue 26): a notebook user's session, start to finish, and the CLI on the same inputs.

`st.datasets.her2st_mini()` -> `st.tl.register` -> `st.tl.features` -> `st.tl.impute` ->
`write_h5ad` -> `read_h5ad` -> `st.pl`; then `stimpute impute` on the registered, featured
sections written as files: it reuses both (one registration and one feature pass in the
whole test, counted), gives the same X bit for bit and the same keys, and `st.pl` and
squidpy draw every written file with default arguments (`convert` outputs included).
"""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest

from tests.helpers import run_cli

matplotlib.use("Agg")

EPOCHS = 3
SECTIONS = ("C3", "C4")  # two of the three: one registered pair, half the time of three


def _keys(adata: ad.AnnData) -> dict:
    return {"layers": set(adata.layers), "obs": set(adata.obs), "obsm": set(adata.obsm), "var": set(adata.var),
            "uns": set(adata.uns), "uns_stimpute": set(adata.uns["stimpute"])}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The notebook session and the CLI run, with the registrations and feature passes counted."""
    import stimpute as st
    import stimpute.features.stored as stored
    import stimpute.register as register
    import stimpute.register.grid as grid

    root = tmp_path_factory.mktemp("notebook")
    calls = {"register": 0, "features": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    patch = pytest.MonkeyPatch()
    patch.setattr(register, "register_stack", counted("register", register.register_stack))
    patch.setattr(grid, "register_stack", register.register_stack)
    patch.setattr(stored, "spot_features", counted("features", stored.spot_features))
    try:
        adatas = [a for a in st.datasets.her2st_mini() if a.uns["stimpute"]["section"] in SECTIONS]
        assert st.tl.register(adatas) is adatas
        st.tl.features(adatas)
        (root / "in").mkdir()
        inputs = []
        for a in adatas:  # the registered, featured sections as files: what the CLI reads
            inputs.append(root / "in" / f"{a.uns['stimpute']['section']}.h5ad")
            a.write_h5ad(inputs[-1])
        result = st.tl.impute(adatas, known="C3", device="cpu", epochs=EPOCHS)
        written = []
        for a in result:
            written.append(root / f"tl_{a.uns['stimpute']['section']}.h5ad")
            a.write_h5ad(written[-1])
        cli = run_cli("impute", *inputs, "--known", "C3", "--out", root / "out", "--epochs", EPOCHS, "--device", "cpu")
        assert cli.exit_code == 0, cli.output
        converted = run_cli("convert", "h5ad", inputs[1], root / "converted")
        assert converted.exit_code == 0, converted.output
    finally:
        patch.undo()
    return {"root": root, "result": result, "written": written, "calls": calls, "inputs": inputs}


def test_one_registration_and_one_feature_pass_in_the_whole_session(session):
    assert session["calls"] == {"register": 1, "features": len(SECTIONS)}


def test_tl_results_write_read_and_plot_with_defaults(session):
    import stimpute as st

    back = [ad.read_h5ad(p) for p in session["written"]]
    for given, read in zip(session["result"], back):
        assert np.array_equal(given.X, read.X) and _keys(given) == _keys(read)
    target = back[1]
    assert not target.obs["measured"].any() and back[0].obs["measured"].all()
    assert {"stimpute", "stimpute_model", "stimpute_propagated", "stimpute_weight"} <= set(target.layers)
    assert {"stimpute_reach", "stimpute_confidence"} <= set(target.obs) and "stimpute_confidence" in target.var
    assert "X_stimpute_features" in target.obsm and target.obsm["spatial_3d"].shape == (target.n_obs, 3)
    fig = st.pl.imputed(target)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["ERBB2"]
    assert len(st.pl.block_3d(back).axes[0].collections) == len(SECTIONS)


def test_cli_is_tl_on_files(session):
    """Same X bit for bit, same keys: the command is `tl` between reading and writing."""
    out = session["root"] / "out"
    for given in session["result"][1:]:
        name = given.uns["stimpute"]["section"]
        written = ad.read_h5ad(out / f"{name}.h5ad")
        assert np.array_equal(written.X, given.X) and written.X.dtype == given.X.dtype
        assert _keys(written) == _keys(given)
        assert written.uns["spatial"][name]["metadata"]["source_image_path"].startswith("/")


def test_pl_on_cli_outputs_with_defaults(session):
    import stimpute as st

    out = session["root"] / "out"
    section = ad.read_h5ad(out / "C4.h5ad")
    fig = st.pl.imputed(section)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["ERBB2"]
    block = ad.read_h5ad(out / "block.h5ad")
    fig3d = st.pl.block_3d(block)
    assert len(fig3d.axes[0].collections) == len(SECTIONS)
    labels = [t.get_text() for t in fig3d.axes[0].get_zticklabels()]
    assert labels == ["C3 (measured)", "C4 (imputed)"]
    fig, ax = matplotlib.figure.Figure(), None
    ax = fig.subplots()
    assert st.pl.imputed(section, "ERBB2", ax=ax, layer="stimpute_model") is fig


def test_key_figures_by_default(session):
    figures = session["root"] / "out" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == ["C4.png", "block_3d.png"]


def test_info_reports_the_blocks_measured_section_as_measured(session):
    result = run_cli("info", session["root"] / "out" / "block.h5ad")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert "measured" in rows["C3"] and "yes" in rows["C3"] and "imputed" in rows["C4"]


def test_squidpy_draws_every_written_file_with_defaults(session):
    squidpy = pytest.importorskip("squidpy")
    root = session["root"]
    files = [*session["written"], root / "out" / "C4.h5ad", root / "out" / "block.h5ad",
             root / "converted" / "C4" / "section.h5ad"]
    for path in files:
        adata = ad.read_h5ad(path)
        library = next(iter(adata.uns["spatial"].values()))
        assert {"hires", "lowres"} <= set(library["images"]), path
        assert {"tissue_hires_scalef", "tissue_lowres_scalef"} <= set(library["scalefactors"]), path
        squidpy.pl.spatial_scatter(adata)
        matplotlib.pyplot.close("all")
