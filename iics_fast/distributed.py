"""Scale-out helpers on torch.distributed: process-group setup from torchrun's environment,
rank queries, object broadcast, gathering of variable-length row blocks, disjoint index shards,
the sharded inter-camera distance build and sharded batch samplers.

Every helper also works without a process group (a plain `python` run): rank 0 of a world of 1,
collectives return their input. Backends: NCCL when CUDA is available (tensors handed to the
collectives must then be CUDA tensors on the rank's device), gloo otherwise (CPU tensors).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from iics_fast.similarity import condensed_row_offset, inter_camera_distance


# ----------------------------------------------------------------------------- process group


@dataclass
class DistContext:
    """What `init_from_env` set up. Usable as a context manager: leaving it destroys the process
    group if this context created it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: single process, no process group
    device: torch.device
    owns_group: bool

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        return False


def init_from_env(backend: str | None = None) -> DistContext:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT in the environment) with `backend` ("nccl" if CUDA is available else "gloo"
    when None); under NCCL the rank's GPU is LOCAL_RANK. Without those variables (or
    WORLD_SIZE=1) nothing is initialised and a single-process context is returned. Calling it
    again after the group exists just describes the group."""
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be None, 'nccl' or 'gloo', got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        be = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if be == "nccl" else torch.device("cpu")
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, be, dev, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(0, 1, 0, None, dev, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", init_method="env://", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", init_method="env://")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, dev, True)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0: the process that logs, saves checkpoints and clusters."""
    return rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op without a process group)."""
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` (any picklable object) on every rank; other ranks' `obj` is ignored."""
    if not _active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] without a process group."""
    if not _active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device() -> torch.device:
    """Where tensors handed to the collectives must live: the rank's GPU under NCCL, else CPU."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_comm_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dev = comm_device()
    if t.device.type != dev.type:
        raise ValueError(f"{name} is on {t.device} but the {dist.get_backend()} backend needs "
                         f"{dev.type} tensors: move it with .to({str(dev)!r})")


def agree(fn, *, on_main_only=False):
    """Runs `fn()` on every rank (or on rank 0 only with on_main_only=True, its result then
    broadcast) and makes a ValueError raised on any rank raise on every rank, with the first
    failing rank's message: checks of the input must stop all ranks, not leave the others
    waiting in a collective. Returns fn's result (rank 0's with on_main_only)."""
    if not _active():
        return fn()
    result, error = None, None
    if not on_main_only or is_main():
        try:
            result = fn()
        except ValueError as exc:
            error = str(exc)
    failed = [(r, e) for r, e in enumerate(all_gather_object(error)) if e is not None]
    if failed:
        r, msg = failed[0]
        raise ValueError(msg if r == rank() or on_main_only else f"(rank {r}) {msg}")
    return broadcast_object(result) if on_main_only else result


# ----------------------------------------------------------------------------- rows and shards


