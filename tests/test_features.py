"""Encoders (registry, weight layouts, errors), handcrafted descriptors and the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stimpute.errors import InputError, StimputeError
from stimpute.features import ENCODERS, FeatureRun, load_encoder, spot_features
from stimpute.features.checkpoint import load_weights
from stimpute.features.stored import check_encoder
from stimpute.features import handcrafted
from stimpute.features.handcrafted import BLOCKS, HANDCRAFTED_DIM, describe_batch, describe_patch
from stimpute.features.resnet import resnet18, resnet50
from stimpute.features.vit import VisionTransformer

from tests.test_patches import make_section, stained_image


def random_state(model: torch.nn.Module, seed: int = 1) -> dict:
    """A state dict with every tensor (BN statistics included) randomised."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in model.state_dict().items()}
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}


def assert_loaded(model: torch.nn.Module, state: dict) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name,build", [("resnet18", resnet18), ("resnet50", resnet50)])
def test_torchvision_checkpoint_loads_bit_exactly(tmp_path, name, build):
    state = random_state(build())
    dim = ENCODERS[name].dim
    file = tmp_path / f"{name}.pth"
    torch.save({**state, "fc.weight": torch.zeros(1000, dim), "fc.bias": torch.zeros(1000)}, file)
    enc = load_encoder(name, weights=file)
    assert_loaded(enc.model, state)
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format cannot be memory-mapped: read in full instead
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for weights in (file, legacy):
        check_encoder(name, weights)  # the up-front check accepts what loads
    patches = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    out = enc(patches)
    assert out.shape == (2, dim) and out.dtype == np.float32 and np.isfinite(out).all()


def test_ciga_lightning_checkpoint_layout(tmp_path):
    state = random_state(resnet18(), seed=2)
    ckpt = {"epoch": 3, "hyper_parameters": {"lr": 1e-3},
            "state_dict": {**{f"model.resnet.{k}": v for k, v in state.items()},
                           "model.resnet.fc.1.weight": torch.zeros(512, 512), "model.resnet.fc.3.weight": torch.zeros(128, 512)}}
    file = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save(ckpt, file)
    assert_loaded(load_encoder("ciga", weights=file).model, state)
    check_encoder("ciga", file)


def test_vit_timm_layout_roundtrip(tmp_path):
    tiny = dict(img_size=32, patch=16, dim=32, depth=2, heads=4)
    state = random_state(VisionTransformer(**tiny), seed=3)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
                "blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "blocks.0.mlp.fc2.bias", "norm.weight"):
        assert key in state  # timm / UNI names
    file = tmp_path / "pytorch_model.bin"
    torch.save(state, file)
    model = load_weights(VisionTransformer(**tiny), file, "uni").eval()
    assert_loaded(model, state)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_wrong_layout_names_missing_and_unexpected_keys(tmp_path):
    file = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), file)
    with pytest.raises(InputError) as err:
        load_encoder("resnet50", weights=file)
    msg = str(err.value)
    assert "r18.pth" in msg and "missing keys" in msg and "layer1.0.conv3.weight" in msg and "wrong shapes" in msg
    with pytest.raises(InputError) as early:  # the up-front check, on a model without memory (meta device)
        check_encoder("resnet50", file)
    assert str(early.value) == msg


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(StimputeError, match="--weights PATH") as err:
        load_encoder("resnet18")
    assert "download.pytorch.org" in str(err.value)
    with pytest.raises(InputError, match="not found.*MahmoodLab/UNI"):
        load_encoder("uni", weights=tmp_path / "nope.bin")
    with pytest.raises(StimputeError, match="unknown encoder"):
        load_encoder("dino")
    with pytest.raises(StimputeError, match="takes no weights"):
        load_encoder("handcrafted", weights=tmp_path / "x.pth")


