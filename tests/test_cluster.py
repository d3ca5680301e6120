"""Agglomerative clustering (iics_fast.cluster) against SciPy, scikit-learn and a naive oracle."""
import textwrap

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from benchmarks.probes import can_reset_peak, run_python
from iics_fast import cluster, condensed
from iics_fast._native import native

# float64 runs SciPy's arithmetic (bit-identical in practice; the tolerance only allows a compiler
# that fuses the update's multiply-add). float32 stores every updated distance rounded to float32,
# ~6e-8 relative a merge level, so heights agree with SciPy on the same values to ~1e-6.
RTOL = {np.float32: 2e-5, np.float64: 1e-12}


def random_condensed(rng, n, dtype):
    """Distinct uniform distances (tie-free with probability 1)."""
    return rng.random(n * (n - 1) // 2).astype(dtype)


def as_layout(cond, layout, rng):
    """The condensed array, or a square one carrying it in its upper triangle. The square's lower
    triangle and diagonal are junk, so only an upper-triangle reader can pass."""
    if layout == "condensed":
        return cond
    n = condensed.points(cond.size)
    sq = rng.random((n, n)).astype(cond.dtype) * 10 - 5
    sq[np.triu_indices(n, 1)] = cond
    return sq


def same_partition(a, b):
    return adjusted_rand_score(a, b) == 1.0


@pytest.mark.parametrize("layout", ["condensed", "square"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 251])
def test_average_matches_scipy(n, dtype, layout, rng):
    cond = random_condensed(rng, n, dtype)
    Z = cluster.linkage(as_layout(cond, layout, rng))
    Zr = cluster.linkage_ref(cond)  # SciPy on the same (float32) values, in float64
    assert Z.shape == (max(n - 1, 0), 4) and Z.dtype == np.float64
    np.testing.assert_allclose(Z[:, 2], Zr[:, 2], rtol=RTOL[dtype], atol=0)
    np.testing.assert_array_equal(Z[:, [0, 1, 3]], Zr[:, [0, 1, 3]])
    for k in sorted({1, min(2, n), max(1, n // 3), max(1, n - 1), n}):
        labels = cluster.agglomerative(as_layout(cond, layout, rng), n_clusters=k)
        assert labels.dtype == np.int64 and len(np.unique(labels)) == k
        np.testing.assert_array_equal(labels, cluster.agglomerative_ref(cond, n_clusters=k))
        if n > 1:
            assert same_partition(labels, fcluster(Zr, k, "maxclust"))


@pytest.mark.parametrize("method", ["single", "complete", "weighted"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_other_methods_match_scipy(method, dtype, rng):
    cond = random_condensed(rng, 120, dtype)
    Z = cluster.linkage(cond, method=method)
    Zr = cluster.linkage_ref(cond, method=method)
    np.testing.assert_allclose(Z[:, 2], Zr[:, 2], rtol=RTOL[dtype], atol=0)
    for k in (2, 7, 40):
        labels = cluster.agglomerative(cond, n_clusters=k, method=method)
        assert same_partition(labels, fcluster(Zr, k, "maxclust"))


@pytest.mark.parametrize("method", sorted(cluster.METHODS))
@pytest.mark.parametrize("n", [2, 3, 9, 30])
def test_matches_naive_oracle(method, n, rng):
    cond = random_condensed(rng, n, np.float64)
    Z = cluster.linkage(cond, method=method)
    Zn = cluster.linkage_naive_ref(cond, method=method)
    np.testing.assert_allclose(Z[:, 2], Zn[:, 2], rtol=1e-12)
    np.testing.assert_array_equal(Z[:, [0, 1, 3]], Zn[:, [0, 1, 3]])


def test_threshold_matches_sklearn(rng):
    n = 80
    sq = rng.random((n, n))  # not symmetric: only the upper triangle may count
    cond = sq[np.triu_indices(n, 1)]
    h = cluster.linkage_ref(cond)[:, 2]
    # between heights, exactly at heights (a merge of height == threshold is not done), outside
    thresholds = [h[0] - 1, h[0], (h[10] + h[11]) / 2, h[40], (h[-2] + h[-1]) / 2, h[-1], h[-1] + 1]
    for t in thresholds:
        labels = cluster.agglomerative(sq, distance_threshold=t)
        np.testing.assert_array_equal(labels,
                                      cluster.agglomerative_ref(cond, distance_threshold=t))
        assert len(np.unique(labels)) == np.count_nonzero(h >= t) + 1
        ref = AgglomerativeClustering(n_clusters=None, distance_threshold=max(t, 0.0),
                                      metric="precomputed", linkage="average").fit(sq).labels_
        if t >= 0:
            assert same_partition(labels, ref)
    for dtype in (np.float32, np.float64):  # float32: the same cut on the rounded values
        c32 = cond.astype(dtype)
        t = float((cluster.linkage_ref(c32)[30, 2] + cluster.linkage_ref(c32)[31, 2]) / 2)
        assert same_partition(cluster.agglomerative(c32, distance_threshold=t),
                              fcluster(cluster.linkage_ref(c32), t, "distance"))


def test_square_reads_upper_triangle_like_sklearn(rng):
    n = 150
    sq = rng.random((n, n)).astype(np.float32)  # asymmetric, junk diagonal
    cond = sq[np.triu_indices(n, 1)]
    Zr = cluster.linkage_ref(cond)
    np.testing.assert_allclose(cluster.linkage(sq)[:, 2], Zr[:, 2], rtol=RTOL[np.float32])
    for k in (3, 20):
        ref = AgglomerativeClustering(n_clusters=k, metric="precomputed",
                                      linkage="average").fit(sq.astype(np.float64)).labels_
        assert same_partition(cluster.agglomerative(sq, n_clusters=k), ref)
    assert not same_partition(cluster.agglomerative(sq.T.copy(), n_clusters=20),
                              cluster.agglomerative(sq, n_clusters=20))


def test_ties(rng):
    """Many equal distances. Which tied pair merges first is a convention, and for average
    linkage it changes later heights, not only the partition. float64 takes SciPy's choices
    (previous chain element first, then the lowest index) with SciPy's arithmetic, so the whole
    tree is SciPy's. float32 rounds merged distances differently, so ties in exact arithmetic can
    break the other way: only tie-independent facts are checked there (single-linkage heights, the
    first height, the all-tied case). SciPy's single linkage is a different algorithm (via the
    minimum spanning tree), so there only the heights, which ties do not change, are compared."""
    cond = rng.integers(1, 5, size=60 * 59 // 2).astype(np.float64)
    for method in ("average", "complete", "weighted"):
        np.testing.assert_array_equal(cluster.linkage(cond, method),
                                      cluster.linkage_ref(cond, method))
    np.testing.assert_array_equal(cluster.linkage(cond, "single")[:, 2],
                                  cluster.linkage_ref(cond, "single")[:, 2])
    c32 = cond.astype(np.float32)
    np.testing.assert_array_equal(cluster.linkage(c32, "single")[:, 2],
                                  cluster.linkage_ref(c32, "single")[:, 2])
    Z = cluster.linkage(c32)
    assert Z[0, 2] == 1 and np.all(np.diff(Z[:, 2]) >= 0) and Z[-1, 3] == 60
    ones = np.ones(10 * 9 // 2, np.float32)  # all tied: every merge at height 1
    np.testing.assert_array_equal(cluster.linkage(ones)[:, 2], np.ones(9))



@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("levels", [4, 60])
@pytest.mark.parametrize("method", ["average", "complete", "weighted"])
def test_cached_neighbours_with_ties_match_scipy(method, levels, threads, rng):
    """The chain's cached nearest neighbours (each slot's minimum over its lower and its higher
    slots, kept across merges) must answer as full scans do, ties included: with integer
    distances of few or many levels and enough points for several compactions, the whole float64
    tree is SciPy's, on one thread and with every scan and update threaded."""
    n = 300
    cond = rng.integers(1, levels + 1, size=n * (n - 1) // 2).astype(np.float64)
    Z = native().cluster_linkage(cond, cluster.METHODS[method], False, threads)
    np.testing.assert_array_equal(Z, cluster.linkage_ref(cond, method))

def test_clustered_cosine_distances_match_scipy(rng):
    """A realistic input: Gaussian blobs of unit feature vectors, cosine distance, float32."""
    n, k, dim = 400, 10, 32
    centers = rng.standard_normal((k, dim))
    x = centers[rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, dim))
    cond = pdist(x, "cosine").astype(np.float32)
    Zr = cluster.linkage_ref(cond)
    np.testing.assert_allclose(cluster.linkage(cond)[:, 2], Zr[:, 2], rtol=RTOL[np.float32])
    for kk in (k, 25, 100):
        labels = cluster.agglomerative(squareform(cond), n_clusters=kk)
        assert same_partition(labels, fcluster(Zr, kk, "maxclust"))
    t = cluster.quantile_threshold(cond, 0.0025)
    labels = cluster.agglomerative(cond, distance_threshold=t)
    assert same_partition(labels, cluster.agglomerative_ref(cond, distance_threshold=t))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_path_matches_serial(dtype, rng):
    """Every scan and update on the OpenMP team (normally used only where timing shows it pays)."""
    cond = random_condensed(rng, 40, dtype)
    C = native()
    Z = C.cluster_linkage(cond, 2, False, True)
    np.testing.assert_array_equal(Z, C.cluster_linkage(cond, 2, False, False))
    np.testing.assert_allclose(Z[:, 2], cluster.linkage_ref(cond)[:, 2], rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inplace_and_torch(dtype, rng):
    n = 50
    cond = random_condensed(rng, n, dtype)
    sq = as_layout(cond, "square", rng)
    want = cluster.linkage(cond)
    kept = sq.copy()
    np.testing.assert_array_equal(cluster.linkage(sq), want)  # inplace=False keeps the input
    np.testing.assert_array_equal(sq, kept)
    np.testing.assert_array_equal(cluster.linkage(sq, inplace=True), want)
    assert not np.array_equal(sq, kept)  # the buffer was used as the work space
    buf = cond.copy()
    np.testing.assert_array_equal(cluster.linkage(buf, inplace=True), want)
    t = torch.from_numpy(squareform(cond.astype(np.float64)).astype(dtype))
    np.testing.assert_array_equal(cluster.agglomerative(t, n_clusters=5, inplace=True),
                                  cluster.agglomerative(cond, n_clusters=5))
    # other real dtypes are converted (inplace=False only)
    ints = rng.permutation(n * (n - 1) // 2).astype(np.int32)
    np.testing.assert_array_equal(cluster.linkage(ints), cluster.linkage_ref(ints))


def test_labels_numbered_by_first_appearance(rng):
    labels = cluster.agglomerative(random_condensed(rng, 100, np.float64), n_clusters=13)
    firsts = [np.flatnonzero(labels == c)[0] for c in range(13)]
    assert labels[0] == 0 and firsts == sorted(firsts)


# The peak resident set of a fresh process (VmHWM). Not ru_maxrss: a child's ru_maxrss starts from
# its parent's resident size at fork, so under pytest it would hide the child's own growth.
PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from benchmarks.probes import PeakMemory
    from iics_fast import cluster

    n, inplace = int(sys.argv[1]), sys.argv[2] == "1"
    x = np.random.default_rng(0).random((n, n), dtype=np.float32)
    cluster.linkage(x[:3, :3].copy())  # load the extension before the baseline
    with PeakMemory() as mem:
        Z = cluster.linkage(x, inplace=inplace)
    print(mem.grew_mib * 2**20)
""")


@pytest.mark.skipif(not can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
@pytest.mark.parametrize("inplace", [True, False])
def test_peak_memory(inplace):
    """In place: the process peak grows by O(n) only; otherwise by one condensed copy (half a
    square matrix). N = 6000 float32: the square buffer is 144 MB."""
    n = 6000
    square_bytes = n * n * 4
    grew = float(run_python(PEAK_SCRIPT, n, int(inplace)).split()[-1])
    if inplace:
        assert grew < 0.05 * square_bytes, grew
    else:
        assert 0.4 * square_bytes < grew < 0.6 * square_bytes, grew


def test_bad_input_raises_before_any_work(rng):
    cond = random_condensed(rng, 10, np.float64)
    for bad in (np.nan, np.inf, -np.inf):
        buf = cond.copy()
        buf[7] = bad
        kept = buf.copy()
        with pytest.raises(ValueError, match="NaN or infinite"):
            cluster.linkage(buf, inplace=True)
        np.testing.assert_array_equal(buf, kept)
    sq = squareform(cond)
    sq[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"pair \(2, 5\)"):
        cluster.agglomerative(sq, n_clusters=2)
    sq[2, 5], sq[5, 2], sq[3, 3] = 1.0, np.nan, np.nan  # ignored: not in the upper triangle
    cluster.agglomerative(sq, n_clusters=2)
    with pytest.raises(ValueError, match="not n\\*\\(n-1\\)/2"):
        cluster.linkage(np.zeros(7))
    with pytest.raises(ValueError, match="square"):
        cluster.linkage(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="square"):
        cluster.linkage(np.zeros((0, 0)))
    with pytest.raises(ValueError, match="dimensions"):
        cluster.linkage(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="method"):
        cluster.linkage(cond, method="ward")
    with pytest.raises(ValueError, match="C-contiguous"):
        cluster.linkage(np.zeros(90)[::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        cluster.linkage(np.asfortranarray(rng.random((5, 5))))
    ro = cond.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cluster.linkage(ro, inplace=True)
    cluster.linkage(ro)  # fine without inplace
    with pytest.raises(TypeError, match="float32 or float64"):
        cluster.linkage(cond.astype(np.float16), inplace=True)
    with pytest.raises(TypeError, match="real numbers"):
        cluster.linkage(cond.astype(np.complex128))
    with pytest.raises(TypeError, match="NumPy array"):
        cluster.linkage(list(cond))
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(2**31 + 1,) * 2,
                                           strides=(0, 0))  # 2^31 + 1 points, no memory
    with pytest.raises(ValueError, match="at most"):
        cluster.linkage(huge)
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match="outside 1..10"):
            cluster.agglomerative(cond, n_clusters=k)
    for k in (2.0, True):
        with pytest.raises(TypeError, match="integer"):
            cluster.agglomerative(cond, n_clusters=k)
    with pytest.raises(ValueError, match="NaN"):
        cluster.agglomerative(cond, distance_threshold=float("nan"))
    with pytest.raises(ValueError, match="exactly one"):
        cluster.agglomerative(cond)
    with pytest.raises(ValueError, match="exactly one"):
        cluster.agglomerative(cond, n_clusters=2, distance_threshold=0.5)


def test_negative_distances_allowed(rng):
    cond = random_condensed(rng, 40, np.float64) - 0.5
    np.testing.assert_array_equal(cluster.linkage(cond), cluster.linkage_ref(cond))


def test_single_point():
    for dist in (np.zeros(0), np.zeros((1, 1), np.float32)):
        assert cluster.linkage(dist).shape == (0, 4)
        np.testing.assert_array_equal(cluster.agglomerative(dist, n_clusters=1), [0])
        np.testing.assert_array_equal(cluster.agglomerative(dist, distance_threshold=1.0), [0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantile_threshold_matches_partition(dtype, rng):
    for m in (1, 2, 45, 1000, 3_000_001):
        x = (rng.standard_normal(m) * 3).astype(dtype)
        if m > 2:
            x[: m // 3] = x[m // 3: 2 * (m // 3)]  # duplicates
            x[5] = -0.0
            x[m // 2: m // 2 + m // 10] = 0.0  # exact zeros, which the reference drops
        nonzero = x[x != 0]
        for q in (0.0, 0.0017, 0.0025, 0.5, 0.999, np.nextafter(1.0, 0.0)):
            r = int(np.round(q * len(nonzero)))
            if r >= len(nonzero):  # the reference's index would be out of range
                with pytest.raises(ValueError, match="0 <= q < 1"):
                    cluster.quantile_threshold(x, q)
                continue
            want = np.partition(nonzero, r)[r]
            got = cluster.quantile_threshold(x, q)
            assert got == want and isinstance(got, float)
            if m <= 1000:
                assert got == cluster.quantile_threshold_ref(x, q)
    assert cluster.quantile_threshold(torch.tensor([3.0, 1.0, 2.0]), 0.5) == 3.0  # round(1.5) = 2
    assert cluster.quantile_threshold(np.array([3, 0, 1, 2]), 0.3) == 2.0  # zeros dropped


def test_quantile_threshold_rejects_bad_input():
    x = np.arange(10.0)
    for q in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="0 <= q < 1"):
            cluster.quantile_threshold(x, q)
    with pytest.raises(ValueError, match="0 <= q < 1"):
        cluster.quantile_threshold(x, float("nan"))
    with pytest.raises(ValueError, match="empty"):
        cluster.quantile_threshold(np.zeros(0), 0.5)
    with pytest.raises(ValueError, match="every distance is 0"):
        cluster.quantile_threshold(np.zeros(6), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        cluster.quantile_threshold(np.zeros((3, 3)), 0.5)
    y = x.copy()
    y[3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        cluster.quantile_threshold(y, 0.5)


def test_threaded_one_pass_operations(rng):
    """Above 2^25 entries the finiteness check and the selection run threaded."""
    m = 2**25 + 3
    x = rng.standard_normal(m, dtype=np.float32)
    nonzero = x[x != 0]
    for q in (0.0017, 0.5):
        r = int(np.round(q * len(nonzero)))
        assert cluster.quantile_threshold(x, q) == np.partition(nonzero, r)[r]
    x[m - 2] = np.inf
    x[m - 5] = np.nan
    assert native().cluster_first_nonfinite(x) == m - 5


@pytest.mark.parametrize("q", [0.0, 0.0017, 0.0025, 0.3, 0.5, 0.9])
def test_threshold_is_the_reference_code_s(q, rng):
    """The threshold variant's rule as the reference code writes it (cluster_threshold.py):
    triu(dist, 1), its nonzero entries sorted, the one at np.round(eph * size). A re-ranked
    matrix (not symmetric) with exact zeros and ties off the diagonal."""
    from iics_fast import condensed, pipeline

    n = 60
    d = np.round(rng.random((n, n)) * 8).astype(np.float32) / 8  # ties and exact zeros
    np.fill_diagonal(d, 0.0)
    tri_mat = np.triu(d, 1)
    tri_mat = tri_mat[np.nonzero(tri_mat)]
    tri_mat = np.sort(tri_mat, axis=None)
    eps = tri_mat[np.round(q * tri_mat.size).astype(int)]
    assert (condensed.upper(d) == 0).sum() > 0
    assert pipeline.threshold(condensed.upper(d), q) == eps


# ------------------------------------------------ reciprocal-nearest-neighbour merge (host and CUDA)


def rnn_host(cond, method="average"):
    """The host instantiation of the RNN passes (the CUDA merge's per-pass code) on a copy."""
    return native().cluster_linkage(cond, cluster.METHODS[method], False, False, True)


def is_valid_dendrogram(Z, cond, method, rtol):
    """Replays Z on the float64 distances: every merge joins a closest pair of live clusters (within
    rtol) at that pair's Lance-Williams distance. True for any exact dendrogram, whatever the
    tie-breaking."""
    n = Z.shape[0] + 1
    D = squareform(cond.astype(np.float64))
    np.fill_diagonal(D, np.inf)
    slot, size, live = {i: i for i in range(n)}, np.ones(n), np.ones(n, bool)
    for r, (a, b, h, _) in enumerate(Z):
        i, j = sorted((slot.pop(int(a)), slot.pop(int(b))))
        closest = D[np.ix_(live, live)].min()
        if not (np.isclose(D[i, j], closest, rtol=rtol, atol=0)
                and np.isclose(h, D[i, j], rtol=rtol, atol=0)):
            return False
        others = np.flatnonzero(live)
        si, sj = size[i], size[j]
        if method == "average":
            new = (si * D[i, others] + sj * D[j, others]) / (si + sj)
        elif method == "single":
            new = np.minimum(D[i, others], D[j, others])
        elif method == "complete":
            new = np.maximum(D[i, others], D[j, others])
        else:
            new = 0.5 * (D[i, others] + D[j, others])
        D[j, others] = D[others, j] = new
        D[j, j] = np.inf
        live[i] = False
        D[i, :] = D[:, i] = np.inf
        size[j] = si + sj
        slot[n + r] = j
    return True


@pytest.mark.parametrize("method", sorted(cluster.METHODS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 251, 1000])
def test_rnn_matches_scipy(n, dtype, method, rng):
    """Tie-free inputs: SciPy's merges and partitions at every cut. Heights: single and complete
    take no arithmetic, so they are SciPy's bit for bit; average and weighted agree to a few ulps in
    float64 (the passes apply the same merges in another order, so a cluster distance can be
    accumulated in another order) and within float32 rounding otherwise."""
    cond = random_condensed(rng, n, dtype)
    Z = rnn_host(cond, method)
    Zr = cluster.linkage_ref(cond, method)
    assert Z.shape == (max(n - 1, 0), 4)
    rtol = 0 if method in ("single", "complete") else {np.float32: 2e-5, np.float64: 1e-13}[dtype]
    np.testing.assert_allclose(Z[:, 2], Zr[:, 2], rtol=rtol, atol=0)
    if method != "single":  # SciPy's single linkage names clusters by its MST order
        np.testing.assert_array_equal(Z[:, [0, 1, 3]], Zr[:, [0, 1, 3]])
    for k in sorted({1, max(1, n // 2), max(1, n - 3), n}):
        labels = native().cluster_cut(Z, n, n - k)
        assert same_partition(labels, cluster.agglomerative_ref(cond, n_clusters=k, method=method))


def test_rnn_float64_matches_chain_on_most_entries(rng):
    """A check that the float64 agreement above is a matter of ulps, not luck: the passes and the
    chain agree on every merge and its cluster, and heights differ by at most 4 ulps."""
    cond = random_condensed(rng, 700, np.float64)
    Z, Zc = rnn_host(cond), cluster.linkage(cond)
    np.testing.assert_array_equal(Z[:, [0, 1, 3]], Zc[:, [0, 1, 3]])
    assert np.all(np.abs(Z[:, 2] - Zc[:, 2]) <= 4 * np.spacing(Zc[:, 2]))


@pytest.mark.parametrize("method", sorted(cluster.METHODS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rnn_ties_give_a_valid_dendrogram(method, dtype, rng):
    """Integer distances, many ties. Any exact algorithm may break them its own way (the passes by
    the lowest index, SciPy by its chain), so the checks are the tie-independent ones: Z replays as
    an exact dendrogram of the data, heights ascend, the single-linkage heights and the first
    height are SciPy's, and an all-tied input merges everything at that height."""
    for n in (2, 3, 40, 97):
        cond = rng.integers(1, 5, size=n * (n - 1) // 2).astype(dtype)
        Z = rnn_host(cond, method)
        assert np.all(np.diff(Z[:, 2]) >= 0) and Z[-1, 3] == n
        assert is_valid_dendrogram(Z, cond, method, rtol=1e-5 if dtype == np.float32 else 1e-12)
        Zr = cluster.linkage_ref(cond, method)
        assert Z[0, 2] == Zr[0, 2]
        if method == "single":
            np.testing.assert_array_equal(Z[:, 2], Zr[:, 2])
    ones = np.ones(12 * 11 // 2, dtype)
    np.testing.assert_array_equal(rnn_host(ones, method)[:, 2], np.ones(11))


def test_rnn_valid_dendrogram_check_can_fail(rng):
    """The replay check rejects a tree that merges a pair that is not the closest."""
    cond = random_condensed(rng, 12, np.float64)
    Z = rnn_host(cond)
    assert is_valid_dendrogram(Z, cond, "average", 1e-12)
    bad = Z.copy()
    bad[0, :2] = [0, 1] if list(bad[0, :2]) != [0, 1] else [0, 2]
    assert not is_valid_dendrogram(bad, cond, "average", 1e-12)


def test_rnn_clustered_cosine_distances(rng):
    """Blobs of feature vectors, cosine distance, float32, as a clustering round hands over."""
    n, k, dim = 600, 40, 32
    centers = rng.standard_normal((k, dim))
    x = centers[rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, dim))
    cond = pdist(x, "cosine").astype(np.float32)
    Z, Zr = rnn_host(cond), cluster.linkage_ref(cond)
    np.testing.assert_allclose(Z[:, 2], Zr[:, 2], rtol=2e-5)
    for kk in (k, 100, 300):
        assert same_partition(native().cluster_cut(Z, n, n - kk), fcluster(Zr, kk, "maxclust"))


def test_rnn_pass_counts(rng):
    """The per-pass work record: passes merge every point once, each pass at least one pair, live
    counts fall by the merges, and the accesses of a pass cover its rescans and updates."""
    n = 300
    cond = random_condensed(rng, n, np.float32)
    Z, P = native().cluster_rnn_passes(cond, cluster.METHODS["average"])
    np.testing.assert_array_equal(Z, rnn_host(cond))
    live, merges, rescans, strided, contiguous = P.T
    assert merges.sum() == n - 1 and np.all(merges >= 1)
    assert live[0] == n and np.array_equal(live[1:], live[:-1] - merges[:-1])
    assert rescans[0] == n and np.all(rescans[1:] >= merges[:-1])
    np.testing.assert_array_equal(strided + contiguous, (rescans + 3 * merges) * (live - 1))
    Z, P = native().cluster_rnn_passes(np.zeros(0, np.float32), 2)
    assert Z.shape == (0, 4) and P.shape == (0, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 3, 257, 1000, 4099])
def test_cuda_merge_equals_host_passes(n, device, rng):
    """On a GPU the device instantiation equals the host one bit for bit (same code, same
    rounding), and SciPy within float32 rounding; N not a multiple of any block size."""
    cond = random_condensed(rng, n, np.float32)
    t = torch.from_numpy(cond).to(device)
    for method in sorted(cluster.METHODS):
        Z = cluster.linkage(t, method=method)
        np.testing.assert_array_equal(Z, rnn_host(cond, method))
        np.testing.assert_allclose(Z[:, 2], cluster.linkage_ref(cond, method)[:, 2], rtol=2e-5)
    assert torch.equal(t.cpu(), torch.from_numpy(cond))  # inplace=False kept it
    ties = torch.from_numpy(rng.integers(1, 5, size=n * (n - 1) // 2).astype(np.float32))
    np.testing.assert_array_equal(cluster.linkage(ties.to(device), inplace=True),
                                  rnn_host(ties.numpy()))
    k = max(1, n // 3)
    np.testing.assert_array_equal(cluster.agglomerative(t, n_clusters=k),
                                  native().cluster_cut(rnn_host(cond), n, n - k))


@pytest.mark.gpu
def test_cuda_merge_rejects_bad_input(device):
    x = torch.rand(45, device=device)
    with pytest.raises(TypeError, match="float32"):
        cluster.linkage(x.double())
    with pytest.raises(ValueError, match="condensed"):
        cluster.linkage(torch.rand(10, 10, device=device))
    y = x.clone()
    y[7] = float("nan")
    with pytest.raises(ValueError, match=r"pair \(0, 8\)"):
        cluster.linkage(y)


def test_cuda_tensor_without_cuda_build_says_how_to_build(monkeypatch):
    """A CUDA tensor given to an extension built without CUDA: an error naming the fix. (A meta
    tensor stands in for the CUDA one; only the dispatch is exercised.)"""
    monkeypatch.setattr(cluster, "_is_cuda", lambda x: True)
    monkeypatch.setattr(cluster, "native", lambda: object())
    with pytest.raises(RuntimeError, match="IICS_WITH_CUDA=1"):
        cluster.linkage(torch.empty(45, device="meta"))


@pytest.mark.slow
def test_cuda_kernels_compile_for_sm80_sm90_without_spills():
    """Every kernel of csrc/cuda, compiled by nvcc for sm_80 and sm_90: no register spills, and
    the merge's kernels are all there (a renamed or dropped kernel fails here)."""
    from benchmarks import gpu_cuda

    if gpu_cuda.nvcc() is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here (set CUDA_HOME)")
    kernels = gpu_cuda.compile_all((80, 90))
    for arch in (80, 90):
        names = {k.kernel for k in kernels if k.arch == arch}
        assert {"rnn_init", "rnn_rescan", "rnn_pairs", "rnn_update", "rnn_finish"} <= names
    for k in kernels:
        assert k.spill_bytes == 0 and k.stack_bytes == 0, k
        assert 0 < k.registers <= 64, k  # the launch bounds allow 1024 threads a block


def test_ptxas_parser_reads_spills():
    """The parser behind the compile check sees spills when ptxas reports them."""
    from benchmarks.gpu_cuda import parse_ptxas

    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem"""
    (k,) = parse_ptxas(text, "x.cu")
    assert (k.kernel, k.arch, k.registers, k.spill_bytes, k.stack_bytes, k.shared_bytes) == (
        "foo", 90, 255, 8, 8, 512)


def test_merge_estimate_model(rng):
    """The bandwidth model of the CUDA merge on measured passes: bytes and fixed costs add up."""
    from benchmarks import gpu_cuda as G

    passes = np.array([[100, 30, 100, 1000, 2000], [70, 1, 31, 10, 20]])
    want = [(32 * 1000 + 4 * 2000 + 48 * 100) / G.H100_BYTES_PER_S
            + 100 * 48 / (G.H100_BYTES_PER_S / G.H100_SMS),
            (32 * 10 + 4 * 20 + 48 * 70) / G.H100_BYTES_PER_S
            + 70 * 48 / (G.H100_BYTES_PER_S / G.H100_SMS)]
    fixed = 2 * G.ROUND_TRIP_S + 4 * G.LAUNCH_S
    floor = np.array([1, 1]) * G.LATENCY_S  # 100 and 70 live: one trip of 256 threads
    np.testing.assert_allclose(G.pass_seconds(passes), np.array(want) + fixed + floor)
    e = G.merge_estimate(n=400, ids=50, cameras=3)
    assert e["passes"] == len(e["passes_table"]) and e["passes_table"][:, 1].sum() == 399
    assert 0 < e["estimate_s"] < 1
