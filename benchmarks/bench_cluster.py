"""Average-linkage merge, side by side with fastcluster and SciPy at equal input.

Input: cosine distances of clustered features (a blob per ~40 points, 64-d), condensed, as the
IICS stages produce them. Each side gets the input in the form it works on in place or best:

* iics_fast: ``cluster.linkage(d, inplace=True)`` on the float32 condensed buffer (how the
  trainer calls it);
* fastcluster in place on a float64 condensed buffer: what ``fastcluster.linkage(d64,
  method="average", preserve_input=False)`` means, through the routine it wraps
  (``fastcluster.linkage_wrap``): under NumPy 2, ``linkage`` copies its input first
  (``array(X, subok=True)``), which would add a copy of 4.3 GB to its time and memory at N =
  32,621;
* SciPy: ``scipy.cluster.hierarchy.linkage(d64, "average")`` on float64.

Every side is timed whole in the same rounds (a fresh copy of its input each round, not
timed) and its peak memory measured in a fresh process above its input. Before timing, our
heights match fastcluster's (rtol 1e-4: float32 storage) and the partitions at N/40 clusters
are the same (adjusted Rand index 1).

    pytest benchmarks/bench_cluster.py -s                          # N = 4,000 and 16,000, + host RNN passes
    IICS_BENCH_SCALE=large pytest benchmarks/bench_cluster.py -s   # + N = 32,621 (MSMT17)
"""
from __future__ import annotations

import numpy as np
import pytest

FASTCLUSTER = "fastcluster (preserve_input=False, float64)"
SCIPY = "SciPy linkage (float64)"


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


def ours(d):
    from iics_fast import cluster

    return cluster.linkage(d, inplace=True)


def fastcluster_inplace(d64):
    """fastcluster's average linkage of the float64 condensed `d64`, overwriting it."""
    import fastcluster

    n = int(np.ceil(np.sqrt(2 * len(d64))))
    assert n * (n - 1) // 2 == len(d64) and d64.dtype == np.float64 and d64.flags.c_contiguous
    z = np.empty((n - 1, 4))
    fastcluster.linkage_wrap(n, d64, z, fastcluster.mthidx["average"])
    return z


def scipy_linkage(d64):
    from scipy.cluster.hierarchy import linkage

    return linkage(d64, method="average")


def rnn_host(d):
    """The host instantiation of the CUDA merge's reciprocal-nearest-neighbour passes (average
    linkage, in place): the answer to whether the CPU should use the passes too."""
    from iics_fast._native import native

    return native().cluster_linkage(d, 2, True, False, True)


RNN_HOST = "host RNN passes (the CUDA merge's algorithm)"
IMPLS = {"ours": (ours, np.float32), FASTCLUSTER: (fastcluster_inplace, np.float64), SCIPY: (scipy_linkage, np.float64),
         RNN_HOST: (rnn_host, np.float32)}


def build(impl, n):
    """The input in the side's own form and a callable running it once (for memory_probe)."""
    fn, dtype = IMPLS[impl]
    fn(clustered_condensed(50).astype(dtype))  # warm-up: imports, extension, threads
    d = clustered_condensed(n).astype(dtype, copy=False)
    return lambda: fn(d)


def check(Z, Zref, n):
    """Heights within float32 tolerance and the same partition at n/40 clusters."""
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import adjusted_rand_score

    np.testing.assert_allclose(Z[:, 2], Zref[:, 2], rtol=1e-4, atol=1e-6)
    k = max(1, n // 40)
    ari = adjusted_rand_score(fcluster(Z, k, "maxclust"), fcluster(Zref, k, "maxclust"))
    assert ari == 1.0, f"partition at {k} clusters differs from fastcluster's (ARI {ari})"


def compare(side_by_side, n, rounds, with_scipy=True):
    d = clustered_condensed(n)
    d64 = d.astype(np.float64)
    check(ours(d.copy()), fastcluster_inplace(d64.copy()), n)
    peers = {FASTCLUSTER: (fastcluster_inplace, rounds, lambda: (d64.copy(),))}
    if with_scipy:
        peers[SCIPY] = (scipy_linkage, rounds, lambda: (d64.copy(),))
    side_by_side("merge (average linkage)", f"N={n}", ours, peers, prepare=lambda: (d.copy(),), rounds=rounds,
                 memory={k: dict(module_file=__file__, impl=k, n=n) for k in ["ours", *peers]})


@pytest.mark.parametrize("n", [4000, 16000])
def test_merge_vs_peers(side_by_side, n):
    compare(side_by_side, n, rounds=3)


def test_rnn_host_versus_chain(side_by_side):
    """Our nearest-neighbour chain against the host RNN passes, interleaved, same input."""
    n = 16000
    d = clustered_condensed(n)
    side_by_side("merge: chain vs host RNN passes", f"N={n}", ours, {RNN_HOST: rnn_host},
                 prepare=lambda: (d.copy(),), rounds=3,
                 memory={k: dict(module_file=__file__, impl=k, n=n) for k in ["ours", RNN_HOST]})


@pytest.mark.large
def test_merge_msmt17(side_by_side):
    """N = 32,621: input 2.1 GB float32 (ours) and 4.3 GB float64 (fastcluster). SciPy is left
    out here: its float64 input and the copy it makes (8.5 GB) beside the kept inputs exceed
    what this shared 24 GB machine has free; it is measured at N = 16,000."""
    compare(side_by_side, 32621, rounds=3, with_scipy=False)