def test_handcrafted_descriptors_measure_nuclei_and_colour():
    rng = np.random.default_rng(0)
    base = stained_image(rng, (224, 224)) // 2 + 127  # pale tissue
    sparse, dense = base.copy(), base.copy()
    for img, n in ((sparse, 10), (dense, 60)):
        for x, y in rng.integers(10, 214, (n, 2)):
            img[y - 3 : y + 4, x - 3 : x + 4] = (60, 30, 110)  # haematoxylin-dark nuclei
    f_sparse, f_dense = describe_patch(sparse), describe_patch(dense)
    assert f_sparse.shape == (HANDCRAFTED_DIM,) and np.isfinite(f_sparse).all()
    nuclei_per_px = BLOCKS["nuclei"].start  # density at the loose threshold
    assert f_dense[nuclei_per_px] > 3 * f_sparse[nuclei_per_px]
    batch = describe_batch(np.stack([sparse, dense])[None])
    assert batch.shape == (1, 2, HANDCRAFTED_DIM) and np.allclose(batch[0, 0], f_sparse)
    blank = describe_patch(np.full((224, 224, 3), 255, np.uint8))
    assert np.isfinite(blank).all()


def test_glcm_equals_skimage_graycomatrix_and_graycoprops():
    from skimage.feature import graycomatrix, graycoprops

    rng = np.random.default_rng(3)
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    images = [rng.integers(0, 256, (23, 31), dtype=np.uint8), rng.integers(100, 140, (40, 17), dtype=np.uint8),
              np.full((9, 9), 77, np.uint8)]  # the flat one: correlation defined as 1
    for gray in images:
        q = gray // (256 // handcrafted.GLCM_LEVELS)
        ref = graycomatrix(q, handcrafted.GLCM_DISTANCES, angles, levels=handcrafted.GLCM_LEVELS, symmetric=True, normed=True)
        mine = handcrafted.glcm(gray)
        expected = np.moveaxis(ref, (2, 3), (0, 1)).reshape(-1, handcrafted.GLCM_LEVELS, handcrafted.GLCM_LEVELS)
        np.testing.assert_allclose(mine, expected, atol=1e-15)
        props = handcrafted.glcm_props(mine)
        for name in handcrafted.GLCM_PROPS:
            np.testing.assert_allclose(props[name], graycoprops(ref, name).ravel(), rtol=1e-9, atol=1e-12)


def test_lbp_histogram_equals_a_per_pixel_count():
    rng = np.random.default_rng(4)
    gray = rng.integers(0, 4, (7, 9), dtype=np.uint8)  # few levels: many ties (>= counts as set)
    counts = np.zeros(handcrafted.LBP_POINTS + 2)
    for y in range(1, 6):
        for x in range(1, 8):
            code = sum(1 << bit for bit, (dy, dx) in enumerate(handcrafted._LBP_OFFSETS) if gray[y + dy, x + dx] >= gray[y, x])
            counts[handcrafted._LBP_LABELS[code]] += 1
    np.testing.assert_allclose(handcrafted._lbp(gray), counts / counts.sum())
    flat = handcrafted._lbp(np.full((5, 5), 9, np.uint8))
    assert flat[handcrafted.LBP_POINTS] == 1.0  # every neighbour ties: the all-ones pattern


def test_colour_and_nuclei_blocks_equal_direct_pixel_statistics():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(5)
    rgb = stained_image(rng, (64, 64))
    rgb[rng.random((64, 64)) < 0.2] = 250  # some glass
    feats = describe_patch(rgb)
    tissue = handcrafted.cv2.cvtColor(rgb, handcrafted.cv2.COLOR_RGB2GRAY) < handcrafted.TISSUE_MAX_GRAY
    sub = tissue[::2, ::2]
    od = -np.log(np.maximum(rgb[::2, ::2][sub] / 255.0, 1e-6)) / -np.log(1e-6)
    hed = rgb2hed(rgb[::2, ::2])[sub]
    colour = feats[BLOCKS["colour"]]
    expected = np.r_[od.mean(0), od.std(0), np.percentile(od, (10, 50, 90), axis=0).ravel(), hed[:, :2].mean(0)]
    np.testing.assert_allclose(colour[1:], expected, rtol=1e-4, atol=1e-6)
    haem = np.maximum(rgb2hed(rgb)[..., 0], 0).astype(np.float32)
    h = handcrafted.cv2.GaussianBlur(haem, (0, 0), 1.0)
    mask = (h > handcrafted.NUCLEUS_H_OD[0]) & tissue
    nuclei = feats[BLOCKS["nuclei"]]
    assert nuclei[1] == pytest.approx(mask.sum() / tissue.sum(), rel=1e-5)  # nuclear fraction of tissue
    assert nuclei[6] == pytest.approx(h[mask].mean(), rel=1e-4)  # mean haematoxylin of the blobs


