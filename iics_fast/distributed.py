"""Process groups and collectives on torch.distributed: set-up from torchrun's environment, rank
queries, object broadcast and gather, gathering of variable-length row blocks, disjoint index
shards, summed-gradient DDP hook and a differentiable gather for losses over the whole batch.

Every helper also works without a process group (a plain `python` run): rank 0 of a world of 1,
collectives return their input. Backends: NCCL when CUDA is available (tensors handed to the
collectives must then be CUDA tensors on the rank's device), gloo otherwise (CPU tensors).
What is built on these lives with its subject: the sharded distance in `similarity`, the
sharded batch sampler in `data.samplers`, the normalisation statistics in `norm_sync`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def __exit__(self, exc_type, *exc):
        if self.owns_group and dist.is_initialized():
            if exc_type is None:
                # every rank done before any tears its transport down: a rank that destroys the
                # group (rank 0 hosts the store) while another still talks to it can abort
                dist.barrier()
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


def check_comm_tensor(t, name):
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
    check_comm_tensor(tensor, "tensor")
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
        check_comm_tensor(x, "x")
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


@torch.no_grad()
def broadcast_module(module, src: int) -> None:
    """Copies rank `src`'s parameters and buffers of `module` to every rank (in place)."""
    if not _active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)
