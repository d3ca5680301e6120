"""BN-neck + classifier head of stage 1 (one per camera) and stage 2."""
from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """`BatchNorm1d(in_dim)` (bias frozen at 0) then `Linear(in_dim, num_classes, bias=False)`
    with weights from N(0, 0.001^2). forward(f) takes the pooled feature, returns logits."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"ClassifierHead needs in_dim >= 1 and num_classes >= 1; got {in_dim}, {num_classes}")
        self.bn = nn.BatchNorm1d(in_dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(f))


class FeatureAndLogits(nn.Module):
    """Backbone + head as one module (one DDP forward in stage 2): (pooled feature, logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor):
        f = self.backbone(x)
        return f, self.head(f)
