"""The reference-pipeline baselines agree with the plain formulas on tiny inputs."""
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from benchmarks.reference import (
    reference_cluster,
    reference_inter_camera_distance,
    reference_intra_camera,
    reference_jaccard,
    reference_rerank,
)


def _inputs(rng, n, cams, d=16, per_cam=5):
    f = rng.standard_normal((n, d)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    logits = rng.standard_normal((n, cams * per_cam)).reshape(n, cams, per_cam) * 3
    s = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    camids = rng.integers(0, cams, n)
    return f, s.reshape(n, -1).astype(np.float32), camids


def _same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("n,cams", [(1, 1), (7, 1), (23, 3), (40, 4)])
def test_inter_camera_distance_matches_eq5(rng, n, cams):
    f, s, camids = _inputs(rng, n, cams)
    mu = 0.02
    got = reference_inter_camera_distance(f, s, camids, mu)
    f64, s64 = f.astype(np.float64), s.astype(np.float64)
    want = np.empty((n, n))
    for m in range(n):
        for k in range(n):
            jac = np.minimum(s64[m], s64[k]).sum() / np.maximum(s64[m], s64[k]).sum()
            want[m, k] = 1 - f64[m] @ f64[k] - mu * jac * (camids[m] != camids[k])
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_jaccard_rows_subset_fills_only_those_rows(rng):
    _, s, _ = _inputs(rng, 30, 3)
    full = reference_jaccard(s)
    part = reference_jaccard(s, rows=[2, 17])
    np.testing.assert_array_equal(part[[2, 17]], full[[2, 17]])
    assert not part[[0, 1, 3]].any()
    np.testing.assert_allclose(np.diag(full), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="rows must index"):
        reference_jaccard(s, rows=[30])


def _rerank_oracle(dist, k1, k2, lam):
    """k-reciprocal re-ranking written with Python sets and float64, stable ranking."""
    n = len(dist)
    d = dist - dist.min(axis=0)
    d = (d / d.max(axis=0)).T
    rank = np.argsort(d, axis=1, kind="stable")

    def recip(i, k):
        return {int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    half = int(np.around(k1 / 2))
    V = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        exp = set(r)
        for c in r:
            rc = recip(c, half)
            if len(rc & r) > 2 / 3 * len(rc):
                exp |= rc
        idx = sorted(exp)
        w = np.exp(-d[i, idx])
        V[i, idx] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.empty((n, n))
    for i in range(n):
        inter = np.minimum(V[i], V).sum(axis=1)
        jac[i] = 1 - inter / (2 - inter)
    jac = np.maximum(jac, 0)
    return (1 - lam) * jac + lam * d


@pytest.mark.parametrize("n,k1,k2,lam", [(12, 4, 2, 0.3), (30, 6, 3, 0.3), (25, 5, 1, 0.0)])
def test_rerank_matches_set_oracle(rng, n, k1, k2, lam):
    x = rng.standard_normal((n, 8))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).astype(np.float32)
    got = reference_rerank(dist, k1=k1, k2=k2, lambda_value=lam)
    want = _rerank_oracle(dist.astype(np.float64), k1, k2, lam)
    assert got.dtype == np.float32 and got.shape == (n, n)
    np.testing.assert_allclose(got, want, atol=4e-3)  # V and the Jaccard are float16 as in IICS


@pytest.mark.parametrize("n", [9, 40])
def test_rerank_matches_package_reference(rng, n):
    from iics_fast.rerank import k_reciprocal_ref

    x = rng.standard_normal((n, 6))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).astype(np.float32)
    np.testing.assert_allclose(reference_rerank(dist), k_reciprocal_ref(dist), atol=1e-6)


def test_rerank_rejects_condensed_and_bad_k():
    with pytest.raises(ValueError, match="square"):
        reference_rerank(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="k1 and k2"):
        reference_rerank(np.zeros((4, 4), dtype=np.float32), k1=0)


@pytest.mark.parametrize("n,k", [(2, 1), (9, 3), (50, 7)])
def test_cluster_matches_scipy_average(rng, n, k):
    x = rng.standard_normal((n, 5))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    got = reference_cluster(dist, k)
    want = fcluster(linkage(squareform(dist, checks=False), "average"), k, criterion="maxclust")
    assert _same_partition(got, want)
    with pytest.raises(ValueError, match="n_clusters"):
        reference_cluster(dist, n + 1)


def test_intra_camera_cluster_counts(rng):
    f, _, _ = _inputs(rng, 48, 3)
    camids = np.repeat([0, 1, 2], [40, 7, 1])
    labels = reference_intra_camera(f, camids, k_intra=10)
    assert len(np.unique(labels[:40])) == 10  # enough images: k_intra clusters
    assert len(np.unique(labels[40:47])) == 3  # fewer than k_intra: n_c // 2
    assert len(np.unique(labels[47:])) == 1
    assert len(set(labels[:40]) & set(labels[40:47])) == 0
