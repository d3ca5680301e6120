"""Batch-normalisation statistics over several processes: running statistics merged into what one
process would hold (stage 1: `SequentialStatsSync`; stage 2 without sync: `average_running_stats`)
and batch statistics summed over the ranks (`synced_batch_stats`, `batch_sums`), so that a batch
split across ranks is normalised as one process normalises it whole. Without a process group
these change nothing.

`grouped_batch_stats` is the other direction: one forward of several groups (stage 1's cameras)
normalised as separate forwards of each group would be.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from . import distributed as D


def _sum_over_ranks(tensors):
    """The ranks' sums of `tensors` (float32, one all-reduce for all), flattened, in order."""
    if not tensors:
        return []
    flat = torch.cat([t.float().flatten() for t in tensors])
    if D.world_size() > 1:
        dist.all_reduce(flat)
    return list(torch.split(flat, [t.numel() for t in tensors]))


def _with_running_stats(module):
    """Modules with BatchNorm-style running statistics (BatchNorm*, AIBN2d), in module order."""
    return [m for m in module.modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)]


def _norm_layers(module):
    """`_with_running_stats`, each with a momentum (what the merges over ranks assume)."""
    layers = _with_running_stats(module)
    for m in layers:
        if getattr(m, "momentum", None) is None:
            raise ValueError(f"{type(m).__name__} with momentum=None (cumulative averaging) cannot "
                             f"be merged across ranks; give it a momentum")
    return layers


class SequentialStatsSync:
    """Merges the running statistics of a step whose forwards are split across ranks into what one
    process running them all in order would hold.

    Stage 1 forwards the C cameras of a batch one after another (per-camera batch statistics);
    under DDP rank r runs the consecutive cameras [first, first + count) of the `total`. One
    process updates every norm layer's running statistic as x <- (1 - m) x + m b_c for c = 0..C-1,
    i.e. x_C = (1 - m)^C x_0 + sum_c m (1 - m)^(C-1-c) b_c. Rank r's local result is
    x_r = (1 - m)^count x_0 + d_r with d_r its part of that sum up to the factor
    (1 - m)^(C - first - count); `merge` all-reduces those weighted parts and adds (1 - m)^C x_0,
    so every rank ends with the single-process statistics (up to float rounding).
    Call `snapshot()` before the step's forwards and `merge()` after them."""

    def __init__(self, module, first: int, count: int, total: int):
        if not (first >= 0 and count >= 1 and first + count <= total):
            raise ValueError(f"need 0 <= first, count >= 1, first + count <= total; got "
                             f"first={first}, count={count}, total={total}")
        self.layers = _norm_layers(module)
        self.first, self.count, self.total = int(first), int(count), int(total)
        self.prev = None

    def snapshot(self) -> None:
        self.prev = [(m.running_mean.detach().clone(), m.running_var.detach().clone())
                     for m in self.layers]

    @torch.no_grad()
    def merge(self) -> None:
        if self.prev is None:
            raise RuntimeError("SequentialStatsSync.merge() without snapshot() before the step")
        # (1 - m, running buffer, its value before the step) of every statistic
        stats = [(1.0 - float(m.momentum), buf, x0) for m, prev in zip(self.layers, self.prev)
                 for buf, x0 in zip((m.running_mean, m.running_var), prev)]
        parts = [(buf.float() - k ** self.count * x0.float()) * k ** (self.total - self.first - self.count)
                 for k, buf, x0 in stats]
        for (k, buf, x0), part in zip(stats, _sum_over_ranks(parts)):
            buf.copy_((k ** self.total * x0.float() + part.view_as(buf)).to(buf.dtype))
        for m in self.layers:
            tracked = getattr(m, "num_batches_tracked", None)
            if isinstance(tracked, torch.Tensor):
                tracked.add_(self.total - self.count)
        self.prev = None


def _grouped_forward(m, groups, x):
    """A norm layer's forward on `groups` equal consecutive slices of the batch, each with its
    own batch statistics and running-statistics update, in order (training only)."""
    if not m.training:
        return type(m).forward(m, x)
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {groups} equal groups")
    return torch.cat([type(m).forward(m, part) for part in x.chunk(groups)])


