"""Evaluation speed: ``evaluate`` (C++ core and torch path) against the per-query ``evaluate_ref``.

Default: 2,000 queries x 15,000 gallery (Market-1501-like), every path checked against the
reference first. IICS_BENCH_SCALE=large adds the MSMT17 size, 11,659 x 82,161, through
``evaluate_features`` (the distance matrix alone would be 3.8 GB), timed once in a fresh
process that also reports its peak resident memory above the inputs (Linux /proc), with the
reference run on a 500-query slice and scaled. The GPU case needs CUDA.

    pytest benchmarks/bench_evaluation.py -s          # or: python benchmarks/bench_evaluation.py
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from iics_fast.evaluation import evaluate, evaluate_features, evaluate_ref


def _case(rng, num_q, num_g, num_ids, num_cams=6, dim=None):
    """Ids and cameras drawn like a re-ID test set; distances (or features) carry a weak signal."""
    gp = rng.integers(0, num_ids, num_g)
    gc = rng.integers(0, num_cams, num_g)
    qp = gp[rng.integers(0, num_g, num_q)]
    qc = rng.integers(0, num_cams, num_q)
    centres = rng.standard_normal((num_ids, dim or 32)).astype(np.float32)
    qf = centres[qp] + 2.0 * rng.standard_normal((num_q, centres.shape[1]), dtype=np.float32)
    gf = centres[gp] + 2.0 * rng.standard_normal((num_g, centres.shape[1]), dtype=np.float32)
    return qf, gf, qp, gp, qc, gc


def _cosine(qf, gf):
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    return 1.0 - qn @ gn.T


def _timed(fn, *args, repeat=1, **kw):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kw)
        best = min(best, time.perf_counter() - t)
    return best, out


def run_moderate(num_q=2000, num_g=15000):
    rng = np.random.default_rng(0)
    qf, gf, qp, gp, qc, gc = _case(rng, num_q, num_g, num_ids=750)
    d = _cosine(qf, gf)
    t_ref, ref = _timed(evaluate_ref, d, qp, gp, qc, gc)
    print(f"\nevaluate {num_q} x {num_g} on the CPU ({torch.get_num_threads()} threads): "
          f"per-query reference {t_ref:.2f} s")
    for backend in ("native", "torch"):
        t_fast, got = _timed(evaluate, d, qp, gp, qc, gc, backend=backend, repeat=3)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-12)
        assert abs(got[1] - ref[1]) < 1e-12
        print(f"  backend={backend:6s} {t_fast:.3f} s, {t_ref / t_fast:.1f}x the reference "
              f"(mAP {got[1]:.4f}, rank-1 {got[0][0]:.4f})")


PROBE = """
import sys, time
sys.path.insert(0, {here!r})
import numpy as np
from bench_evaluation import _case
from iics_fast.evaluation import evaluate_features

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

qf, gf, qp, gp, qc, gc = _case(np.random.default_rng(1), {num_q}, {num_g}, num_ids=3060, num_cams=15)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak resident size to the current one
base = kib("VmRSS:")
t = time.perf_counter()
cmc, mAP = evaluate_features(qf, gf, qp, gp, qc, gc, backend="native")
print(time.perf_counter() - t, (kib("VmHWM:") - base) / 1024, mAP)
"""


def run_msmt(num_q=11659, num_g=82161, ref_queries=500):
    """Time and peak memory of the full evaluation in a fresh process; the reference on a slice."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", PROBE.format(here=here, num_q=num_q, num_g=num_g)],
                         check=True, capture_output=True, text=True).stdout.split()
    t_fast, peak_mb, mAP = float(out[0]), float(out[1]), float(out[2])
    rng = np.random.default_rng(1)
    qf, gf, qp, gp, qc, gc = _case(rng, num_q, num_g, num_ids=3060, num_cams=15)
    sl = slice(0, ref_queries)
    t_ref, ref = _timed(evaluate_ref, _cosine(qf[sl], gf), qp[sl], gp, qc[sl], gc)
    part = evaluate_features(qf[sl], gf, qp[sl], gp, qc[sl], gc, backend="native")
    assert abs(part[1] - ref[1]) < 1e-6
    est = t_ref * num_q / ref_queries
    print(f"\nevaluate_features {num_q} x {num_g} (C++ core): {t_fast:.1f} s, peak memory "
          f"+{peak_mb:.0f} MB above the features (the full distance matrix would be "
          f"{num_q * num_g * 4 / 2**20:.0f} MB); per-query reference on {ref_queries} queries "
          f"{t_ref:.1f} s -> about {est:.0f} s for all, {est / t_fast:.1f}x (mAP {mAP:.4f})")


def test_evaluation_speed():
    run_moderate()


@pytest.mark.skipif(os.environ.get("IICS_BENCH_SCALE") != "large",
                    reason="set IICS_BENCH_SCALE=large for the MSMT17 size")
def test_evaluation_speed_msmt():
    run_msmt()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluation_speed_gpu():
    rng = np.random.default_rng(2)
    qf, gf, qp, gp, qc, gc = _case(rng, 11659, 82161, num_ids=3060, num_cams=15)
    sl = slice(0, 300)
    ref = evaluate_ref(_cosine(qf[sl], gf), qp[sl], gp, qc[sl], gc)
    part = evaluate_features(qf[sl], gf, qp[sl], gp, qc[sl], gc, device="cuda")
    assert abs(part[1] - ref[1]) < 1e-6
    evaluate_features(qf, gf, qp, gp, qc, gc, device="cuda")  # warm-up
    torch.cuda.synchronize()
    t, got = _timed(evaluate_features, qf, gf, qp, gp, qc, gc, device="cuda", repeat=3)
    print(f"\nevaluate_features on {torch.cuda.get_device_name()} 11659 x 82161: {t:.2f} s "
          f"(mAP {got[1]:.4f})")


if __name__ == "__main__":
    run_moderate()
    if os.environ.get("IICS_BENCH_SCALE") == "large":
        run_msmt()