def test_dog_pyramid_bands_follow_full_resolution_blurs():
    """The pyramid's band energies stay within a few per cent of full-resolution Gaussian
    blurs, and are deterministic."""
    rng = np.random.default_rng(6)
    gray = handcrafted.cv2.cvtColor(stained_image(rng, (224, 224)), handcrafted.cv2.COLOR_RGB2GRAY)
    g = gray.astype(np.float32)
    blurred = [g] + [handcrafted.cv2.GaussianBlur(g, (0, 0), s) for s in handcrafted.DOG_SIGMAS]
    full = np.array([np.abs(a - b).mean() for a, b in zip(blurred[:-1], blurred[1:])])
    bands = handcrafted._dog(gray)
    assert bands.shape == (len(handcrafted.DOG_SIGMAS),)
    np.testing.assert_allclose(bands, full, rtol=0.05)
    assert np.array_equal(bands, handcrafted._dog(gray.copy()))


def tiny_section(seed: int = 0):
    rng = np.random.default_rng(seed)
    img = stained_image(rng, (200, 200))
    xy = rng.uniform(20, 180, (6, 2))
    return make_section(img, xy, um_per_px=0.686 * 4)  # scales become 56/128/256 px


def test_spot_features_cache_hit_miss_and_atomic(tmp_path):
    section = tiny_section()
    runs: list[FeatureRun] = []
    first = spot_features(section, cache_dir=tmp_path, runs=runs)
    assert first.shape == (6, 3, HANDCRAFTED_DIM) and first.dtype == np.float32
    again = spot_features(section, cache_dir=tmp_path, runs=runs)
    assert runs[0].cached is False and runs[1].cached is True and np.array_equal(first, again)
    net = spot_features(section, "resnet18", random_init=True, cache_dir=tmp_path, batch_size=4, runs=runs)
    assert net.shape == (6, 3, 512) and not runs[2].cached
    assert spot_features(section, cache_dir=tmp_path, runs=runs) is not None and runs[3].cached  # group kept
    section.adata.obsm["spatial"] = section.xy + 5.0  # spots moved: stale
    moved = spot_features(section, cache_dir=tmp_path, runs=runs)
    assert not runs[4].cached and not np.array_equal(moved, first)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["S.features.h5"]  # no temp files left


def test_stain_normalisation_changes_the_cache_key(tmp_path):
    section = tiny_section(1)
    runs: list[FeatureRun] = []
    plain = spot_features(section, cache_dir=tmp_path, runs=runs)
    normed = spot_features(section, cache_dir=tmp_path, stain_normalize=True, runs=runs)
    assert not runs[1].cached and not np.array_equal(plain, normed)


@pytest.mark.her2st
def test_her2st_handcrafted_features(her2st_root, tmp_path):
    from stimpute.io import read_section

    from dataclasses import replace

    full = read_section(her2st_root / "C3")
    section = replace(full, adata=full.adata[::6].copy())  # 30 spots spread over the section
    feats = spot_features(section, cache_dir=tmp_path)
    assert feats.shape == (30, 3, HANDCRAFTED_DIM) and np.isfinite(feats).all()
    assert (feats.std(axis=0) > 0).mean() > 0.9  # descriptors vary across spots


