"""AIBN2d: the module form of Eq. 12 (adaptive mix of instance and batch statistics).

On CUDA it runs the fused Triton kernels of `iics_fast.kernels.aibn` (imported on first use);
elsewhere the plain-PyTorch `aibn_ref`. Both follow the same definition (see that module).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from iics_fast.norm_sync import batch_sums


class AIBN2d(nn.Module):
    """Adaptive instance-batch normalisation over (N, C, H, W).

    weight, bias: per-channel affine (gamma, beta); alpha: the (1,) mixing weight, clamped to
    [0, 1] when used (gradient zero outside). Pass another module's `alpha` Parameter to share
    it (one alpha per residual block); otherwise a new one starts at `init_alpha`.
    running_mean, running_var: batch-side statistics for eval, updated in training as
    running = (1 - momentum) running + momentum batch; they start at 0 and 1 as in BatchNorm2d
    (the reference starts running_var at 0; pretrained weights overwrite both either way).
    Inputs with H*W < 2 are refused: the unbiased instance variance is undefined there.
    sum_ranks: None, or an in-place sum of a tensor over the ranks of a process group
    (`iics_fast.norm_sync.synced_batch_stats` sets torch.distributed.all_reduce): in training the
    batch statistics are then those of every rank's samples together (fused kernels on CUDA,
    `aibn_ref` with `norm_sync.batch_sums` elsewhere).
    """

    def __init__(self, num_features: int, alpha: nn.Parameter | None = None, init_alpha: float = 0.1,
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if alpha is None:
            alpha = nn.Parameter(torch.full((1,), float(init_alpha)))
        elif not isinstance(alpha, nn.Parameter) or alpha.numel() != 1:
            raise TypeError("AIBN2d alpha must be a one-element nn.Parameter (another AIBN2d's .alpha) or None")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.alpha = alpha
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.sum_ranks = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"AIBN2d({self.num_features}) expects (N, {self.num_features}, H, W); got {tuple(x.shape)}")
        if x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                f"AIBN2d needs H*W >= 2 (the instance variance is unbiased, undefined for one value); got "
                f"{x.shape[2]}x{x.shape[3]}: feed a larger image (ResNet layer3/4 divide it by 16)")
        from iics_fast.kernels.aibn import aibn, aibn_ref

        args = (x, self.running_mean, self.running_var, self.weight, self.bias, self.alpha,
                self.training, self.momentum, self.eps)
        if self.training and self.sum_ranks is not None:
            if x.is_cuda:
                return aibn(*args, sum_ranks=self.sum_ranks)
            return aibn_ref(*args, batch_sums=functools.partial(batch_sums, sum_ranks=self.sum_ranks))
        return (aibn if x.is_cuda else aibn_ref)(*args)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
