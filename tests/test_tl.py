"""`stimpute.tl` / `stimpute.pl` on in-memory AnnData, as a notebook user drives them."""

from __future__ import annotations

import numpy as np
import pytest

from stimpute.datasets import synthetic_stack
from stimpute.errors import StimputeError
from stimpute.image import SectionImage
from stimpute.io.inmemory import section_from_anndata, section_to_anndata

SMALL = dict(n_genes=30, tissue_radius_um=350.0, image_size=800)


@pytest.fixture(scope="module")
def small_stack():
    return synthetic_stack(3, seed=0, **SMALL)


def _as_user_has_them(stack, measured=("S1",)):
    """Each section as scanpy holds it: counts (only the measured ones), spots, hires image."""
    return [section_to_anndata(s, hires_side=400, counts=s.name in measured) for s in stack]


def test_notebook_impute_then_scanpy_and_plots(small_stack, tmp_path, monkeypatch):
    import scanpy as sc

    import stimpute

    monkeypatch.chdir(tmp_path)  # whatever would be written relative to here would show
    adatas = _as_user_has_them(small_stack)
    inputs = [a.copy() for a in adatas]
    result = stimpute.tl.impute(adatas, known="S1", key_added="imp", n_top=20, epochs=30)

    assert len(result) == 3 and all(a.n_vars == 20 for a in result)
    panel = list(result[0].uns["imp"]["panel"])
    for a, given, section in zip(result, inputs, small_stack):
        assert list(a.obs_names) == list(given.obs_names) and list(a.var_names) == panel
        assert {"imp", "imp_model", "imp_propagated"} <= set(a.layers)
        assert (a.layers["imp"] >= 0).all() and np.array_equal(a.X, a.layers["imp"])
        assert a.obsm["spatial_3d"].shape == (a.n_obs, 3) and "spatial" in a.uns
        np.testing.assert_allclose(a.obsm["spatial_3d"][:, 2], section.z_um)
    for a, given in zip(adatas, inputs):  # the given objects are left as they were
        assert a.n_vars == given.n_vars and "spatial_3d" not in a.obsm
    known, target = result[1], result[0]
    assert known.obs["measured"].all() and (known.obs["imp_reach"] == 1).all()
    assert not target.obs["measured"].any() and 0 <= target.obs["imp_reach"].min() < target.obs["imp_reach"].max() < 1
    assert {"imp_weight"} <= set(target.layers) and target.obs["imp_confidence"].between(-1, 1).all()
    assert target.var["imp_confidence"].shape == (20,) and target.uns["imp"]["known"] == ["S1"]
    assert target.uns["imp"]["registration"]["matrix"].shape == (3, 3)

    # accuracy against the counts the user did not give (same normalisation, panel genes)
    truth = small_stack[0].adata[:, panel].copy()
    sc.pp.normalize_total(truth, target_sum=1e4)
    sc.pp.log1p(truth)
    pcc = [np.corrcoef(target.X[:, j], truth.X.toarray()[:, j])[0, 1] for j in range(20)]
    assert np.nanmean(pcc) > 0.5

    # scanpy downstream on the imputed layer of the whole block
    block = sc.concat(result, label="section", keys=["S0", "S1", "S2"], index_unique="-")
    sc.pp.pca(block, n_comps=5, layer="imp")
    assert block.obsm["X_pca"].shape == (block.n_obs, 5)
    sc.pp.neighbors(block, use_rep="X_pca")
    assert block.obsp["connectivities"].shape == (block.n_obs, block.n_obs)

    fig = stimpute.pl.imputed(target, panel[:3], key="imp")
    assert len([ax for ax in fig.axes if ax.get_title() in panel[:3]]) == 3
    fig3d = stimpute.pl.block_3d(result, panel[0], key="imp")
    assert len(fig3d.axes[0].collections) == 3
    assert not any(tmp_path.iterdir())

    import anndata as ad  # every output is writable and reads back (uns included)
    for a in result:
        a.write_h5ad(tmp_path / "out.h5ad")
        back = ad.read_h5ad(tmp_path / "out.h5ad")
        assert np.array_equal(back.X, a.X) and back.uns["imp"]["panel"].tolist() == panel


