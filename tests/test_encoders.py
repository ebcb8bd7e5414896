"""Encoders reachable from every command, and ResNet forward passes checked against a
second, plainly written functional forward (a missing residual or a wrong stride shows)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from stimpute.cli import app
from stimpute.features.encoders import load_encoder
from stimpute.features.resnet import resnet18, resnet50
from stimpute.io import write_section
from tests.test_features import random_state

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _bn(x, w, prefix):
    return F.batch_norm(x, w[f"{prefix}.running_mean"], w[f"{prefix}.running_var"], w[f"{prefix}.weight"],
                        w[f"{prefix}.bias"], training=False, eps=1e-5)


def _block(x, w, p, stride, bottleneck, residual):
    """torchvision's BasicBlock / Bottleneck (v1.5: stride on the 3×3) from raw tensors."""
    if bottleneck:
        out = F.relu(_bn(F.conv2d(x, w[f"{p}.conv1.weight"]), w, f"{p}.bn1"))
        out = F.relu(_bn(F.conv2d(out, w[f"{p}.conv2.weight"], stride=stride, padding=1), w, f"{p}.bn2"))
        out = _bn(F.conv2d(out, w[f"{p}.conv3.weight"]), w, f"{p}.bn3")
    else:
        out = F.relu(_bn(F.conv2d(x, w[f"{p}.conv1.weight"], stride=stride, padding=1), w, f"{p}.bn1"))
        out = _bn(F.conv2d(out, w[f"{p}.conv2.weight"], padding=1), w, f"{p}.bn2")
    if f"{p}.downsample.0.weight" in w:
        x = _bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=stride), w, f"{p}.downsample.1")
    return F.relu(out + x if residual else out)


