"""Inter-camera distance (paper Eq. 5), side by side with its peers at equal work.

* iics_fast: ``inter_camera_distance(..., backend="cpu")`` into the condensed triangle;
* PyTorch over the same i < j pairs: sum |a - b| of every pair by ``torch.nn.functional.pdist
  (p=1)`` straight into the condensed output (PyTorch's vectorised L1 kernel; ``cdist(p=1)``
  runs a scalar loop), then a block of rows at a time sum(min) = (sum a +
  sum b - sum |a - b|) / 2, the cosines by ``torch.mm``, the camera mask and Eq. 5 elementwise,
  in place;
* the reference code as it runs on a CPU: its row loop (for each row an N x D |a - b| and
  a + b, two row sums), its dense ``1 - x x^T`` and tiled camera mask, on the square matrix.

Every side is timed whole, in the same rounds (conftest's ``side_by_side``), and its peak memory
measured in a fresh process. The ceiling row: one core's rate for the sum-of-minima micro-kernel's
D loop alone on L1-resident rows (``_C.min_sum_ceiling``: the same loads, min and FMA,
accumulators in registers, no per-chunk work) times the cores, against our build's pair-dims a
second (all i < j pairs x D), by wall time and by CPU time.

    pytest benchmarks/bench_pairwise.py -s                     # N = 1,000 and 6,000 (D = 3,600)
    IICS_BENCH_SCALE=large pytest benchmarks/bench_pairwise.py -s   # + MSMT17 scale, reference at 6,000
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from iics_fast import condensed
from iics_fast.similarity import inter_camera_distance

MARKET = dict(n=6000, cams=6, dim_per_cam=600, d=2048)   # D = 3,600 (Market-1501's)
SMALL = dict(n=1000, cams=6, dim_per_cam=600, d=2048)
MSMT = dict(n=32621, cams=15, dim_per_cam=600, d=2048)   # D = 9,000
MU = 0.02
REFERENCE = "the reference code as it runs on a CPU (row loop)"
PEER = "PyTorch (pdist p=1, same i<j pairs)"


def make_case(n, cams, dim_per_cam, d, seed=0):
    """Features, per-camera softmax scores (D = cams x dim_per_cam) and shuffled camera ids,
    generated in row chunks so the peak is the arrays themselves."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    scores = torch.empty(n, cams * dim_per_cam)
    for r in range(0, n, 2048):
        logits = 4.0 * torch.randn(min(2048, n - r), cams, dim_per_cam, generator=g)
        scores[r : r + 2048] = torch.softmax(logits, dim=2).reshape(logits.shape[0], -1)
    camids = torch.randint(0, cams, (n,), generator=g)
    return feats, scores, camids


# ----------------------------------------------------------------------------- the sides


def ours(feats, scores, camids, mu=MU):
    return inter_camera_distance(feats, scores, camids, mu, backend="cpu")


