"""Every training option checked before anything is read, written or computed.

`check_config(config)` takes a resolved config (the keys of `iics_fast.train.DEFAULTS`) and
raises `ConfigError` (a ValueError) naming the option as the command line spells it, the value
given, and the fix. It checks types (a config file can hold any JSON), ranges, NaN and infinity,
choices, the device string and the dataset's option names. Facts that need the dataset (the
number of images, the smallest camera) are checked by the trainer when it loads the dataset,
which is still before any work.
"""
from __future__ import annotations

import math
import re

__all__ = ["ConfigError", "CHOICES", "check_config", "flag", "check_device"]


class ConfigError(ValueError):
    """An option value that cannot work; the message names the option and the fix."""


def flag(key: str) -> str:
    """The command-line spelling of a config key: k_inter -> --k-inter."""
    return "--" + key.replace("_", "-")


# integer options: key -> (lowest, highest or None, what it is)
_INTS = {
    "height": (1, None, "the input height in pixels"),
    "width": (1, None, "the input width in pixels"),
    "last_stride": (1, 2, "the stride of layer4 (1 as in the paper, or 2)"),
    "rounds": (1, None, "the number of training rounds"),
    "eval_every": (0, None, "rounds between evaluations (0 = never)"),
    "rerank_k1": (1, None, "the re-ranking neighbourhood k1"),
    "rerank_k2": (1, None, "the re-ranking query expansion k2"),
    "k_intra": (1, None, "clusters per camera"),
    "epochs_intra": (1, None, "stage-1 epochs per round"),
    "batch_per_camera": (1, None, "stage-1 images per camera per iteration"),
    "k_inter": (1, None, "inter-camera clusters"),
    "epochs_inter": (1, None, "stage-2 epochs per round"),
    "batch_p": (1, None, "clusters per stage-2 batch (P)"),
    "batch_k": (1, None, "images per cluster in a stage-2 batch (K)"),
    "workers": (0, None, "DataLoader workers"),
    "batch_extract": (1, None, "the feature extraction batch size"),
    "threads": (1, None, "CPU threads of torch"),
    "seed": (0, 2**63 - 1, "the seed of every random draw"),
    "sparse_k": (1, None, "the sparse round's neighbours per row"),
    "sparse_max_per_block": (1, None, "the sparse round's score entries per head at most"),
}
# real options: key -> (lowest, highest or None, highest excluded, what)
_REALS = {
    "init_alpha": (0, 1, False, "the initial AIBN mixture weight"),
    "rerank_lambda": (0, 1, False, "the re-ranking weight lambda"),
    "threshold_intra": (0, 1, True, "a quantile of the intra-camera distances "
                        "(paper: 0.0025)"),
    "lr_intra": (0, None, False, "a learning rate"),
    "lr_intra_head": (0, None, False, "a learning rate"),
    "mu": (0, None, False, "the weight of the Jaccard term of Eq. 5"),
    "mu_power": (0, None, False, "the power of the mu decay"),
    "threshold_inter": (0, 1, True, "a quantile of the inter-camera distances "
                        "(paper: 0.0017)"),
    "lr_inter": (0, None, False, "a learning rate"),
    "lr_inter_head": (0, None, False, "a learning rate"),
    "margin": (0, None, False, "the triplet margin"),
    "triplet_weight": (0, None, False, "the weight of the triplet loss"),
    "momentum": (0, 1, True, "the SGD momentum"),
    "weight_decay": (0, None, False, "the SGD weight decay"),
    "sparse_eps": (0, 1, True, "the softmax mass a head's sparse scores may drop"),
}
_OPTIONAL = {"threshold_intra", "threshold_inter", "workers", "threads", "sparse_max_per_block"}
_BOOLS = ("supervised", "sync_bn", "progress", "verbose")
_STRINGS = ("root", "pretrained", "out")  # None allowed
#: the allowed values of every choice option (the command line's choices too)
CHOICES = {"arch": ("resnet50", "resnet18"), "stages": ("both", "intra"),
           "similarity": ("cosine", "rerank"), "inter_similarity": ("eq5", "jaccard", "feature"),
           "inter_mode": ("dense", "sparse", "auto"), "amp": ("bf16", "fp16", "off"),
           "stage1_forward": ("grouped", "per-camera")}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _range_text(lo, hi, hi_open=False) -> str:
    if hi is None:
        return f">= {lo}"
    return f">= {lo} and {'<' if hi_open else '<='} {hi}"