def shard_indices(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of 0..n-1 out of `world` shares: sizes differ by at most
    one, shares do not overlap and cover 0..n-1 in order, so concatenating per-rank results in
    rank order (what `all_gather_rows` does) restores the original order. Some shares are empty
    when n < world."""
    n, rank, world = int(n), int(rank), int(world)
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n >= 0, world >= 1 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    return range(rank * n // world, (rank + 1) * n // world)


def all_gather_rows(tensor: torch.Tensor, dst: int | None = None):
    """Concatenates every rank's (n_r, ...) block along dim 0 in rank order; the blocks may have
    different lengths n_r (zero included) but the same trailing shape and dtype. dst=None: every
    rank gets the result; dst=k: rank k gets it, the others None (point-to-point, so no rank
    holds more than its block plus, at dst, the result)."""
    _check_comm_tensor(tensor, "tensor")
    if not _active():
        return tensor
    return _gather_rows(tensor, dst)[0]


def _gather_rows(tensor, dst):
    """all_gather_rows on an active group; also returns the ranks' row counts."""
    world, me = world_size(), rank()
    if dst is not None and not 0 <= dst < world:
        raise ValueError(f"dst must be a rank in 0..{world - 1}, got {dst}")
    tensor = tensor.contiguous()
    meta = [None] * world
    dist.all_gather_object(meta, (int(tensor.shape[0]), tuple(tensor.shape[1:]), str(tensor.dtype)))
    if len({m[1:] for m in meta}) != 1:
        raise ValueError("all ranks must pass blocks of one trailing shape and dtype, got "
                         + ", ".join(f"rank {r}: {m[1]} {m[2]}" for r, m in enumerate(meta)))
    sizes = [m[0] for m in meta]
    starts = [sum(sizes[:r]) for r in range(world + 1)]
    if dst is None:
        # all_gather needs equal sizes: pad every block to the longest
        longest = max(sizes)
        padded = tensor.new_empty((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: s] for p, s in zip(parts, sizes)]), sizes
    if me != dst:
        if sizes[me]:
            dist.send(tensor, dst=dst)
        return None, sizes
    out = tensor.new_empty((starts[-1],) + tuple(tensor.shape[1:]))
    out[starts[me]:starts[me + 1]] = tensor
    for r in range(world):
        if r != me and sizes[r]:
            dist.recv(out[starts[r]:starts[r + 1]], src=r)
    return out, sizes


# ----------------------------------------------------------------------------- sharded distance