def reference_resnet(patches: np.ndarray, w: dict, layers: tuple[int, ...], bottleneck: bool,
                     residual: bool = True, stage_stride: int = 2) -> np.ndarray:
    """ResNet as in He et al. / torchvision, written out: ImageNet normalisation, 7×7/2 conv,
    BN, ReLU, 3×3/2 max pool, four stages (first block of stages 2-4 strided), global mean."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        x = F.relu(_bn(F.conv2d(x, w["conv1.weight"], stride=2, padding=3), w, "bn1"))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for stage, n in enumerate(layers, start=1):
            for b in range(n):
                stride = stage_stride if stage > 1 and b == 0 else 1
                x = _block(x, w, f"layer{stage}.{b}", stride, bottleneck, residual)
        return x.mean(dim=(2, 3)).numpy()


@pytest.mark.parametrize("name,build,layers,bottleneck", [
    ("resnet18", resnet18, (2, 2, 2, 2), False),
    ("resnet50", resnet50, (3, 4, 6, 3), True),
])
def test_resnet_forward_matches_a_plain_functional_forward(tmp_path, name, build, layers, bottleneck):
    state = random_state(build(), seed=4)
    file = tmp_path / f"{name}.pth"
    torch.save(state, file)
    patches = np.random.default_rng(0).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    features = load_encoder(name, weights=file)(patches)
    expected = reference_resnet(patches, state, layers, bottleneck)
    assert features.shape == expected.shape
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    # the comparison would catch the faults it is meant to: no residual, a wrong stride
    for fault in ({"residual": False}, {"stage_stride": 1}):
        assert not np.allclose(features, reference_resnet(patches, state, layers, bottleneck, **fault), atol=1e-3), fault


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from stimpute.datasets import synthetic_stack

    root = tmp_path_factory.mktemp("stack")
    stack = synthetic_stack(3, seed=0, n_genes=30, tissue_radius_um=180.0, image_size=600)  # ~12 spots a section: the ResNet runs on few patches
    return [str(write_section(s, root)) for s in stack]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    files = {}
    for name, build, seed in (("r18", resnet18, 1), ("r18b", resnet18, 2), ("r50", resnet50, 1)):
        files[name] = root / f"{name}.pth"
        torch.save(random_state(build(), seed=seed), files[name])
    return files


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def resnet18_cache(tmp_path_factory, folders, weight_files) -> Path:
    """`stimpute features --encoder resnet18 --weights r18.pth` of the stack: the ResNet runs
    once; each command below starts from a copy of this cache (keyed by the weights)."""
    cache = tmp_path_factory.mktemp("resnet18") / "cache"
    result = CliRunner().invoke(app, ["features", *folders, "--encoder", "resnet18", "--weights", str(weight_files["r18"]),
                                      "--out", str(cache)])
    assert result.exit_code == 0, result.output
    return cache


def test_impute_with_a_local_resnet18_weight_file(tmp_path, folders, weight_files, resnet18_cache):
    runner = CliRunner()
    args = ["impute", *folders, "--known", "S1", "--epochs", "5", "--encoder", "resnet18"]
    shutil.copytree(resnet18_cache, tmp_path / "ok" / "cache")
    result = runner.invoke(app, [*args, "--weights", str(weight_files["r18"]), "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())
    assert config["encoder"] == "resnet18" and config["weights"] == str(weight_files["r18"])
    assert len(config["weights_sha256"]) == 64


def test_predict_checks_the_encoder_the_model_was_trained_with(tmp_path, folders, weight_files, resnet18_cache):
    runner = CliRunner()
    model = tmp_path / "model"
    for out in (model, tmp_path / "c"):
        shutil.copytree(resnet18_cache, out / "cache")
    trained = runner.invoke(app, ["train", *folders[:2], "--out", str(model), "--epochs", "3",
                                  "--encoder", "resnet18", "--weights", str(weight_files["r18"])])
    assert trained.exit_code == 0, trained.output
    assert yaml.safe_load((model / "config.yaml").read_text())["encoder"] == "resnet18"
    predict = ["predict", folders[2], "--model", str(model)]
    other = runner.invoke(app, [*predict, "--out", str(tmp_path / "a"), "--encoder", "handcrafted"])
    assert other.exit_code == 2 and "trained on resnet18 features, not --encoder handcrafted" in other.output
    changed = runner.invoke(app, [*predict, "--out", str(tmp_path / "b"), "--weights", str(weight_files["r18b"])])
    assert changed.exit_code == 2 and "r18b.pth" in changed.output and "not the resnet18 weights" in changed.output
    same = runner.invoke(app, [*predict, "--out", str(tmp_path / "c")])  # the recorded weights
    assert same.exit_code == 0, same.output
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["weights_sha256"] == \
        yaml.safe_load((model / "config.yaml").read_text())["weights_sha256"]


@pytest.mark.parametrize("problem,message", [("missing", "weight file not found"),
                                             ("architecture", "weights do not fit the resnet18 architecture"),
                                             ("unreadable", "cannot read weight file")])
@pytest.mark.parametrize("command", [["benchmark", "--out", "{out}"], ["convert", "to-moest-h5", "--out", "{out}/x.h5"],
                                     ["train", "--out", "{out}"], ["impute", "--known", "S1", "--out", "{out}"],
                                     ["features", "--out", "{out}"]])
def test_every_command_takes_encoder_weights_and_refuses_a_bad_file_up_front(tmp_path, folders, weight_files, command,
                                                                             problem, message, monkeypatch):
    """A missing file, ResNet-50 weights for --encoder resnet18, or a file torch cannot read:
    one line naming the file, before any section is read or registered (nothing in --out)."""
    import stimpute.io
    import stimpute.pipeline

    weights = {"missing": tmp_path / "none.pth", "architecture": weight_files["r50"], "unreadable": tmp_path / "junk.pth"}[problem]
    (tmp_path / "junk.pth").write_bytes(b"not a weight file")
    for module, reader in ((stimpute.io, "read_stack"), (stimpute.pipeline, "read_stack"), (stimpute.io, "read_section")):
        monkeypatch.setattr(module, reader, lambda *a, **k: pytest.fail("sections read before the weights were checked"))
    args = [a.format(out=tmp_path / "out") for a in command]
    at = 2 if args[0] == "convert" else 1
    args = args[:at] + folders + args[at:] + ["--encoder", "resnet18", "--weights", str(weights)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(_error_lines(result)) == 1, result.output
    assert weights.name in result.output and message in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
