"""iics_fast.distributed: two gloo processes (torch.multiprocessing spawn, one launch for the
whole module) check the collectives and the sharded distance build against the single-process
build; the pure pieces (splits, shards, samplers) are checked in-process for many world sizes.
Row ranges of the distance itself (`inter_camera_distance(..., rows=)`) are tested in
tests/test_pairwise.py."""
import faulthandler
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.probes import free_port
from iics_fast import condensed, norm_sync as N
from iics_fast import distributed as D
from iics_fast.data import samplers
from iics_fast.similarity import inter_camera_distance, sharded_inter_camera_distance

WORLD = 2
# (n, feature dims, score dims, cameras, mode, dst): N below, at and above the world size, N not
# divisible by it, one camera, unsorted cameras (drawn at random)
DIST_CASES = [
    (1, 8, 5, 1, "eq5", 0),
    (2, 8, 5, 2, "eq5", 1),
    (3, 8, 5, 2, "eq5", 0),
    (7, 16, 9, 3, "feature", 1),
    (50, 16, 9, 4, "jaccard", 0),
    (301, 40, 30, 6, "eq5", 1),
    (129, 24, 12, 1, "eq5", 0),
]
GATHER_LENGTHS = [(3, 0), (0, 5), (2, 7), (0, 0)]
GRAD_ROWS = 8  # rank 0 takes 3 rows, rank 1 the other 5
STATS_CAMERAS = 3


def _problem(n, d, big_d, cams, seed):
    rng = np.random.default_rng(seed)
    f = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    s = torch.from_numpy(rng.random((n, big_d)).astype(np.float32))
    c = torch.from_numpy(rng.integers(0, cams, n))  # unsorted camera ids
    return f, s, c


def _block(r, length):
    return torch.arange(length * 3, dtype=torch.float32).reshape(length, 3) + 1000 * r


