"""Models: ResNet backbones with AIBN (layer3, layer4), the BN-neck classifier head, helpers.

    build_backbone(arch="resnet50", pretrained=None, init_alpha=0.1, last_stride=1)  # .out_dim
    feature_dim(arch)                      # that .out_dim, without building the model
    ClassifierHead(in_dim, num_classes)    # BatchNorm1d (bias frozen at 0) -> Linear, no bias
    FeatureAndLogits(backbone, head)       # forward(x) -> (pooled feature, logits)
    aibn_alphas(model)                     # distinct AIBN alphas (9 for ResNet-50, 4 for ResNet-18)
    load_pretrained(model, path)           # torchvision-format ImageNet state dict
    amp_dtype(amp, device)                 # the autocast dtype of --amp on that device, or None
    autocast(dtype, device)                # autocast to that dtype on that device (None: none)
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from iics_fast.models.aibn import AIBN2d
from iics_fast.models.heads import ClassifierHead, FeatureAndLogits
from iics_fast.models.resnet import ARCHS, ResNet, feature_dim, load_pretrained

__all__ = ["AIBN2d", "ClassifierHead", "FeatureAndLogits", "ResNet", "build_backbone", "feature_dim",
           "aibn_alphas", "load_pretrained", "amp_dtype", "autocast"]


def build_backbone(arch: str = "resnet50", pretrained=None, init_alpha: float = 0.1, last_stride: int = 1) -> ResNet:
    """ResNet `arch` ("resnet50" | "resnet18") with AIBN in layer3/layer4; forward(x) gives the
    pooled (N, out_dim) feature. `pretrained`: path of a torchvision-format state dict, or None."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(ARCHS)}")
    model = ResNet(arch, last_stride=last_stride, init_alpha=init_alpha)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def aibn_alphas(model: nn.Module) -> list[nn.Parameter]:
    """The distinct alpha Parameters of the model's AIBN2d modules, in module order."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, AIBN2d) and id(m.alpha) not in seen:
            seen.add(id(m.alpha))
            out.append(m.alpha)
    return out


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network runs in under autocast for `--amp` ("bf16" | "fp16" | "off") on
    `device`, None for float32. On a CPU only bf16 applies, and only where oneDNN computes it
    natively through AVX-512 BF16 without AMX (`cpu_has_native_bf16`: about 1.7x a float32
    ResNet-18 step there); elsewhere float32."""
    if amp == "off":
        return None
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if amp == "fp16":
        raise ValueError("--amp fp16 needs a CUDA device (its loss scaling is CUDA's); on a CPU use "
                         "--amp bf16 or --amp off")
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The autocast context for `amp_dtype`'s answer on `device`: none for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU, and soundly: on CPUs with AMX
    its bf16 convolutions of small feature maps (torch 2.13: a 3x3 stride-2 convolution of a 4x2
    map) give other values on every call, NaN at times, and a ResNet-18 step there measured no
    faster than float32 (2.0 s against 1.9 s); so AMX CPUs keep float32."""
    from .._native import cpu_info

    return (bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and "amx_bf16" not in cpu_info()["flags"])