@contextlib.contextmanager
def grouped_batch_stats(module, groups: int):
    """Inside the context every BatchNorm1d/2d and AIBN2d layer of `module` in training mode
    normalises each of `groups` equal consecutive slices of its batch with that slice's own
    statistics, and updates its running statistics slice after slice: one forward of the C
    cameras' images computes what C forwards of one camera each compute (stage 1's per-camera
    statistics), while the convolutions see the whole batch, which a CPU or GPU runs far faster
    than C small ones."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if groups == 1:
        yield module
        return
    patched = [m for m in module.modules()
               if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) or hasattr(m, "sum_ranks")]
    ids = {id(m) for m in patched}
    for m in _with_running_stats(module):  # any other would pool the groups' statistics
        if id(m) not in ids:
            raise TypeError(f"per-group statistics are implemented for BatchNorm1d/2d and AIBN2d, "
                            f"not {type(m).__name__}; use --stage1-forward per-camera")
    for m in patched:
        m.forward = functools.partial(_grouped_forward, m, groups)
    try:
        yield module
    finally:
        for m in patched:
            del m.forward


@torch.no_grad()
def average_running_stats(module) -> None:
    """Replaces every norm layer's running mean and variance by their mean over the ranks. The
    exponential moving average is linear, so for ranks that started a stage from equal statistics
    this is the average of what each rank's batches alone would give (stage 2 normalises every
    rank's share of the batch on its own; this keeps the ranks' models identical for eval)."""
    if D.world_size() == 1:
        return
    bufs = [b for m in _norm_layers(module) for b in (m.running_mean, m.running_var)]
    for b, total in zip(bufs, _sum_over_ranks(bufs)):
        b.copy_((total / D.world_size()).view_as(b).to(b.dtype))


class _SumOverRanks(torch.autograd.Function):
    """Sum over the ranks (`sum_ranks`, in place); the gradient of a sum every rank uses is the
    sum of the ranks' gradients (each rank's loss is its part of the global loss)."""

    @staticmethod
    def forward(ctx, x, sum_ranks):
        ctx.sum_ranks = sum_ranks
        y = x.clone()
        sum_ranks(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        ctx.sum_ranks(g)
        return g, None


def batch_sums(s1, s2, count, sum_ranks=None):
    """(s1, s2, count) summed over the ranks in one differentiable all-reduce (in s1's dtype):
    the `batch_sums` hook of `aibn_ref`. sum_ranks: the in-place reduction (default
    torch.distributed.all_reduce)."""
    flat = torch.cat([s1.reshape(-1), s2.reshape(-1).to(s1.dtype),
                      torch.full((1,), float(count), dtype=s1.dtype, device=s1.device)])
    flat = _SumOverRanks.apply(flat, sum_ranks or dist.all_reduce)
    n = s1.numel()
    return flat[:n].view(s1.shape), flat[n:2 * n].view(s2.shape), flat[2 * n]


def _synced_batch_norm(m, x):
    """BatchNorm{1,2}d forward with the statistics of the batch of all ranks (training only)."""
    if not m.training:
        return type(m).forward(m, x)
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    # float64 sums: var = E[x^2] - E[x]^2 would cancel badly in float32
    s1, s2, count = batch_sums(xf.sum(dims, dtype=torch.float64),
                                 (xf * xf).sum(dims, dtype=torch.float64), xf.numel() // xf.shape[1])
    mean64 = s1 / count
    mean, var = mean64.float(), (s2 / count - mean64 * mean64).clamp_min(0).float()
    with torch.no_grad():  # tensor arithmetic throughout: no host synchronisation per layer
        mom = m.momentum
        unbiased = var * (count / (count - 1).clamp_min(1)).float()
        m.running_mean.mul_(1 - mom).add_(mom * mean.to(m.running_mean.dtype))
        m.running_var.mul_(1 - mom).add_(mom * unbiased.to(m.running_var.dtype))
        m.num_batches_tracked.add_(1)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
    if m.weight is not None:
        y = y * m.weight.float().view(shape) + m.bias.float().view(shape)
    return y.to(x.dtype)


@contextlib.contextmanager
def synced_batch_stats(module):
    """Inside the context every BatchNorm1d/2d and AIBN2d layer of `module` in training mode
    normalises with the statistics of the batch of all ranks together (sums all-reduced,
    differentiably), so a batch split across ranks is normalised as one process normalises it
    whole. Works on CPU (gloo) and GPU (NCCL) alike; BatchNorm runs as plain PyTorch ops
    meanwhile, AIBN through its fused kernels on CUDA and `aibn_ref` elsewhere. Without a
    process group it changes nothing."""
    if D.world_size() == 1:
        yield module
        return
    patched = []
    for m in module.modules():
        if hasattr(m, "sum_ranks"):  # AIBN2d: its kernels take the sum over the ranks
            m.sum_ranks = dist.all_reduce
            patched.append(m)
        elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            if m.momentum is None or not m.track_running_stats:
                raise ValueError(f"{type(m).__name__} without momentum or running statistics "
                                 f"cannot be synchronised here")
            m.forward = functools.partial(_synced_batch_norm, m)
            patched.append(m)
    try:
        yield module
    finally:
        for m in patched:
            if hasattr(m, "sum_ranks"):
                m.sum_ranks = None
            else:
                del m.forward