def blocked_torch(feats, scores, camids, mu=MU, block=256):
    """Eq. 5 over the i < j pairs, condensed: pdist's L1 of every pair, then `block` rows at a
    time (their pairs are one contiguous run of the condensed output) turned into Eq. 5."""
    n = feats.shape[0]
    x = torch.nn.functional.normalize(feats, dim=1)
    rs = scores.sum(1)
    out = torch.nn.functional.pdist(scores, p=1)  # sum |a - b|, row-major i < j
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        counts = n - 1 - torch.arange(i0, i1)
        rows = torch.repeat_interleave(torch.arange(i0, i1), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        cols = torch.arange(len(rows)) - first + rows + 1
        start = condensed.row_offset(n, i0)
        seg = out[start : start + len(rows)]
        s = rs[rows] + rs[cols]
        jac = ((s - seg) / (s + seg)).nan_to_num_(0.0)  # smin / smax; J(0, 0) = 0
        cos = (x[i0:i1] @ x[i0:].T)[rows - i0, cols - i0]
        seg.copy_(1 - cos - mu * jac * (camids[rows] != camids[cols]))
    return out


def reference(feats, scores, camids, mu=MU):
    """The reference code's computation on the square matrix (IICS cluster.py:
    distance_cross_cam, jaccard_sim_cross_cam, cluster_cross_cam)."""
    n = feats.shape[0]
    x = torch.nn.functional.normalize(feats, dim=1)
    dist = 1 - torch.mm(x, x.t())
    jaccard_sim = torch.zeros((n, n))
    for i in range(n):
        distribute = scores[i]
        abs_sub = torch.abs(distribute - scores)
        sum_distribute = distribute + scores
        intersection = (sum_distribute - abs_sub).sum(dim=1) / 2
        union = (sum_distribute + abs_sub).sum(dim=1) / 2
        jaccard_sim[i, :] = intersection / union
    cams = camids.numpy().reshape((n, 1))
    tiled = np.tile(cams, n)
    mask = np.array(tiled != tiled.T, dtype=np.float32)
    return dist.numpy() - mask * jaccard_sim.numpy() * mu


IMPLS = {"ours": ours, PEER: blocked_torch, REFERENCE: reference}


def build(impl, **size):
    """Inputs of `size` and a callable running `impl` on them whole (for memory_probe)."""
    fn = IMPLS[impl]
    fn(*make_case(n=40, cams=3, dim_per_cam=5, d=16))  # warm-up: extension, threads, allocator
    case = make_case(**size)
    return lambda: fn(*case)


def _ceiling(n, dim):
    """This machine's ceiling for the sum-of-minima loop and the work of one build."""
    from iics_fast._native import native

    C = native()
    cores = len(os.sched_getaffinity(0))
    per_core = C.min_sum_ceiling("auto", 2.0)
    return {"work": n * (n - 1) / 2 * dim, "unit": "pair-dims (one min + add)", "rate": per_core * cores,
            "rate_per_core": per_core, "cores": cores, "isa": C.simd_variant("auto"),
            "how": "one core's fastest 0.5 ms burst of the micro-kernel's D loop alone (the same loads, "
                   "min and FMA, accumulators in registers) on L1-resident rows (_C.min_sum_ceiling), "
                   "times the cores"}


def _memory(size, impls):
    return {("ours" if k == "ours" else k): dict(module_file=__file__, impl=k, **size) for k in impls}


def _check(cond, n, other_square=None, other_cond=None, atol=3e-5):
    if other_cond is not None:
        np.testing.assert_allclose(cond.numpy(), np.asarray(other_cond), atol=atol)
    if other_square is not None:
        iu = np.triu_indices(n, 1)
        np.testing.assert_allclose(cond.numpy(), other_square[iu], atol=atol)


# ----------------------------------------------------------------------------- benchmarks


def test_inter_camera_small_all_three(side_by_side):
    """N = 1,000, D = 3,600: ours, the blocked PyTorch peer and the reference, all whole."""
    case = make_case(**SMALL)
    n = SMALL["n"]
    got = ours(*case)
    _check(got, n, other_square=reference(*case), other_cond=blocked_torch(*case))
    side_by_side("inter-camera distance (Eq. 5)", f"N={n} C={SMALL['cams']} D=3600 d=2048",
                 lambda: ours(*case), {PEER: lambda: blocked_torch(*case), REFERENCE: (lambda: reference(*case), 1)},
                 rounds=3, memory=_memory(SMALL, IMPLS), ceiling=_ceiling(n, 3600))


def test_inter_camera_vs_blocked_torch(side_by_side):
    """N = 6,000, D = 3,600 (the goal's size): ours against the blocked PyTorch peer."""
    case = make_case(**MARKET)
    n = MARKET["n"]
    got = ours(*case)
    _check(got, n, other_cond=blocked_torch(*case))
    side_by_side("inter-camera distance (Eq. 5)", f"N={n} C={MARKET['cams']} D=3600 d=2048",
                 lambda: ours(*case), {PEER: lambda: blocked_torch(*case)}, rounds=3,
                 memory=_memory(MARKET, ["ours", PEER]), ceiling=_ceiling(n, 3600))


@pytest.mark.parametrize("size", [MARKET, pytest.param(MSMT, marks=pytest.mark.large)], ids=["6000", "msmt17"])
def test_min_sum_loop_vs_ceiling(side_by_side, size):
    """The sum-of-minima sweep alone (mode="jaccard": no cosines, no mask) against the
    ceiling of its inner loop: what the tiling, the reductions and the writes cost."""
    case = make_case(**size)
    n, dim = size["n"], size["cams"] * size["dim_per_cam"]
    side_by_side("sum-of-minima sweep (mode='jaccard')", f"N={n} D={dim}",
                 lambda: inter_camera_distance(*case, MU, mode="jaccard", backend="cpu"), {},
                 rounds=3 if n < 10000 else 1,
                 ceiling=_ceiling(n, dim), memory_inline=n >= 10000)


@pytest.mark.large
def test_inter_camera_reference_6000(side_by_side):
    """N = 6,000: the reference row loop whole (minutes) beside ours."""
    case = make_case(**MARKET)
    n = MARKET["n"]
    side_by_side("inter-camera distance (Eq. 5), reference", f"N={n} C={MARKET['cams']} D=3600 d=2048",
                 lambda: ours(*case), {REFERENCE: (lambda: reference(*case), 1)}, rounds=1,
                 memory=_memory(MARKET, [REFERENCE]))


@pytest.mark.large
def test_inter_camera_msmt17(side_by_side):
    """MSMT17 scale, N = 32,621, D = 9,000: ours once against this machine's ceiling. The
    reference needs its dense N x N arrays (about 6 x 4.3 GB) and does not fit 24 GB; the
    blocked PyTorch peer would run for most of an hour here: neither is run."""
    case = make_case(**MSMT)
    n = MSMT["n"]
    last = {}
    side_by_side("inter-camera distance (Eq. 5)", f"N={n} C={MSMT['cams']} D=9000 d=2048",
                 lambda: last.__setitem__("out", ours(*case)), {}, rounds=1, memory_inline=True,
                 ceiling=_ceiling(n, 9000),
                 extra={"not_run": {REFERENCE: "dense N x N float32 distance, Jaccard, mask and two "
                                    "temporaries: about 6 x 4.3 GB, beyond this 24 GB machine",
                                    PEER: "too slow at this size on 2 cores; see the N = 6,000 row (equal work)"}})
    got = last.pop("out")  # the timed build's output, checked against the reference's rows
    for i, row in reference_rows(case, [0, n // 2, n - 2]).items():
        start = condensed.row_offset(n, i)
        np.testing.assert_allclose(got[start : start + n - i - 1].numpy(), row[i + 1 :], atol=3e-5)


def reference_rows(case, rows):
    """Rows of the reference's square matrix, computed as its loop computes them."""
    feats, scores, camids = case
    x = torch.nn.functional.normalize(feats, dim=1)
    out = {}
    for i in rows:
        abs_sub = torch.abs(scores[i] - scores)
        both = scores[i] + scores
        jac = ((both - abs_sub).sum(1) / 2) / ((both + abs_sub).sum(1) / 2)
        d = 1 - x[i] @ x.T - MU * jac * (camids != camids[i])
        out[i] = d.numpy()
    return out


# ----------------------------------------------------------------------------- static GPU estimate

H100_SMS, H100_SCHED, H100_GHZ = 132, 4, 1.7


def gpu_estimate():
    """Registers, spills and inner-loop mix of the sm_90 cubins, and the H100 time they imply at
    MSMT17 scale: warp-instructions of the L1 loop per pair-element against 132 SMs x 4
    schedulers x 1 warp-instruction / cycle at 1.7 GHz; cosines at tensor-core / FFMA rates."""
    from benchmarks.gpu_report import compile_report
    from benchmarks.gpu_specs.pairwise import COMPILE_SPECS
    from iics_fast.kernels import pairwise as K

    reports = {s.name: compile_report(s, 90) for s in COMPILE_SPECS}
    for name, r in reports.items():
        mix = " ".join(f"{k}:{v}" for k, v in list(r.inner_loop.items())[:6])
        print(f"  sm_90 {name:28s} regs {r.registers:3d} spill {r.spill_bytes} smem {r.shared_bytes:6d}  "
              f"inner loop {r.inner_loop_len} instr: {mix}")
    # the L1 loop: one iteration = 4*UNROLL score dims for BLOCK*BLOCK/(32*num_warps) pairs a thread
    l1 = reports["inter_camera_eq5_fp32"]  # its innermost loop is the L1 loop (checked below)
    per_iter = K.DIST_BLOCK * K.DIST_BLOCK * 4 * K.UNROLL / K.NUM_WARPS  # pair-elements a warp
    assert l1.inner_loop.get("FADD", 0) == 2 * per_iter / 32, l1.inner_loop  # 2 FADD / element
    instr_per_elem = l1.inner_loop_len / per_iter
    fadd_share = l1.inner_loop.get("FADD", 0) / l1.inner_loop_len
    n, cams, dim = MSMT["n"], MSMT["cams"], MSMT["cams"] * MSMT["dim_per_cam"]
    cross_pairs = n * n / 2 * (1 - 1 / cams)  # equal-size cameras; same-camera tiles skipped
    issue = H100_SMS * H100_SCHED * H100_GHZ * 1e9
    t_l1 = cross_pairs * dim * instr_per_elem / issue
    flops = n * n * MSMT["d"]  # upper triangle, 2 flops a multiply-add
    t_cos16 = flops / 989e12
    t_cos32 = flops / 2 / (H100_SMS * 128 * H100_GHZ * 1e9)
    print(f"  L1 loop: {l1.inner_loop_len} warp-instr per {per_iter:.0f} pair-elements = "
          f"{instr_per_elem:.4f} / element ({fadd_share:.0%} FADD; 2 FADD per element: a-b, +|.|)")
    print(f"  H100 at MSMT17 scale: L1 {t_l1:.2f} s ({cross_pairs:.3g} cross-camera pairs x {dim}); cosine "
          f"{t_cos16 * 1e3:.1f} ms fp16 tensor cores / {t_cos32 * 1e3:.0f} ms fp32 FFMA; output "
          f"{n * (n - 1) / 2 * 4 / 3.35e12 * 1e3:.1f} ms at 3.35 TB/s -> about {t_l1 + t_cos32:.2f} s")
    return t_l1


@pytest.mark.skipif(os.environ.get("IICS_BENCH_GPU_REPORT") != "1",
                    reason="set IICS_BENCH_GPU_REPORT=1 (compiles every kernel for sm_90)")
def test_gpu_static_estimate():
    gpu_estimate()


if __name__ == "__main__":
    gpu_estimate()
