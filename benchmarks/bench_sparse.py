"""The sparse inter-camera round against the dense round, same data, same process, several seeds.

    pytest benchmarks/bench_sparse.py -s                          # N = 3,000, C = 6, 2 seeds
    IICS_BENCH_SCALE=large pytest benchmarks/bench_sparse.py -s   # N = 12,936, C = 6 (Market shape)

Each seed runs in a fresh subprocess `benchmarks.profile.run_sparse(..., compare_dense=True)`:
synthetic features and intra-camera clusters of the profiler, scores sparsified batch by batch,
the sparse round (k-NN graph, edge terms, linkage), then the dense scores and the dense round
(fused Eq. 5, re-ranking, merge) on the same data; each phase's wall time and peak RSS above its
start, and the ARI between the two partitions. MSMT17 and larger sizes: `python -m
benchmarks.profile --mode sparse` (docs/sparse.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

PROBE = """
import json, sys
from benchmarks.profile import run_sparse
n, cams, k_inter, seed, sim = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
res, info = run_sparse(n, cams, k_inter, seed, similarity=sim, compare_dense=True, log=lambda m: None)
print(json.dumps({"phases": {p.name: [p.time_s, p.delta_mb, p.peak_mb] for p in res}, "info": info}, default=str))
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe(n, cams, k_inter, seed, similarity):
    out = subprocess.run([sys.executable, "-c", PROBE, str(n), str(cams), str(k_inter), str(seed), similarity],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"sparse probe at N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="peak memory needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("similarity", ["rerank", "cosine"])
def test_bench_sparse_round_vs_dense(compare, similarity):
    large = os.environ.get("IICS_BENCH_SCALE") == "large"
    n, cams = (12936, 6) if large else (3000, 6)
    k_inter = min(800, n // 16)
    runs = [_probe(n, cams, k_inter, seed, similarity) for seed in (0, 1)]
    sparse_t = [r["phases"]["sparse_round"][0] for r in runs]
    dense_t = [r["phases"]["dense_round"][0] for r in runs]
    aris = [r["info"]["ari_sparse_vs_dense"] for r in runs]
    assert min(aris) >= 0.99, f"ARI(sparse, dense) = {aris}"
    print(f"\n{similarity} inter-camera round, N = {n}, C = {cams}, k_inter = {k_inter}, seeds 0 and 1 "
          f"(load average {os.getloadavg()[0]:.1f})")
    for name, key in (("sparse", "sparse_round"), ("dense", "dense_round")):
        t = [r["phases"][key][0] for r in runs]
        m = [r["phases"][key][1] for r in runs]
        print(f"  {name:6s} {np.mean(t):8.2f} s (seeds {', '.join(f'{x:.2f}' for x in t)})   "
              f"peak +{max(m):.0f} MB")
    print(f"  ARI(sparse, dense) = {', '.join(f'{a:.4f}' for a in aris)}")
    compare(f"sparse inter-camera round ({similarity})", f"N={n}", float(np.mean(sparse_t)),
            float(np.mean(dense_t)), peak_mb=max(r["phases"]["sparse_round"][1] for r in runs),
            baseline_peak_mb=max(r["phases"]["dense_round"][1] for r in runs),
            baseline="dense round (fused Eq. 5, re-ranking, merge)")
