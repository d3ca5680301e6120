"""Average linkage on a realistic distance matrix: iics_fast.cluster vs fastcluster, SciPy, sklearn.

Input: clustered features (Gaussian blobs, one blob per ~40 points, 64-d, L2-normalised) -> cosine
distance, float32 condensed, as the IICS stages produce it. Every method runs in a fresh
subprocess that loads the input, reads its peak resident size (VmHWM), runs, and reports wall
time, CPU time (all threads) and the peak growth over that input baseline:

* ours: ``cluster.linkage(d, inplace=True)`` on the float32 condensed buffer (how the trainer
  calls it: the buffer is not needed afterwards);
* fastcluster: ``fastcluster.linkage(d64, method="average")`` on float64 condensed, as a user would
  pass it. At N > 20,000 it gets the float32 condensed instead and makes its float64 copy itself
  (the same single copy it makes anyway, so the same peak growth; its time then includes the
  conversion, about a second): float64 input plus fastcluster's copy would hold 17 GB on a
  shared 24 GB machine;
* SciPy: ``scipy.cluster.hierarchy.linkage(d64, "average")`` (N <= 20,000);
* scikit-learn: ``AgglomerativeClustering(linkage="average", metric="precomputed")`` on the square
  float32 matrix (N <= 20,000: it needs ~23 GB at N = 32,621).

Before any timing is printed, our merge heights are checked against fastcluster's (rtol 1e-4:
float32 storage) and the partitions at N/40 clusters must be identical (adjusted Rand index 1).

Run: ``python benchmarks/bench_cluster.py`` (N = 4,000) or ``IICS_BENCH_SCALE=large python
benchmarks/bench_cluster.py`` (N = 8,000, 16,000, 32,621: needs ~11 GB free, and minutes), or
``IICS_BENCH_SIZES=8000,16000 python benchmarks/bench_cluster.py`` for chosen sizes;
``pytest benchmarks/bench_cluster.py`` runs the same comparison plus a pytest-benchmark timing.
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

SMALL_SIZES = [4000]
LARGE_SIZES = [8000, 16000, 32621]
BIG = 20000  # above this, SciPy and sklearn are skipped and fastcluster gets float32 input


def sizes():
    """IICS_BENCH_SIZES (comma-separated) if set, else by IICS_BENCH_SCALE."""
    if os.environ.get("IICS_BENCH_SIZES"):
        return [int(s) for s in os.environ["IICS_BENCH_SIZES"].split(",")]
    return LARGE_SIZES if os.environ.get("IICS_BENCH_SCALE") == "large" else SMALL_SIZES


def clustered_condensed(n, seed=0, dim=64, per_blob=40):
    """Cosine distances of blob features, float32 condensed, built a block of rows at a time."""
    rng = np.random.default_rng(seed)
    k = max(1, n // per_blob)
    centers = rng.standard_normal((k, dim))
    x = centers[rng.integers(0, k, n)] + 0.6 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    out = np.empty(n * (n - 1) // 2, np.float32)
    off = 0
    for i0 in range(0, n, 1024):
        block = 1.0 - x[i0:i0 + 1024] @ x.T
        for r, row in enumerate(block):
            i = i0 + r
            out[off:off + n - i - 1] = row[i + 1:]
            off += n - i - 1
    return out


CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    method, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    d = np.load(path)
    from iics_fast import condensed

    n = condensed.points(d.size)
    if method == "ours":
        from iics_fast import cluster
        cluster.linkage(d[:3].copy())  # load the extension before the baseline
        run = lambda: cluster.linkage(d, inplace=True)
    elif method == "fastcluster":
        import fastcluster
        if n <= int(sys.argv[4]):
            d = d.astype(np.float64)
        run = lambda: fastcluster.linkage(d, method="average")
    elif method == "scipy":
        from scipy.cluster.hierarchy import linkage
        d = d.astype(np.float64)
        run = lambda: linkage(d, method="average")
    elif method == "sklearn":
        from scipy.spatial.distance import squareform
        from sklearn.cluster import AgglomerativeClustering
        sq = squareform(d)
        del d
        est = AgglomerativeClustering(n_clusters=max(1, n // 40), linkage="average",
                                      metric="precomputed", compute_distances=True)
        run = lambda: est.fit(sq)
    base = peak()
    t0, c0 = time.perf_counter(), time.process_time()
    res = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    extra = peak() - base
    if method != "sklearn":
        np.save(out, res)
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_extra": extra, "baseline": base}))
""")


def measure(method, path, tmp):
    out = os.path.join(tmp, f"Z_{method}.npy")
    proc = subprocess.run([sys.executable, "-c", CHILD, method, path, out, str(BIG)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["Z"] = np.load(out) if method != "sklearn" else None
    return res


def check(Z, Zref, n):
    """Heights within float32 tolerance and the same partition at n/40 clusters."""
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import adjusted_rand_score

    np.testing.assert_allclose(Z[:, 2], Zref[:, 2], rtol=1e-4, atol=1e-6)
    k = max(1, n // 40)
    ari = adjusted_rand_score(fcluster(Z, k, "maxclust"), fcluster(Zref, k, "maxclust"))
    assert ari == 1.0, f"partition at {k} clusters differs from fastcluster's (ARI {ari})"


def compare(n, methods=None):
    """Runs every method on the same input; returns {method: result}; prints a table."""
    if methods is None:
        methods = ["ours", "fastcluster"] + (["scipy", "sklearn"] if n <= BIG else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.npy")
        np.save(path, clustered_condensed(n))
        results = {m: measure(m, path, tmp) for m in methods}
    if "fastcluster" in results:
        check(results["ours"]["Z"], results["fastcluster"]["Z"], n)
    base = results["ours"]
    print(f"\nN = {n}: average linkage, float32 condensed input "
          f"({n * (n - 1) // 2 * 4 / 1e9:.2f} GB)")
    print(f"  {'method':<12} {'wall s':>8} {'cpu s':>8} {'peak +MB':>9} "
          f"{'ours/it wall':>13} {'ours/it cpu':>12} {'ours/it peak':>13}")
    for m, r in results.items():
        print(f"  {m:<12} {r['wall']:8.2f} {r['cpu']:8.2f} {r['peak_extra'] / 1e6:9.1f} "
              f"{base['wall'] / r['wall']:13.2f} {base['cpu'] / r['cpu']:12.2f} "
              f"{base['peak_extra'] / max(r['peak_extra'], 1):13.3f}")
    return results


def test_bench_cluster_average(benchmark):
    """The side-by-side comparison, then our in-place run under pytest-benchmark."""
    from iics_fast import cluster

    for n in sizes():
        compare(n)
    d = clustered_condensed(sizes()[0])
    benchmark.pedantic(lambda buf: cluster.linkage(buf, inplace=True),
                       setup=lambda: ((d.copy(),), {}), rounds=3)


if __name__ == "__main__":
    for n in sizes():
        compare(n)