def condensed_row_splits(n: int, parts: int) -> list[int]:
    """Row split points 0 = p_0 <= p_1 <= ... <= p_parts = n of the condensed matrix of n points
    so that every part's rows hold about the same number of entries (row i holds n-1-i): p_k is
    the first row whose offset reaches k * total / parts. Parts may be empty (n < parts)."""
    n, parts = int(n), int(parts)
    if n < 0 or parts < 1:
        raise ValueError(f"need n >= 0 and parts >= 1, got n={n}, parts={parts}")
    total = n * (n - 1) // 2
    splits = [0]
    for k in range(1, parts):
        target = -(-k * total // parts)  # ceil(k * total / parts)
        # offset(i) = i(2n-i-1)/2 grows with i (up to n-1); solve offset(i) >= target, then fix
        # the floating-point estimate by stepping
        disc = max(0.0, (2 * n - 1) ** 2 - 8.0 * target)
        i = max(splits[-1], min(n, int(((2 * n - 1) - disc ** 0.5) / 2)))
        while i > splits[-1] and condensed_row_offset(n, i - 1) >= target:
            i -= 1
        while i < n and condensed_row_offset(n, i) < target:
            i += 1
        splits.append(i)
    splits.append(n)
    return splits


def sharded_inter_camera_distance(features, scores, camids, mu=0.02, *, mode="eq5", dst=0, backend="auto"):
    """The condensed inter-camera distance (SciPy pdist order, float32) built by all ranks: rank
    r computes the rows [p_r, p_{r+1}) of `condensed_row_splits(N, world)` (equal numbers of
    entries) with `similarity.inter_camera_distance(..., rows=(p_r, p_{r+1}))`, and rank `dst`
    receives every block point-to-point straight into its preallocated result. Returns the full
    vector on `dst`, None elsewhere; without a process group it is the single-process build.

    Every rank passes the same full inputs (features (N, d), scores (N, D), camids (N,), e.g.
    from `all_gather_rows`), on its communication device (CUDA under NCCL, CPU under gloo).
    Memory: one block (~N(N-1)/(2 world) float32) per rank plus a few slabs of work, and the
    N(N-1)/2 result at dst (which writes its own block into it directly). On the CPU the result
    is bitwise the single-process `inter_camera_distance` for every world size; on the GPU
    (row ranges keep the caller's order, the whole build sorts by camera) it is bitwise
    `inter_camera_distance(..., rows=(0, N))` and equal to the whole build to float32 rounding."""
    world, me = world_size(), rank()
    if not 0 <= dst < world:
        raise ValueError(f"dst must be a rank in 0..{world - 1}, got {dst}")
    n = int(camids.shape[0]) if hasattr(camids, "shape") else len(camids)
    if n < 1:
        raise ValueError("camids must hold at least one sample")
    if _active():
        ref = features if mode != "jaccard" else scores
        _check_comm_tensor(ref, "features" if mode != "jaccard" else "scores")
        seen = [None] * world
        dist.all_gather_object(seen, n)
        if len(set(seen)) != 1:
            raise ValueError(f"every rank must pass the same N samples, got N per rank = {seen}")
    splits = condensed_row_splits(n, world)
    r0, r1 = splits[me], splits[me + 1]
    if me != dst:
        block = inter_camera_distance(features, scores, camids, mu, mode=mode, backend=backend, rows=(r0, r1))
        if block.numel():
            dist.send(block, dst=dst)
        return None
    device = (features if mode != "jaccard" else scores).device
    out = torch.empty(n * (n - 1) // 2, dtype=torch.float32, device=device)
    offs = [condensed_row_offset(n, p) for p in splits]
    inter_camera_distance(features, scores, camids, mu, mode=mode, backend=backend, rows=(r0, r1),
                          out=out[offs[me]:offs[me + 1]])
    for r in range(world):
        if r != me and offs[r + 1] > offs[r]:
            dist.recv(out[offs[r]:offs[r + 1]], src=r)
    return out


# ----------------------------------------------------------------------------- samplers


def group_share(n_groups: int, rank: int, world: int) -> range:
    """The contiguous groups ceil(rank G / world) .. ceil((rank + 1) G / world) - 1 of G groups
    that rank `rank` of `world` takes (see ShardedBatchSampler, split="within")."""
    return range(-(-rank * n_groups // world), -(-(rank + 1) * n_groups // world))


def _split_units(batch, group_size):
    if len(batch) % group_size:
        raise ValueError(f"a batch of {len(batch)} items is not a whole number of groups of "
                         f"{group_size}: pass the sampler's group size (per_camera, or K of P x K)")
    return [batch[i:i + group_size] for i in range(0, len(batch), group_size)]


class ShardedBatchSampler:
    """Gives this rank its part of a batch sampler (any iterable of lists of indices, or of
    `(index, seed)` pairs: items are passed through untouched).

    split="within" (default): every global batch is cut into `world` parts of whole groups of
    `group_size` consecutive items, rank r taking groups ceil(r G / world) .. ceil((r+1) G / world) - 1
    of the G groups (contiguous, counts differ by at most one): the ranks' parts of a step are disjoint and together are exactly the
    global batch, so the global batch size and the learning rate stay those of one process.
    With the stage-1 camera sampler use group_size = per_camera (each camera's images stay on
    one rank, whose batch-norm statistics then stay per camera); with a P x K sampler use
    group_size = K (an identity's K images stay together, so in-batch positives for triplet
    losses exist on the rank). Every batch needs at least `world` groups.

    split="across": rank r takes the global batches r, r + world, r + 2 world, ...; the tail
    that does not fill all ranks is dropped so that every rank runs the same number of steps.
    Each step then processes world x the batch: by the linear scaling rule multiply the learning
    rate by `world` (with a warm-up), or keep it and accept 1/world of the steps per epoch.

    `set_epoch`, `state_dict` and `load_state_dict` are forwarded to the wrapped sampler, so a
    seeded sampler yields the same global batches on every rank."""

    def __init__(self, batch_sampler, *, split="within", group_size=1, rank=None, world=None):
        if split not in ("within", "across"):
            raise ValueError(f"split must be 'within' or 'across', got {split!r}")
        group_size = int(group_size)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.sampler = batch_sampler
        self.split = split
        self.group_size = group_size
        self.world = world_size() if world is None else int(world)
        self.rank = (dist.get_rank() if _active() else 0) if rank is None else int(rank)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need world >= 1 and 0 <= rank < world, got rank={self.rank}, world={self.world}")

    def __len__(self):
        n = len(self.sampler)
        return n if self.split == "within" else n // self.world

    def __iter__(self):
        if self.split == "across":
            it = iter(self.sampler)
            while True:
                step = []
                for _ in range(self.world):
                    try:
                        step.append(next(it))
                    except StopIteration:
                        return
                yield list(step[self.rank])
            return
        for batch in self.sampler:
            units = _split_units(list(batch), self.group_size)
            if len(units) < self.world:
                raise ValueError(f"a batch of {len(units)} groups cannot give each of {self.world} "
                                 f"ranks a share: use split='across' or a larger batch")
            share = self.share(len(units))
            yield [item for unit in units[share.start:share.stop] for item in unit]

    def share(self, n_groups: int) -> range:
        """Positions of the groups this rank gets of a batch of `n_groups` groups (split="within"):
        with the camera sampler, which cameras' chunks (hence which per-camera heads) are here."""
        return group_share(n_groups, self.rank, self.world)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


# ----------------------------------------------------------------------------- training


def sum_gradients_hook(state, bucket):
    """DDP communication hook that sums the ranks' gradients instead of averaging them
    (`ddp.register_comm_hook(None, sum_gradients_hook)`): the trainer splits one global batch
    across ranks and weights each rank's loss so that the sum is the single-process gradient."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class _GatherForLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        _check_comm_tensor(x, "x")
        out, sizes = _gather_rows(x, None)
        ctx.rows = (sum(sizes[:rank()]), sum(sizes[:rank() + 1]))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows[0]:ctx.rows[1]]


def gather_for_loss(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order, differentiable: for a loss that every
    rank computes identically over the gathered rows (the batch-hard triplet over the global
    batch), the gradient reaching this rank's rows is this rank's own copy's gradient (no
    reduction: with `sum_gradients_hook` the ranks' parameter gradients then add up to the
    single-process one). Without a process group it returns `x`."""
    if not _active():
        return x
    return _GatherForLoss.apply(x)


def _sum_over_ranks(tensors):
    """The ranks' sums of `tensors` (float32, one all-reduce for all), flattened, in order."""
    if not tensors:
        return []
    flat = torch.cat([t.float().flatten() for t in tensors])
    if _active():
        dist.all_reduce(flat)
    return list(torch.split(flat, [t.numel() for t in tensors]))


def _norm_layers(module):
    """Modules with BatchNorm-style running statistics (BatchNorm*, AIBN2d), in module order."""
    layers = [m for m in module.modules()
              if isinstance(getattr(m, "running_mean", None), torch.Tensor)
              and isinstance(getattr(m, "running_var", None), torch.Tensor)]
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
        if not (0 <= first and count >= 1 and first + count <= total):
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


@torch.no_grad()
def average_running_stats(module) -> None:
    """Replaces every norm layer's running mean and variance by their mean over the ranks. The
    exponential moving average is linear, so for ranks that started a stage from equal statistics
    this is the average of what each rank's batches alone would give (stage 2 normalises every
    rank's share of the batch on its own; this keeps the ranks' models identical for eval)."""
    if not _active():
        return
    bufs = [b for m in _norm_layers(module) for b in (m.running_mean, m.running_var)]
    for b, total in zip(bufs, _sum_over_ranks(bufs)):
        b.copy_((total / world_size()).view_as(b).to(b.dtype))


@torch.no_grad()
def broadcast_module(module, src: int) -> None:
    """Copies rank `src`'s parameters and buffers of `module` to every rank (in place)."""
    if not _active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


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
    if not _active():
        yield module
        return
    from iics_fast.models.aibn import AIBN2d

    patched = []
    for m in module.modules():
        if isinstance(m, AIBN2d):
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
            if isinstance(m, AIBN2d):
                m.sum_ranks = None
            else:
                del m.forward
