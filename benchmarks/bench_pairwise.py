"""Inter-camera distance (paper Eq. 5): the C++ path against the reference code's row loop and
against torch.cdist(p=1) + the elementwise combination, measured side by side in one run; the
cost of a row range (`rows=(0, N/2)`, what one rank of a sharded build computes) against the
whole build; and the static H100 estimate of the Triton kernel from its sm_90 cubin.

    pytest benchmarks/bench_pairwise.py -s                       # Market-like N=8,000 (a few minutes)
    IICS_BENCH_SCALE=large pytest benchmarks/bench_pairwise.py -s  # + MSMT17 N=32,621 (needs ~6 GB free)
    python -m benchmarks.bench_pairwise [--large] [--gpu-report]     # from the repository root

Baselines too slow to run whole at these sizes are timed on the first rows and extrapolated
linearly in the number of rows (each row's cost is the same: a full pass over the N x D scores);
the printout says so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from iics_fast.similarity import inter_camera_distance

MARKET = dict(n=8000, cams=6, dim_per_cam=600, d=2048)
MSMT = dict(n=32621, cams=15, dim_per_cam=600, d=2048)
MU = 0.02


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


# ----------------------------------------------------------------------------- baselines


def reference_row_loop(feats, scores, camids, mu, rows):
    """The reference code's computation (IICS cluster.py: distance_cross_cam, jaccard_sim_cross_cam,
    cluster_cross_cam), restricted to the first `rows` rows of the square matrix: for each row
    an N x D |a - b| and an N x D a + b temporary, two reductions, then the N x N combination."""
    n = feats.shape[0]
    x = torch.nn.functional.normalize(feats, dim=1)
    dist = 1 - torch.mm(x[:rows], x.t())
    jaccard_sim = torch.zeros((rows, n))
    for i in range(rows):
        distribute = scores[i]
        abs_sub = torch.abs(distribute - scores)
        sum_distribute = distribute + scores
        intersection = (sum_distribute - abs_sub).sum(dim=1) / 2
        union = (sum_distribute + abs_sub).sum(dim=1) / 2
        jaccard_sim[i, :] = intersection / union
    cams = camids.numpy().reshape((n, 1))
    mask = np.array(np.tile(cams[:rows], n) != np.tile(cams, rows).T, dtype=np.float32)
    return dist.numpy() - mask * jaccard_sim.numpy() * mu


def cdist_combination(feats, scores, camids, mu, rows):
    """torch.cdist(p=1) on the scores plus the elementwise Eq. 5 combination, first `rows` rows."""
    x = torch.nn.functional.normalize(feats, dim=1)
    rs = scores.sum(1)
    l1 = torch.cdist(scores[:rows], scores, p=1)
    s = rs[:rows, None] + rs[None, :]
    jac = (s - l1) / (s + l1)
    return 1 - x[:rows] @ x.T - mu * jac * (camids[:rows, None] != camids[None, :])


def _rows_of_condensed(cond, n, rows):
    """Rows [0, rows) of the square matrix from a condensed vector (diagonal 0)."""
    from iics_fast import condensed

    out = np.zeros((rows, n), dtype=np.float32)
    for i in range(rows):
        start = condensed.row_offset(n, i)
        out[i, i + 1 :] = cond[start : start + n - i - 1]
        for j in range(i):
            out[i, j] = cond[condensed.row_offset(n, j) + i - j - 1]
    return out


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


# ----------------------------------------------------------------------------- Market-like


def run_market(row_loop_rows=24, cdist_rows=96):
    n = MARKET["n"]
    feats, scores, camids = make_case(**MARKET)
    t_ours, cond = _timed(inter_camera_distance, feats, scores, camids, MU, backend="cpu")
    t_ours2, cond = _timed(inter_camera_distance, feats, scores, camids, MU, out=cond, backend="cpu")
    t_ours = min(t_ours, t_ours2)
    ours_rows = _rows_of_condensed(cond.numpy(), n, max(row_loop_rows, cdist_rows))
    t_half, half = _timed(inter_camera_distance, feats, scores, camids, MU, backend="cpu", rows=(0, n // 2))
    t_half = min(t_half, _timed(inter_camera_distance, feats, scores, camids, MU, out=half, backend="cpu",
                                rows=(0, n // 2))[0])  # best of two, as the full build
    assert torch.equal(half, cond[: half.numel()]), "row range differs from the whole build"
    share = half.numel() / cond.numel()

    reference_row_loop(feats, scores, camids, MU, 1)  # warm-up: one-time allocator and thread start
    t_loop, ref = _timed(reference_row_loop, feats, scores, camids, MU, row_loop_rows)
    np.fill_diagonal(ref[:, :row_loop_rows], 0.0)
    np.testing.assert_allclose(ours_rows[:row_loop_rows], ref, atol=2e-5)
    cdist_combination(feats, scores, camids, MU, 1)
    t_cd, cd = _timed(cdist_combination, feats, scores, camids, MU, cdist_rows)
    cd = cd.numpy()
    np.fill_diagonal(cd[:, :cdist_rows], 0.0)
    np.testing.assert_allclose(ours_rows[:cdist_rows], cd, atol=2e-5)

    est_loop = t_loop * n / row_loop_rows
    est_cd = t_cd * n / cdist_rows
    d_dim = MARKET["cams"] * MARKET["dim_per_cam"]
    print(f"\ninter-camera distance, N={n}, {MARKET['cams']} cameras, D={d_dim}, d={MARKET['d']}, "
          f"condensed, {torch.get_num_threads()} threads")
    print(f"  ours (C++ path, full build)        {t_ours:8.2f} s")
    print(f"  ours, rows (0, N/2): {share:.0%} of the entries {t_half:6.2f} s = {t_half / t_ours:.2f}x the full "
          f"build ({t_half / t_ours / share:.2f}x per entry); bitwise its slice")
    print(f"  reference row loop  {row_loop_rows:4d} rows {t_loop:7.2f} s -> {est_loop:8.1f} s for all "
          f"{n} rows (linear extrapolation)  ratio {est_loop / t_ours:6.1f}x")
    print(f"  cdist(p=1)+combine  {cdist_rows:4d} rows {t_cd:7.2f} s -> {est_cd:8.1f} s for all "
          f"{n} rows (linear extrapolation)  ratio {est_cd / t_ours:6.1f}x")
    return {"ours_s": t_ours, "rows_half_s": t_half, "row_loop_s": est_loop, "cdist_s": est_cd}


def test_market_like_speed():
    run_market()


# ----------------------------------------------------------------------------- MSMT17 scale


def run_msmt_child():
    """One MSMT17-size build into the condensed layout; prints JSON (times, peak RSS)."""
    t0 = time.perf_counter()
    feats, scores, camids = make_case(**MSMT)
    t_gen = time.perf_counter() - t0
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = time.process_time()
    t_build, cond = _timed(inter_camera_distance, feats, scores, camids, MU, backend="cpu")
    cpu_s = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # spot check a few rows against the reference row loop
    rows = _rows_of_condensed(cond.numpy(), MSMT["n"], 2)
    ref = reference_row_loop(feats, scores, camids, MU, 2)
    np.fill_diagonal(ref[:, :2], 0.0)
    np.testing.assert_allclose(rows, ref, atol=2e-5)
    print(json.dumps({"generate_s": t_gen, "build_s": t_build, "cpu_s": cpu_s, "peak_rss_mb": peak,
                      "peak_after_inputs_mb": rss_inputs, "output_mb": cond.numel() * 4 / 2**20}))


def run_msmt():
    proc = subprocess.run([sys.executable, __file__, "--msmt-child"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nMSMT17 scale N={MSMT['n']}, 15 cameras, D=9000, d=2048 -> condensed "
          f"({r['output_mb']:.0f} MiB): build {r['build_s']:.1f} s wall, {r['cpu_s']:.0f} s CPU; process peak RSS "
          f"{r['peak_rss_mb']:.0f} MiB (inputs alone {r['peak_after_inputs_mb']:.0f} MiB)")
    return r


@pytest.mark.skipif(os.environ.get("IICS_BENCH_SCALE") != "large", reason="set IICS_BENCH_SCALE=large")
def test_msmt_scale():
    run_msmt()


# ----------------------------------------------------------------------------- static GPU estimate

H100_SMS, H100_SCHED, H100_GHZ = 132, 4, 1.7


def gpu_estimate():
    """Registers, spills and inner-loop mix of the sm_90 cubins, and the H100 time they imply at
    MSMT17 scale: warp-instructions of the L1 loop per pair-element against 132 SMs x 4
    schedulers x 1 warp-instruction / cycle at 1.7 GHz; cosines at tensor-core / FFMA rates."""
    from benchmarks.gpu_report import compile_report
    from benchmarks.gpu_specs.pairwise import COMPILE_SPECS

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


@pytest.mark.skipif(os.environ.get("IICS_BENCH_GPU_REPORT") != "1" and os.environ.get("IICS_BENCH_SCALE") != "large",
                    reason="set IICS_BENCH_GPU_REPORT=1 (compiles every kernel for sm_90)")
def test_gpu_static_estimate():
    gpu_estimate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also the MSMT17-size build")
    parser.add_argument("--gpu-report", action="store_true", help="static H100 estimate from the sm_90 cubin")
    parser.add_argument("--msmt-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.msmt_child:
        run_msmt_child()
    else:
        run_market()
        if args.large:
            run_msmt()
        if args.gpu_report:
            gpu_estimate()