def test_register_and_features_fill_the_given_objects(small_stack):
    import stimpute

    adatas = {s.name: a for s, a in zip(small_stack, _as_user_has_them(small_stack[:2], measured=()))}
    same = stimpute.tl.register(adatas)
    assert same is adatas
    for name, a in adatas.items():
        assert a.obsm["spatial_3d"].shape == (a.n_obs, 3)
        assert a.uns["stimpute"]["registration"]["reference"] == "S0"
    np.testing.assert_allclose(adatas["S0"].uns["stimpute"]["registration"]["matrix"], np.eye(3), atol=1e-9)
    stimpute.tl.features(adatas, key_added="X_feat")
    a = adatas["S1"]
    assert a.obsm["X_feat"].shape[0] == a.n_obs and a.obsm["X_feat"].shape[1] == 3 * a.uns["X_feat"]["dim"]


def test_hires_image_is_addressed_in_full_resolution_pixels(small_stack):
    section = small_stack[0]
    adata = section_to_anndata(section, hires_side=400)
    rebuilt = section_from_anndata(adata, "S0")
    assert rebuilt.image.size == section.image.size and rebuilt.um_per_px == section.um_per_px
    x, y = section.xy[0].astype(int)
    full = section.image.read_region(x - 40, y - 40, 80, 80, out_size=32).astype(float)
    scaled = rebuilt.image.read_region(x - 40, y - 40, 80, 80, out_size=32).astype(float)
    assert np.abs(full - scaled).mean() < 25  # the same place, at the hires copy's detail
    assert np.abs(full - np.roll(scaled, 8, axis=0)).mean() > np.abs(full - scaled).mean()


def test_image_sources_in_uns_highest_resolution_first(small_stack, tmp_path):
    section = small_stack[0]
    adata = section_to_anndata(section, hires_side=200)
    library = adata.uns["spatial"]["S0"]
    full = section.image.read_region(0, 0, *section.image.size)
    library["images"]["fullres"] = full
    assert section_from_anndata(adata, "S0").image.scale == 1.0
    del library["images"]["fullres"]
    from PIL import Image

    Image.fromarray(full).save(tmp_path / "he.png")
    library["metadata"] = {"source_image_path": str(tmp_path / "he.png")}
    assert section_from_anndata(adata, "S0").image.path == tmp_path / "he.png"
    del library["metadata"], library["images"]["hires"]
    with pytest.raises(StimputeError, match="no H&E image"):
        section_from_anndata(adata, "S0")


def test_impute_rejects_bad_input_in_one_line(small_stack):
    import stimpute

    adatas = _as_user_has_them(small_stack)
    with pytest.raises(StimputeError, match="not in the stack"):
        stimpute.tl.impute(adatas, known="C9")
    with pytest.raises(StimputeError, match="carries no measured counts"):
        stimpute.tl.impute(adatas, known="S0")
    with pytest.raises(StimputeError, match="expected an AnnData"):
        stimpute.tl.impute([adatas[0], "S1.h5ad"], known="S1")


def test_scaled_array_image_reads_like_its_source():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    half = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(full).resize((48, 32)))
    image = SectionImage(array=half, scale=0.5)
    assert image.size == (96, 64)
    assert image.read_region(10, 10, 20, 20).shape == (20, 20, 3)
    assert image.thumbnail(48)[0].shape == (32, 48, 3)
    with pytest.raises(ValueError):
        SectionImage(array=half, scale=0.0)