class _ListSampler:
    """A batch sampler stand-in with the epoch interface of the trainer's samplers."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter([[x + 1000 * self.epoch for x in b] for b in self.batches])


def _fail_on(rank_to_fail):
    def check():
        if D.rank() == rank_to_fail:
            raise ValueError(f"bad input on rank {rank_to_fail}")
        return f"ok from {D.rank()}"
    return check


def _tiny_net():
    """Conv + BatchNorm2d + AIBN2d + a linear head: norm layers with running statistics."""
    from iics_fast.models import AIBN2d
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), AIBN2d(4),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))


def _camera_chunks(step):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(3 + c, 3, 6, 6, generator=g) * (c + 1) + c for c in range(STATS_CAMERAS)]


def _patched_norms(module):
    """Names of the norm layers synced_batch_stats has switched to whole-batch statistics."""
    return sorted({type(m).__name__ for m in module.modules()
                   if "forward" in vars(m) or getattr(m, "sum_ranks", None) is not None})


def _synced_batch():
    g = torch.Generator().manual_seed(4)
    return torch.randn(GRAD_ROWS, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 5, (GRAD_ROWS,), generator=g)


def _aibn_problem():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(GRAD_ROWS, 4, 3, 5, generator=g) * 1.5 + 0.5
    coef = torch.randn(GRAD_ROWS, 4, 3, 5, generator=g)
    params = (torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g), torch.tensor([0.3]))
    return x, coef, params


def _training_helpers(r, res):
    """The stage helpers of the trainer: agree, gather_for_loss with sum_gradients_hook, the
    per-camera statistics merge, averaging of statistics and broadcast of a module."""
    for who in (0, 1):
        try:
            D.agree(_fail_on(who))
            res[("agree", who)] = None
        except ValueError as e:
            res[("agree", who)] = str(e)
    res["agree_ok"] = D.agree(lambda: f"ok from {D.rank()}")
    res["agree_main"] = D.agree(lambda: f"ok from {D.rank()}", on_main_only=True)

    # a global batch of GRAD_ROWS rows split unevenly; loss = mean squared output (weighted by
    # the rank's share) + a loss over the gathered rows
    torch.manual_seed(1)
    net = torch.nn.Linear(4, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    ddp.register_comm_hook(None, D.sum_gradients_hook)
    x = torch.randn(GRAD_ROWS, 4, generator=torch.Generator().manual_seed(2))
    part = x[:3] if r == 0 else x[3:]
    out = ddp(part)
    gathered = D.gather_for_loss(out)
    res["gathered"] = gathered.detach()
    loss = (out ** 2).mean() * len(part) / GRAD_ROWS + gathered.max(0).values.sum()
    loss.backward()
    res["grads"] = [p.grad.clone() for p in net.parameters()]

    # stage-1 statistics: rank 0 runs cameras [0, 2), rank 1 camera 2, two steps
    model = _tiny_net()
    first, count = (0, 2) if r == 0 else (2, 1)
    sync = N.SequentialStatsSync(model, first, count, STATS_CAMERAS)
    model.train()
    for step in range(2):
        sync.snapshot()
        for x in _camera_chunks(step)[first:first + count]:
            model(x)
        sync.merge()
    res["stats"] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    # the same with a rank's cameras in one grouped forward (equal chunks: 3 rows a camera)
    model = _tiny_net()
    sync = N.SequentialStatsSync(model, first, count, STATS_CAMERAS)
    model.train()
    for step in range(2):
        sync.snapshot()
        with N.grouped_batch_stats(model, count):
            model(torch.cat([x[:3] for x in _camera_chunks(step)[first:first + count]]))
        sync.merge()
    res["stats_grouped"] = {k: v.clone() for k, v in model.state_dict().items()
                            if "running" in k or "tracked" in k}

    # stage 2: a batch split 3 + 5 across the ranks, normalised as one batch
    net = _tiny_net()
    both = torch.nn.Sequential(net, torch.nn.BatchNorm1d(5))
    ddp = torch.nn.parallel.DistributedDataParallel(both)
    ddp.register_comm_hook(None, D.sum_gradients_hook)
    x, y = _synced_batch()
    mine = slice(0, 3) if r == 0 else slice(3, GRAD_ROWS)
    with N.synced_batch_stats(both):
        res["synced_patched"] = _patched_norms(both)
        out = ddp(x[mine])
        loss = torch.nn.functional.cross_entropy(out, y[mine]) * len(y[mine]) / GRAD_ROWS
        loss = loss + D.gather_for_loss(out).square().mean()
        loss.backward()
    res["synced_out"] = out.detach()
    res["synced_grads"] = {k: p.grad.clone() for k, p in both.named_parameters()}
    res["synced_stats"] = {k: v.clone() for k, v in both.state_dict().items() if "running" in k}
    res["synced_restored"] = _patched_norms(both)

    # the fused AIBN kernels (Triton interpreter here) on a batch split 3 + 5
    from iics_fast.kernels.aibn import aibn
    x, coef, params = _aibn_problem()
    xp = x[mine].clone().requires_grad_()
    w, b, a = (p.clone().requires_grad_() for p in params)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = aibn(xp, rm, rv, w, b, a, True, 0.1, 1e-5, sum_ranks=torch.distributed.all_reduce)
    (y * coef[mine]).sum().backward()
    res["aibn_fused"] = {"y": y.detach(), "dx": xp.grad, "dweight": w.grad, "dbias": b.grad,
                         "dalpha": a.grad, "running_mean": rm, "running_var": rv}

    other = _tiny_net()
    with torch.no_grad():
        for m in other.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.fill_(r)
                m.running_var.fill_(2 + 2 * r)
    N.average_running_stats(other)
    res["averaged"] = {k: v.clone() for k, v in other.state_dict().items() if "running" in k}
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(10 + r)
    D.broadcast_module(other, src=1)
    res["broadcast"] = [p.clone() for p in other.parameters()]


def _worker(r, port, outdir):
    # a crash (a signal, e.g. an abort inside the transport) leaves each thread's Python stack here
    with open(os.path.join(outdir, f"fault{r}.txt"), "w") as fault:
        faulthandler.enable(fault, all_threads=True)
        try:
            _work(r, port, outdir)
        finally:
            faulthandler.disable()


def _work(r, port, outdir):
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = {}
    with D.init_from_env() as ctx:
        res["ctx"] = (ctx.rank, ctx.world_size, ctx.backend, D.rank(), D.world_size(), D.is_main())
        res["bcast"] = D.broadcast_object({"from": D.rank(), "payload": [1, "x"]} if r == 0 else None)
        res["bcast_src1"] = D.broadcast_object(("rank", r), src=1)
        for lens in GATHER_LENGTHS:
            blk = _block(r, lens[r])
            res[("gather", lens, None)] = D.all_gather_rows(blk)
            res[("gather", lens, 1)] = D.all_gather_rows(blk, dst=1)
        res["gather_int"] = D.all_gather_rows(torch.full((r + 1,), r, dtype=torch.int64))
        try:
            D.all_gather_rows(torch.zeros(2, 3 + r))
            res["gather_mismatch"] = None
        except ValueError as e:
            res["gather_mismatch"] = str(e)
        for n in (0, 1, 2, 5, 10):
            idx = D.shard_indices(n, D.rank(), D.world_size())
            res[("shard", n)] = D.all_gather_rows(torch.tensor(list(idx), dtype=torch.int64))
        for case in DIST_CASES:
            n, d, big_d, cams, mode, dst = case
            f, s, c = _problem(n, d, big_d, cams, seed=n)
            res[("dist", case)] = sharded_inter_camera_distance(f, s, c, 0.3, mode=mode, dst=dst)
        D.barrier()
        sampler = samplers.ShardedBatchSampler(_ListSampler([list(range(8)), list(range(8, 16))]), group_size=2)
        sampler.set_epoch(1)
        res["sampler"] = list(sampler)
        _training_helpers(r, res)
    res["after"] = (D.rank(), D.world_size())
    torch.save(res, os.path.join(outdir, f"rank{r}.pt"))


class _KilledBySignal(RuntimeError):
    pass


def _launch(outdir):
    """One launch of the module's two processes; a process killed by a signal raises
    _KilledBySignal with each rank's Python stacks at the crash (any other failure as it is)."""
    try:
        mp.spawn(_worker, args=(free_port(), outdir), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code is None or e.exit_code >= 0:
            raise
        stacks = ""
        for r in range(WORLD):
            path = os.path.join(outdir, f"fault{r}.txt")
            if os.path.exists(path):  # absent if the rank died before its first line
                with open(path) as fh:
                    stacks += f"--- rank {r}\n{fh.read()}"
        raise _KilledBySignal(f"{e}\n{stacks}") from e


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The ranks' results. A launch whose process is killed by a signal (seen once, an abort with
    no Python error, on a fresh CI machine) runs once more on a fresh port, with the first crash's
    stacks as a warning; a second such crash, or any other failure, fails every test of the
    module."""
    outdir = str(tmp_path_factory.mktemp("dist"))
    try:
        _launch(outdir)
    except _KilledBySignal as first:
        warnings.warn(f"two-process launch crashed, launched again: {first}", stacklevel=1)
        outdir = str(tmp_path_factory.mktemp("dist"))
        _launch(outdir)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_init_rank_and_teardown(spawned):
    for r, res in enumerate(spawned):
        assert res["ctx"] == (r, WORLD, "gloo", r, WORLD, r == 0)
        assert res["after"] == (0, 1)  # the context destroyed its group


@pytest.mark.slow
def test_broadcast_object(spawned):
    for res in spawned:
        assert res["bcast"] == {"from": 0, "payload": [1, "x"]}
        assert res["bcast_src1"] == ("rank", 1)


@pytest.mark.slow
@pytest.mark.parametrize("lens", GATHER_LENGTHS)
def test_all_gather_rows_unequal_lengths(spawned, lens):
    expect = torch.cat([_block(r, lens[r]) for r in range(WORLD)])
    for r, res in enumerate(spawned):
        got = res[("gather", lens, None)]
        assert got.shape == (sum(lens), 3) and torch.equal(got, expect)
        to1 = res[("gather", lens, 1)]
        assert (to1 is None) if r != 1 else torch.equal(to1, expect)


@pytest.mark.slow
def test_all_gather_rows_dtype_and_mismatch(spawned):
    for res in spawned:
        assert torch.equal(res["gather_int"], torch.tensor([0, 1, 1]))
        assert res["gather_mismatch"] is not None and "trailing shape" in res["gather_mismatch"]


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 2, 5, 10])
def test_shards_reassemble_in_order(spawned, n):
    for res in spawned:
        assert torch.equal(res[("shard", n)], torch.arange(n))


@pytest.mark.slow
@pytest.mark.parametrize("case", DIST_CASES, ids=lambda c: f"n{c[0]}-{c[4]}-dst{c[5]}")
def test_sharded_distance_equals_single_process(spawned, case):
    n, d, big_d, cams, mode, dst = case
    f, s, c = _problem(n, d, big_d, cams, seed=n)
    full = inter_camera_distance(f, s, c, 0.3, mode=mode, backend="cpu")
    for r, res in enumerate(spawned):
        got = res[("dist", case)]
        if r != dst:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.shape == (n * (n - 1) // 2,)
        assert torch.equal(got, full)


@pytest.mark.slow
def test_sampler_uses_process_group_rank(spawned):
    # global batches [0..7], [8..15] shifted by epoch 1; groups of 2 split 2 + 2 per rank
    assert spawned[0]["sampler"] == [[1000, 1001, 1002, 1003], [1008, 1009, 1010, 1011]]
    assert spawned[1]["sampler"] == [[1004, 1005, 1006, 1007], [1012, 1013, 1014, 1015]]


@pytest.mark.slow
def test_agree_stops_every_rank_with_the_failing_ranks_message(spawned):
    for who in (0, 1):
        msgs = [res[("agree", who)] for res in spawned]
        assert all(m is not None and f"bad input on rank {who}" in m for m in msgs)
        assert msgs[1 - who].startswith(f"(rank {who})")  # the other rank names the culprit
    assert [res["agree_ok"] for res in spawned] == ["ok from 0", "ok from 1"]
    assert [res["agree_main"] for res in spawned] == ["ok from 0", "ok from 0"]


@pytest.mark.slow
def test_split_batch_gradients_equal_the_single_process_gradient(spawned):
    torch.manual_seed(1)
    net = torch.nn.Linear(4, 3)
    x = torch.randn(GRAD_ROWS, 4, generator=torch.Generator().manual_seed(2))
    out = net(x)
    ((out ** 2).mean() + out.max(0).values.sum()).backward()
    for res in spawned:
        assert torch.equal(res["gathered"], out.detach())
        for got, want in zip(res["grads"], [p.grad for p in net.parameters()]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_per_camera_statistics_merge_equals_sequential_forwards(spawned):
    model = _tiny_net()
    model.train()
    for step in range(2):
        for x in _camera_chunks(step):  # one process: every camera in order
            model(x)
    want = {k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    assert want["1.num_batches_tracked"] == 2 * STATS_CAMERAS
    model = _tiny_net()  # the grouped forwards' reference: 3 rows a camera, one at a time
    model.train()
    for step in range(2):
        for x in _camera_chunks(step):
            model(x[:3])
    want_grouped = {k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    for res in spawned:
        for key, expected in (("stats", want), ("stats_grouped", want_grouped)):
            assert res[key].keys() == expected.keys()
            for k, v in expected.items():
                torch.testing.assert_close(res[key][k], v, rtol=1e-5, atol=1e-6)
    # the merge is not a no-op: rank 0's own cameras alone give other statistics
    alone = _tiny_net()
    alone.train()
    for step in range(2):
        for x in _camera_chunks(step)[:2]:
            alone(x)
    assert not torch.allclose(alone.state_dict()["2.running_var"], want["2.running_var"], rtol=1e-3)


@pytest.mark.slow
def test_synced_batch_statistics_equal_one_process_on_the_whole_batch(spawned):
    net = _tiny_net()
    both = torch.nn.Sequential(net, torch.nn.BatchNorm1d(5))
    x, y = _synced_batch()
    out = both(x)
    (torch.nn.functional.cross_entropy(out, y) + out.square().mean()).backward()
    grads = {k: p.grad for k, p in both.named_parameters()}
    stats = {k: v for k, v in both.state_dict().items() if "running" in k}
    for r, res in enumerate(spawned):
        mine = slice(0, 3) if r == 0 else slice(3, GRAD_ROWS)
        torch.testing.assert_close(res["synced_out"], out.detach()[mine], rtol=1e-5, atol=1e-6)
        # float32 rounding: errors relative to the largest gradient (some true gradients are
        # ~0, e.g. a bias right before a normalisation)
        scale = max(float(v.abs().max()) for v in grads.values())
        for k, v in grads.items():
            torch.testing.assert_close(res["synced_grads"][k], v, rtol=1e-5, atol=2e-6 * scale, msg=k)
        for k, v in stats.items():
            torch.testing.assert_close(res["synced_stats"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert res["synced_patched"] == ["AIBN2d", "BatchNorm1d", "BatchNorm2d"]
        assert res["synced_restored"] == []  # the layers are plain again after the context


@pytest.mark.slow
def test_fused_aibn_over_ranks_equals_one_process_on_the_whole_batch(spawned):
    from iics_fast.kernels.aibn import aibn_ref
    x, coef, params = _aibn_problem()
    x = x.clone().requires_grad_()
    w, b, a = (p.clone().requires_grad_() for p in params)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = aibn_ref(x, rm, rv, w, b, a, True, 0.1, 1e-5)
    (y * coef).sum().backward()
    got = [res["aibn_fused"] for res in spawned]
    for r, part in enumerate(got):
        mine = slice(0, 3) if r == 0 else slice(3, GRAD_ROWS)
        torch.testing.assert_close(part["y"], y.detach()[mine], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part["dx"], x.grad[mine], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(part["running_mean"], rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part["running_var"], rv, rtol=1e-5, atol=1e-6)
    # each rank's parameter gradients are its part: DDP sums them
    for key, want in (("dweight", w.grad), ("dbias", b.grad), ("dalpha", a.grad)):
        torch.testing.assert_close(got[0][key] + got[1][key], want, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_average_statistics_and_broadcast_module(spawned):
    for res in spawned:
        for k, v in res["averaged"].items():
            assert torch.all(v == (0.5 if k.endswith("mean") else 3.0)), k
        assert all(torch.all(p == 11) for p in res["broadcast"])


# ----------------------------------------------------------------------------- in-process


def test_single_process_fallbacks():
    ctx = D.init_from_env()  # no torchrun variables under pytest
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.owns_group) == (0, 1, None, False)
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    D.barrier()
    assert D.broadcast_object([3]) == [3]
    t = torch.arange(6).reshape(3, 2)
    assert D.all_gather_rows(t) is t
    f, s, c = _problem(20, 8, 6, 3, seed=1)
    assert torch.equal(sharded_inter_camera_distance(f, s, c, 0.3), inter_camera_distance(f, s, c, 0.3))


def test_training_helpers_in_one_process():
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.agree(lambda: 7) == 7 and D.agree(lambda: 8, on_main_only=True) == 8
    with pytest.raises(ValueError, match="plain"):
        D.agree(lambda: (_ for _ in ()).throw(ValueError("plain")))
    x = torch.randn(4, 3, requires_grad=True)
    assert D.gather_for_loss(x) is x
    # one rank running every camera: the merge leaves the sequential statistics as they are
    model = _tiny_net()
    model.train()
    sync = N.SequentialStatsSync(model, 0, STATS_CAMERAS, STATS_CAMERAS)
    sync.snapshot()
    for x in _camera_chunks(0):
        model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sync.merge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="snapshot"):
        sync.merge()
    with pytest.raises(ValueError, match="first \\+ count <= total"):
        N.SequentialStatsSync(model, 2, 2, 3)
    with pytest.raises(ValueError, match="count >= 1"):
        N.SequentialStatsSync(model, 0, 0, 3)
    with pytest.raises(ValueError, match="momentum=None"):
        N.SequentialStatsSync(torch.nn.BatchNorm1d(3, momentum=None), 0, 1, 1)
    assert [samplers.group_share(5, r, 2) for r in range(2)] == [range(3), range(3, 5)]
    with N.synced_batch_stats(model) as same:  # one process: nothing to synchronise
        assert same is model and _patched_norms(model) == []


@pytest.mark.parametrize("groups, per_group", [(1, 4), (3, 4), (4, 2), (5, 3)])
def test_grouped_statistics_equal_separate_forwards(groups, per_group):
    """One forward of G groups under grouped_batch_stats: the outputs, the gradients of the summed
    per-group losses, the running statistics and the batch counts of G forwards of one group each
    (stage 1's cameras), over two steps."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(_tiny_net(), torch.nn.BatchNorm1d(5)).train()

    separate, grouped = net(), net()
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        # groups of different scale and offset, so that pooled statistics would differ
        x = torch.cat([torch.randn(per_group, 3, 6, 6, generator=g) * (c + 1) + c for c in range(groups)])
        w = torch.randn(groups * per_group, 5, generator=g)
        outs = [separate(part) for part in x.chunk(groups)]
        sum((o * wp).sum() ** 2 for o, wp in zip(outs, w.chunk(groups))).backward()
        with N.grouped_batch_stats(grouped, groups) as same:
            assert same is grouped
            out = grouped(x)
        assert _patched_norms(grouped) == []  # every forward restored
        sum((o * wp).sum() ** 2 for o, wp in zip(out.chunk(groups), w.chunk(groups))).backward()
        torch.testing.assert_close(out, torch.cat(outs), rtol=1e-5, atol=1e-5)
        scale = max(float(p.grad.abs().max()) for p in separate.parameters())
        for (name, a), b in zip(separate.named_parameters(), grouped.parameters()):
            # a conv bias before a norm layer has a zero gradient up to rounding: absolute
            # tolerance relative to the largest gradient
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        for (name, a), b in zip(separate.state_dict().items(), grouped.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # eval mode: the running statistics, whatever the groups
    separate.eval(), grouped.eval()
    x = torch.randn(groups * per_group, 3, 6, 6)
    with N.grouped_batch_stats(grouped, groups):
        torch.testing.assert_close(grouped(x), separate(x))


def test_grouped_statistics_refuse_uneven_batches():
    model = _tiny_net().train()
    with N.grouped_batch_stats(model, 3), pytest.raises(ValueError, match="batch of 4 does not split into 3"):
        model(torch.randn(4, 3, 6, 6))
    assert _patched_norms(model) == []  # restored on the way out, error or not
    with pytest.raises(ValueError, match="groups must be >= 1"), N.grouped_batch_stats(model, 0):
        pass
    bn3d = torch.nn.Sequential(model, torch.nn.BatchNorm3d(2))
    with pytest.raises(TypeError, match="not BatchNorm3d; use --stage1-forward per-camera"), \
            N.grouped_batch_stats(bn3d, 2):
        pass


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 6, 7, 100, 1001])
def test_shard_indices_partition(n, world):
    shards = [D.shard_indices(n, r, world) for r in range(world)]
    assert [i for sh in shards for i in sh] == list(range(n))
    assert max(len(sh) for sh in shards) - min(len(sh) for sh in shards) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 9, 64, 1000, 32621])
