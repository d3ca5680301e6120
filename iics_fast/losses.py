"""The stage-2 metric loss: batch-hard triplet (Hermans et al., 2017) on Euclidean distances."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over the batch of relu(hardest positive - hardest negative + margin)."""
    x = features.float()
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()