def test_dropped_spots_are_treated_alike_and_register_features_are_reused(small_stack, monkeypatch):
    """A zero-count spot: register and features give it a position and features (image
    only), impute drops it from the measured section (as every reader does) and reuses both."""
    import warnings

    import stimpute
    import stimpute.features.stored as stored
    import stimpute.register as register

    adatas = _as_user_has_them(small_stack)
    X = adatas[1].X.tolil()
    X[0, :] = 0
    adatas[1].X = X.tocsr()
    stimpute.tl.register(adatas)
    stimpute.tl.features(adatas)
    for a in adatas:
        assert a.obsm["spatial_3d"].shape == (a.n_obs, 3) and len(a.obsm["X_stimpute_features"]) == a.n_obs

    def refuse(*_args, **_kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(register, "register_stack", refuse)
    monkeypatch.setattr(stored, "spot_features", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = stimpute.tl.impute(adatas, known="S1", n_top=20, epochs=2, device="cpu")
    assert any("dropped 1 spot" in str(w.message) for w in caught)
    assert result[1].n_obs == adatas[1].n_obs - 1 and adatas[1].obs_names[0] not in result[1].obs_names
    assert result[0].n_obs == adatas[0].n_obs
    kept = adatas[1].obs_names.get_indexer(result[1].obs_names)
    np.testing.assert_allclose(result[1].obsm["spatial_3d"], adatas[1].obsm["spatial_3d"][kept], atol=1e-6)


def test_an_he_image_alone_gets_virtual_spots_imputed_and_written(small_stack, tmp_path):
    """An AnnData holding only an H&E image (0 obs, no spot table, no scale: the image in
    `uns["spatial"]`) gets the known section's spot lattice over its tissue, as `stimpute
    impute` lays it on an image file, with every imputed field; the result writes and reads."""
    import warnings

    import anndata as ad
    from PIL import Image
    from scipy.spatial import cKDTree

    import stimpute
    from stimpute import Stack
    from stimpute.io import read_section
    from stimpute.metrics import pearson_columns
    from stimpute.register.grid import GridOptions, place_virtual_spots

    adatas = _as_user_has_them(small_stack)
    library = adatas[2].uns["spatial"]["S2"]
    he = ad.AnnData(uns={"spatial": {"S2": {"images": library["images"],
                                            "scalefactors": {"tissue_hires_scalef": library["scalefactors"]["tissue_hires_scalef"]}}}})
    given = [adatas[0], adatas[1], he]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stimpute.tl.register(given)  # the steps before impute take it too: no spots yet, nothing to place or encode
        stimpute.tl.features(given)
        assert he.obsm["spatial_3d"].shape == (0, 3) and he.obsm["X_stimpute_features"].shape[0] == 0
        result = stimpute.tl.impute(given, known="S1", n_top=20, epochs=2, device="cpu", spot_diameter_um=40.0)
    assert any("S2: micrometres per pixel not found" in str(w.message) for w in caught)  # the others' scale, said
    out = result[2]
    assert out.n_obs >= 10 and out.n_vars == 20 and he.n_obs == 0  # the given object is not changed
    assert list(out.obs_names) == [f"{c}x{r}" for c, r in zip(out.obs["array_col"], out.obs["array_row"])]
    assert {"stimpute", "stimpute_model", "stimpute_propagated", "stimpute_weight"} <= set(out.layers)
    assert np.isfinite(out.X).all() and not out.obs["measured"].any()
    assert 0 < out.obs["stimpute_reach"].min() <= out.obs["stimpute_reach"].max() < 1
    assert out.uns["stimpute"]["spot_diameter_um"] == 40.0 and out.uns["stimpute"]["um_per_px"] == small_stack[2].um_per_px
    # the same virtual spots as `stimpute impute` lays on this image given as a file
    Image.fromarray(small_stack[2].image.read_region(0, 0, *small_stack[2].image.size)).save(tmp_path / "S2.png")
    cli = Stack([small_stack[0], small_stack[1], read_section(tmp_path / "S2.png", um_per_px=small_stack[2].um_per_px)])
    place_virtual_spots(cli, [1], GridOptions(spot_diameter_um=40.0))
    assert list(out.obs_names) == list(cli[2].adata.obs_names)
    np.testing.assert_allclose(out.obsm["spatial"], cli[2].xy, atol=0.5)  # registered on the 400 px copy: sub-pixel apart
    near = cKDTree(small_stack[2].xy).query(out.obsm["spatial"])[1]  # S2's own spots at the same place
    truth = small_stack[2].adata[:, list(out.var_names)].X.toarray()[near]
    assert np.nanmean(pearson_columns(out.X, np.log1p(truth))) > 0.3
    out.write_h5ad(tmp_path / "S2.h5ad")
    back = ad.read_h5ad(tmp_path / "S2.h5ad")
    assert np.array_equal(back.X, out.X) and list(back.obs_names) == list(out.obs_names)
    assert stimpute.pl.imputed(back, list(back.var_names[:2])) is not None