def test_cli_features_computes_then_reads_cache(tmp_path):
    from typer.testing import CliRunner

    from stimpute.cli import app
    from tests.helpers import write_her2st_folder

    folder = write_her2st_folder(tmp_path / "X1", n_side=3)
    runner = CliRunner()
    first = runner.invoke(app, ["features", str(folder), "--out", str(tmp_path / "cache")])
    assert first.exit_code == 0, first.output
    assert "computed" in first.output and (tmp_path / "cache" / "X1.features.h5").is_file()
    second = runner.invoke(app, ["features", str(folder), "--out", str(tmp_path / "cache")])
    assert second.exit_code == 0 and "read from cache" in second.output
    refused = runner.invoke(app, ["features", str(folder), "--out", str(tmp_path / "c2"), "--encoder", "resnet18"])
    assert refused.exit_code == 2 and "--weights" in refused.output


def test_read_ahead_keeps_order_passes_errors_and_stops_early():
    from stimpute.features import read_ahead

    assert list(read_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad tile")

    with pytest.raises(ValueError, match="bad tile"):
        list(read_ahead(failing()))
    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    for item in read_ahead(counting(), depth=2):
        if item == 3:
            break
    assert len(produced) < 10  # the reader thread stopped instead of running to the end


def test_handcrafted_worker_processes_match_in_process():
    rng = np.random.default_rng(1)
    patches = np.stack([stained_image(rng, (64, 64)) for _ in range(6)])
    assert np.array_equal(describe_batch(patches, workers=2), describe_batch(patches, workers=1))


def test_lightning_prediction_gives_the_features_of_the_local_path(encoder="resnet18"):
    """`Trainer.predict` over `SpotWindows` (what several processes share,
    `stimpute.features.parallel`), run here in one process, equals the local path."""
    from stimpute.features.encoders import get_spec
    from stimpute.features.parallel import shared_features
    from stimpute.patches import SpotWindows
    from stimpute.trainer import quiet_trainer

    section = tiny_section(2)
    local = spot_features(section, encoder, random_init=True, batch_size=4)
    done = []
    feats, shares = shared_features(SpotWindows(section, raster_order=True), get_spec(encoder), None, True,
                                    quiet_trainer(1), batch_size=4, key="k", advance=done.append)
    assert shares == [6] and sum(done) == 6 * 3
    np.testing.assert_allclose(feats, local, rtol=1e-5, atol=1e-6)


def test_shares_are_placed_by_spot_index_counted_once_and_must_cover_every_spot():
    from stimpute.features.parallel import assemble

    values = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    index = np.array([3, 1, 4, 0, 2])
    feats, counts = assemble([(index[::2], values[index[::2]]), (index[1::2], values[index[1::2]]),
                              (np.array([4, 4]), values[[4, 4]])], 5, 2, 3)  # a padded share repeats spots
    assert np.array_equal(feats, values) and counts == [3, 2, 0]
    with pytest.raises(RuntimeError, match="1 of 5 spots were encoded by no process"):
        assemble([(index[:4], values[index[:4]])], 5, 2, 3)


def test_only_several_command_processes_or_a_gpu_network_encode_through_lightning():
    from stimpute.features import _prediction_trainer
    from stimpute.features.encoders import get_spec

    handcrafted_spec, network = get_spec("handcrafted"), get_spec("resnet18")
    cpu = {"accelerator": "cpu", "num_nodes": 1}
    assert _prediction_trainer(None, network, 10) is None
    assert _prediction_trainer({**cpu, "devices": 1, "strategy": "auto"}, network, 10) is None
    ddp = _prediction_trainer({**cpu, "devices": 2, "strategy": "ddp"}, network, 10)
    assert ddp is not None and ddp.num_devices == 2
    assert _prediction_trainer({**cpu, "devices": 2, "strategy": "ddp"}, network, 1) is None  # fewer spots than processes
    assert _prediction_trainer({**cpu, "devices": 2, "strategy": "ddp_spawn"}, network, 10) is None  # workers spawned
    assert _prediction_trainer({**cpu, "devices": 2, "strategy": "ddp"}, handcrafted_spec, 10) is None  # one pass, each process