def test_condensed_row_splits_balance(n, world):
    p = condensed.row_splits(n, world)
    assert p[0] == 0 and p[-1] == n and len(p) == world + 1
    assert all(a <= b for a, b in zip(p, p[1:]))
    total = n * (n - 1) // 2
    counts = [condensed.row_offset(n, b) - condensed.row_offset(n, a) for a, b in zip(p, p[1:])]
    assert sum(counts) == total
    # each split point is the first row reaching its share: no part is short by a whole row
    for k in range(1, world):
        target = -(-k * total // world)
        assert condensed.row_offset(n, p[k]) >= target
        assert p[k] == 0 or condensed.row_offset(n, p[k] - 1) < target
    # a split point overshoots its share by less than one row (< n entries)
    assert all(abs(cnt - total / world) < max(n, 1) for cnt in counts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank < world"):
        D.shard_indices(5, 2, 2)
    with pytest.raises(ValueError, match="parts >= 1"):
        condensed.row_splits(5, 0)
    with pytest.raises(ValueError, match="split"):
        samplers.ShardedBatchSampler([[0]], split="rows")
    with pytest.raises(ValueError, match="rank < world"):
        samplers.ShardedBatchSampler([[0]], rank=3, world=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        D.all_gather_rows(np.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        D.init_from_env("mpi")
    with pytest.raises(ValueError, match="groups of 8"):
        list(samplers.ShardedBatchSampler([list(range(12))], group_size=8, rank=0, world=2))
    with pytest.raises(ValueError, match="split='across'"):
        list(samplers.ShardedBatchSampler([list(range(8))], group_size=8, rank=0, world=2))


def _camera_batches(rng, n_batches, cams, per_camera):
    # like the stage-1 sampler: per_camera (index, seed) pairs of camera 0, then camera 1, ...
    ids = rng.permutation(n_batches * cams * per_camera)
    return [[(int(i), int(i) * 7) for i in ids[b * cams * per_camera:(b + 1) * cams * per_camera]]
            for b in range(n_batches)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_sampler_within_keeps_groups_and_covers_each_batch(rng, world):
    cams, per_camera = 6, 8
    batches = _camera_batches(rng, 5, cams, per_camera)
    parts_sampler = [samplers.ShardedBatchSampler(batches, group_size=per_camera, rank=r, world=world)
                     for r in range(world)]
    parts = [list(p) for p in parts_sampler]
    assert all(len(p) == len(batches) for p in parts)
    for step, batch in enumerate(batches):
        shares = [p[step] for p in parts]
        assert [x for sh in shares for x in sh] == batch  # disjoint, complete, in order
        groups = [batch[g * per_camera:(g + 1) * per_camera] for g in range(cams)]
        sizes = []
        for sh in shares:  # every share is whole camera groups
            assert len(sh) % per_camera == 0 and sh
            assert all(sh[k:k + per_camera] in groups for k in range(0, len(sh), per_camera))
            sizes.append(len(sh) // per_camera)
        assert max(sizes) - min(sizes) <= 1
        for r, sh in enumerate(shares):  # share() names the groups (cameras) each rank got
            cams_here = parts_sampler[r].share(cams)
            assert sh == [x for g in cams_here for x in groups[g]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n_batches", [0, 1, 5, 8])
def test_sampler_across_gives_disjoint_whole_batches(n_batches, world):
    batches = [list(range(64 * b, 64 * (b + 1))) for b in range(n_batches)]
    parts = [samplers.ShardedBatchSampler(batches, split="across", rank=r, world=world) for r in range(world)]
    got = [list(p) for p in parts]
    steps = n_batches // world
    assert all(len(g) == steps == len(p) for g, p in zip(got, parts))
    seen = [tuple(b) for g in got for b in g]
    assert len(set(seen)) == len(seen) == steps * world
    assert sorted(seen) == [tuple(b) for b in batches[:steps * world]]
    for r, g in enumerate(got):
        assert g == batches[r:steps * world:world]


def test_sampler_forwards_epoch():
    inner = _ListSampler([[0, 1], [2, 3]])
    sh = samplers.ShardedBatchSampler(inner, rank=1, world=2)
    sh.set_epoch(3)
    assert inner.epoch == 3 and list(sh) == [[3001], [3003]] and len(sh) == 2