def _example(key) -> str:
    """`; e.g. the paper's --rounds 40` where the option has a default (the paper's setting;
    a preset such as the demo's may use another)."""
    from .train import DEFAULTS

    default = DEFAULTS.get(key, (None,))[0]
    return "" if default is None else f"; e.g. the paper's {flag(key)} {default}"


def _check_int(key, value, lo, hi, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag(key)} must be an integer ({what}), got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{flag(key)} {value} is out of range: {what} must be "
                          f"{_range_text(lo, hi)}{_example(key)}")


def _check_real(key, value, lo, hi, hi_open, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag(key)} must be a number ({what}), got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{flag(key)} is {value}: {what} must be a finite number "
                          f"{_range_text(lo, hi, hi_open)}{_example(key)}")
    if value < lo or (hi is not None and (value > hi or (hi_open and value == hi))):
        raise ConfigError(f"{flag(key)} {value:g} is out of range: {what} must be "
                          f"{_range_text(lo, hi, hi_open)}{_example(key)}")


def check_device(device) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`; a CUDA device must exist here."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"--device {device!r} is not a device this trainer runs on: use auto, "
                          f"cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_input_size(height: int, width: int, last_stride: int) -> None:
    """AIBN in ResNet's layer4 takes instance statistics over its feature map, which needs at
    least two values: the stem, layer2 and layer3 halve each side (rounding up), layer4 divides
    it by --last-stride."""
    def side(n):
        for _ in range(4):
            n = -(-n // 2)
        return -(-n // last_stride)

    if side(height) * side(width) < 2:
        raise ConfigError(
            f"--height {height} --width {width} is too small: ResNet's layer4 sees a "
            f"{side(height)}x{side(width)} map, and AIBN's instance statistics need at least two "
            f"values; give at least 32 x 16 pixels"
            + (" (64 x 32 with --last-stride 2)" if last_stride == 2 else ""))


def check_config(config: dict) -> None:
    """Raise ConfigError for the first option of `config` that cannot work."""
    from . import datasets

    for key, (lo, hi, what) in _INTS.items():
        if key in config and not (key in _OPTIONAL and config[key] is None):
            _check_int(key, config[key], lo, hi, what)
    for key, (lo, hi, hi_open, what) in _REALS.items():
        if key in config and not (key in _OPTIONAL and config[key] is None):
            _check_real(key, config[key], lo, hi, hi_open, what)
    for key in _BOOLS:
        if key in config and not isinstance(config[key], bool):
            raise ConfigError(f"{flag(key)} must be true or false, got {config[key]!r}")
    for key in _STRINGS:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ConfigError(f"{flag(key)} must be a path (a string), got {config[key]!r}")
        if config.get(key) == "":
            raise ConfigError(f"{flag(key)} is empty: give a path")
    for key, allowed in CHOICES.items():
        if key in config and config[key] not in allowed:
            raise ConfigError(f"{flag(key)} must be one of {', '.join(allowed)}, "
                              f"got {config[key]!r}")
    if "rerank_k1" in config and config.get("rerank_k2", 1) > config["rerank_k1"] + 1:
        raise ConfigError(f"--rerank-k2 {config['rerank_k2']} exceeds --rerank-k1 + 1 = "
                          f"{config['rerank_k1'] + 1}: query expansion reads each sample's "
                          f"k1 + 1 nearest neighbours; lower --rerank-k2 or raise --rerank-k1")
    if "height" in config and "width" in config:
        check_input_size(config["height"], config["width"], config.get("last_stride", 1))
    if "device" in config:
        check_device(config["device"])
    if "dataset" in config:
        options = config.get("dataset_options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"--dataset-options must be a JSON object such as "
                              f"'{{\"verify\": true}}', got {options!r}")
        try:
            datasets.check_options(config["dataset"], options)
        except ValueError as exc:
            raise ConfigError(f"--dataset / --dataset-options: {exc}") from None
