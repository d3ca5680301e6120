"""Source pretraining: the weights file is a torchvision-format state dict written once and
reused, it loads as `--pretrained` does, and training on the source changes the backbone."""
import os

import pytest
import torch

from iics_fast import models, pretrain

TINY_SOURCE = {"num_ids": 6, "num_cameras": 2, "images_per_camera": [2, 3], "num_test_ids": 1,
               "num_distractors": 0, "camera_strength": 0.5, "seed": 11, "image_format": "png"}
TINY_TRAINING = {**pretrain.SOURCE_TRAINING, "epochs": 1, "batch_p": 3, "batch_k": 2}


def test_source_state_is_torchvision_format_and_trained(tmp_path):
    state = pretrain.train_source("resnet18", 32, 16, data=TINY_SOURCE, training=TINY_TRAINING,
                                  cache_dir=str(tmp_path), log=lambda *a: None)
    assert not any(k.endswith(".alpha") for k in state)  # as an ImageNet file: no AIBN alphas
    path = tmp_path / "w.pth"
    torch.save(state, path)
    torch.manual_seed(0)
    fresh = models.build_backbone("resnet18")
    loaded = models.build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])
    assert not torch.equal(fresh.conv1.weight, loaded.conv1.weight)
    # every AIBN alpha keeps its init value, as with an ImageNet file
    assert all(float(a.detach().mean()) == pytest.approx(0.1) for a in models.aibn_alphas(loaded))


def test_source_weights_written_once_under_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_train(arch, height, width, cache_dir=None, log=print, **_):
        calls.append((arch, height, width))
        return models.build_backbone(arch).state_dict()

    monkeypatch.setattr(pretrain, "train_source", fake_train)
    path = pretrain.source_weights("resnet18", 32, 16, cache_dir=str(tmp_path), log=lambda *a: 0)
    assert os.path.dirname(path) == str(tmp_path) and os.path.isfile(path)
    assert pretrain.source_weights("resnet18", 32, 16, cache_dir=str(tmp_path)) == path
    assert calls == [("resnet18", 32, 16)]  # the second call reads the cached file
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []  # no temporary left over
    # another input size or arch is another file
    assert pretrain.source_path("resnet18", 64, 32, str(tmp_path)) != path
    assert pretrain.source_path("resnet50", 32, 16, str(tmp_path)) != path


def test_source_population_is_disjoint_from_the_demo_target():
    from iics_fast import train

    target = train.PRESETS["synthetic"]["dataset_options"]
    assert pretrain.SOURCE_DATA["seed"] != target["seed"]


def test_unknown_optimizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        pretrain.train_source("resnet18", 32, 16, data=TINY_SOURCE,
                              training={**TINY_TRAINING, "optimizer": "lamb"},
                              cache_dir=str(tmp_path), log=lambda *a: None)


def test_source_precision_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """Weights trained in bf16 on one CPU are not those trained in float32 on another."""
    from iics_fast import models

    training = {**pretrain.SOURCE_TRAINING, "amp": "bf16"}
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    bf16 = pretrain.source_path("resnet18", 64, 32, str(tmp_path), training=training)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    fp32 = pretrain.source_path("resnet18", 64, 32, str(tmp_path), training=training)
    assert bf16 != fp32


def test_default_source_training_is_classification_only(tmp_path):
    """The source is trained as ImageNet weights are, by cross-entropy alone: the triplet margin
    does not reach the weights unless --triplet-weight asks for the triplet term."""
    def train(**over):
        return pretrain.train_source("resnet18", 32, 16, data=TINY_SOURCE,
                                     training={**TINY_TRAINING, **over}, cache_dir=str(tmp_path),
                                     log=lambda *a: None)

    assert pretrain.SOURCE_TRAINING["triplet_weight"] == 0
    base = train()
    assert all(torch.equal(base[k], v) for k, v in train(margin=5.0).items())
    with_triplet = train(triplet_weight=1.0, margin=5.0)
    assert not torch.equal(base["conv1.weight"], with_triplet["conv1.weight"])


def _refuse_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("trained before checking the options")

    monkeypatch.setattr(pretrain, "train_source", fail)


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch):
    _refuse_training(monkeypatch)
    with pytest.raises(ValueError, match="cannot write into"):
        pretrain.main(["--out", str(tmp_path / "nodir" / "x.pth"), "--epochs", "1"])
    with pytest.raises(ValueError, match="is a folder"):
        pretrain.main(["--out", str(tmp_path), "--epochs", "1"])


@pytest.mark.parametrize("option, value", [
    ("--epochs", "0"), ("--threads", "-1"), ("--height", "0"), ("--width", "-2"),
    ("--lr", "0"), ("--lr", "nan"), ("--triplet-weight", "-1"), ("--triplet-weight", "inf"),
    ("--camera-strength", "1.5")])
def test_bad_option_values_are_refused_before_training(tmp_path, monkeypatch, option, value):
    _refuse_training(monkeypatch)
    with pytest.raises(ValueError, match=f"^{option} .* is out of range: give "):
        pretrain.main(["--out", str(tmp_path / "x.pth"), option, value])


def test_too_small_input_is_refused_before_training(tmp_path, monkeypatch):
    _refuse_training(monkeypatch)
    with pytest.raises(ValueError, match="--height 16 --width 8 is too small: .* give at least 32 x 16"):
        pretrain.main(["--out", str(tmp_path / "x.pth"), "--height", "16", "--width", "8"])


def test_bad_option_is_a_one_line_error_with_status_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "iics_fast.pretrain", "--out",
                           str(tmp_path / "x.pth"), "--epochs", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --epochs 0 is out of range: give an integer >= 1, "
                                        "e.g. the default --epochs 24"]
