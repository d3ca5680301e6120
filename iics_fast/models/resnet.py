"""ResNet-50 / ResNet-18 backbones with AIBN in layer3 and layer4, last stride 1, global pooling.

Parameter names follow torchvision's ResNet (conv1, bn1, layer1..layer4 with conv1/bn1/...,
downsample.0/.1), so torchvision-format ImageNet state dicts load with `load_pretrained`. Every
BN of layer3 and layer4 is an `AIBN2d`; the BNs of one residual block (bn1, bn2, bn3 and the
downsample BN) share that block's alpha.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from iics_fast.models.aibn import AIBN2d


def _norm(planes: int, aibn: bool, alpha: nn.Parameter | None, init_alpha: float) -> nn.Module:
    return AIBN2d(planes, alpha=alpha, init_alpha=init_alpha) if aibn else nn.BatchNorm2d(planes)


class _Block(nn.Module):
    """Shared residual plumbing: the downsample branch and one alpha for all the block's norms."""

    expansion = 1

    def _make_downsample(self, inplanes: int, planes: int, stride: int, aibn: bool, init_alpha: float):
        out = planes * self.expansion
        if stride == 1 and inplanes == out:
            return None
        alpha = self.bn1.alpha if aibn else None
        return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                             _norm(out, aibn, alpha, init_alpha))

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, aibn: bool = False, init_alpha: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(planes, aibn, None, init_alpha)
        alpha = self.bn1.alpha if aibn else None
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _norm(planes, aibn, alpha, init_alpha)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = self._make_downsample(inplanes, planes, stride, aibn, init_alpha)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self._residual(x))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, aibn: bool = False, init_alpha: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(planes, aibn, None, init_alpha)
        alpha = self.bn1.alpha if aibn else None
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # stride here, as torchvision
        self.bn2 = _norm(planes, aibn, alpha, init_alpha)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(planes * 4, aibn, alpha, init_alpha)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = self._make_downsample(inplanes, planes, stride, aibn, init_alpha)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self._residual(x))


#: arch -> (block, blocks per layer)
ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def feature_dim(arch: str) -> int:
    """The pooled feature's width of `arch` (ResNet.out_dim), known before building one."""
    return 512 * ARCHS[arch][0].expansion


#: torchvision layouts, to name the architecture a state dict was saved from
_KNOWN = {
    ("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


class ResNet(nn.Module):
    """ResNet trunk; forward(x) returns the globally average-pooled feature (N, out_dim)."""

    def __init__(self, arch: str = "resnet50", last_stride: int = 1, init_alpha: float = 0.1):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(ARCHS)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 (re-ID default) or 2 (ImageNet ResNet); got {last_stride}")
        block, layers = ARCHS[arch]
        self.arch = arch
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1, False, init_alpha)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, False, init_alpha)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, True, init_alpha)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride, True, init_alpha)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = feature_dim(arch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride, aibn, init_alpha):
        layers = []
        for i in range(blocks):
            layers.append(block(self._inplanes, planes, stride if i == 0 else 1, aibn, init_alpha))
            self._inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.arch} expects images of shape (N, 3, H, W); got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # pooled in float32 under autocast: the feature the distances are taken on
        return torch.flatten(self.avgpool(x.float()), 1)


def _describe_arch(keys) -> str | None:
    """Name of the torchvision ResNet whose layout these state-dict keys have, if known."""
    kind = "bottleneck" if any(".conv3." in k for k in keys) else "basic"
    counts = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        counts.append(len(idx))
    return _KNOWN.get((kind, tuple(counts)), f"a {kind}-block ResNet with {counts} blocks" if any(counts) else None)


_RUN_CHECKPOINT = (" (a training checkpoint such as last.pt or best.pt? a run continues with "
                   "--resume; python -m iics_fast.extract reads its model)")


def _read_state_dict(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights not found: {path!r}; pass the path of a torchvision-format ImageNet "
            "state dict (e.g. resnet50-0676ba61.pth), or pretrained=None to start from random weights")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own text runs to paragraphs: its first line, or why
        text = str(exc).strip()
        why = text.splitlines()[0] if text else type(exc).__name__
        if "Weights only load failed" in text:
            why = "it holds Python objects besides tensors" + _RUN_CHECKPOINT
        raise ValueError(f"could not read {path!r} as a tensor state dict: {why}") from exc
    if isinstance(sd, dict) and "config" in sd and isinstance(sd.get("model"), dict):
        raise ValueError(f"{path!r} is a training run's checkpoint, not a state dict"
                         + _RUN_CHECKPOINT)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a dict of name -> tensor)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_pretrained(model: ResNet, path) -> ResNet:
    """Load a torchvision-format ResNet state dict from `path` into `model` (in place; returned).

    Strict: every key of the file must exist in the model with the same shape, and every model
    tensor must come from the file, except: the classifier `fc.*` (absent from the backbone;
    the file may have it or not), AIBN `alpha` (new: keeps its init value unless the file has
    it, as a file saved from this model does) and BN `num_batches_tracked` (older files lack it).
    AIBN modules take weight, bias and running statistics from the BN of the same name.
    """
    sd = _read_state_dict(path)
    own = model.state_dict()
    src = {k: v for k, v in sd.items()
           if not k.startswith("fc.") and not (k.endswith("num_batches_tracked") and k not in own)}
    unexpected = sorted(k for k in src if k not in own)
    mismatched = sorted(k for k in src if k in own and src[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in src and not k.endswith((".alpha", ".num_batches_tracked")))
    if unexpected or mismatched or missing:
        found = _describe_arch(list(sd))
        arch = getattr(model, "arch", type(model).__name__)
        parts = []  # one line: the command line prints it as it is
        if found is not None and found != arch:
            use = (f"use --arch {found} (arch={found!r} from Python) to use this file, or pass "
                   f"{arch} weights" if found in ARCHS else
                   f"this project builds {' and '.join(sorted(ARCHS))}: pass {arch} weights")
            parts.append(f"the file holds {found} weights but the model is {arch}: {use}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches, e.g. " + ", ".join(
                f"{k}: file {tuple(src[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]} (torchvision names expected, "
                         "like 'conv1.weight', 'layer1.0.bn1.running_mean')")
        raise ValueError(f"cannot load {path!r} into {arch}: " + "; ".join(parts))
    broken = sorted(k for k, v in src.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:  # such weights give NaN features, refused only once the training has begun
        raise ValueError(f"{path!r} holds NaN or infinite values in {len(broken)} tensors, e.g. {broken[:3]}: "
                         "the file is damaged; fetch it again")
    merged = dict(own)
    merged.update(src)
    model.load_state_dict(merged)
    return model
