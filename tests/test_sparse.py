"""iics_fast.sparse: the inter-camera round without an N x N matrix, held to the dense round.

Sparse scores against their row-by-row reference and the stated Jaccard bound; the native
sums, pair products and graph linkage against plain NumPy references; the whole round on the
complete graph (k = N - 1, eps = 0) equal to the dense round's partition in both similarities,
and on a k-NN graph within ARI of it; two gloo processes equal to one."""
import os
import socket
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from iics_fast import sparse as S


def _softmax_blocks(rng, n, dims, temperature):
    out = []
    for k in dims:
        z = rng.standard_normal((n, k)) * temperature
        z = np.exp(z - z.max(1, keepdims=True))
        out.append(z / z.sum(1, keepdims=True))
    return np.concatenate(out, 1).astype(np.float32)


def _problem(rng, n, cams, d=24, ids=None):
    """Features of identities seen by several cameras, and peaked per-camera scores."""
    ids = ids or max(2, n // 6)
    who = rng.integers(0, ids, n)
    cam = rng.integers(0, cams, n)
    centres = rng.standard_normal((ids, d))
    f = centres[who] + 0.6 * rng.standard_normal((n, d)) + 0.3 * rng.standard_normal((cams, d))[cam]
    dims = [int(rng.integers(3, 9)) for _ in range(cams)]
    heads = [rng.standard_normal((k, d)) for k in dims]
    logits = [3.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ h.T for h in heads]
    expz = [np.exp(z - z.max(1, keepdims=True)) for z in logits]
    scores = np.concatenate([e / e.sum(1, keepdims=True) for e in expz], 1)
    return f.astype(np.float32), scores.astype(np.float32), cam, dims


# ----------------------------------------------------------------------------- sparse scores


@pytest.mark.parametrize("eps,cap", [(0.0, None), (1e-3, None), (0.1, None), (0.05, 2), (0.3, 1)])
def test_sparsifier_matches_reference(rng, eps, cap):
    dims = [1, 5, 12, 7]
    s = _softmax_blocks(rng, 37, dims, 2.0)
    s[3, 1:6] = 0.2  # ties inside a block
    got = S.sparse_scores(s, dims, eps=eps, max_per_block=cap, batch=10)
    ref = S.sparse_scores_ref(s, dims, eps, cap)
    np.testing.assert_array_equal(got.ptr, ref.ptr)
    np.testing.assert_array_equal(got.col, ref.col)
    np.testing.assert_array_equal(got.val, ref.val)
    np.testing.assert_allclose(got.dropped, ref.dropped, atol=1e-6)
    if cap is None:  # every block keeps at least 1 - eps of its mass
        dense, start = got.dense(), 0
        for k in dims:
            assert (dense[:, start:start + k].sum(1) >= (1 - eps) * s[:, start:start + k].sum(1) - 1e-6).all()
            start += k


def test_sparsifier_rows_and_samples_survive_batching(rng):
    dims = [4, 6]
    s = _softmax_blocks(rng, 50, dims, 1.0)
    whole = S.sparse_scores(s, dims, sample=7)
    parts = S.SparseScores.concat([S.sparse_scores(s[:20], dims, sample=7, n_total=50),
                                   _offset_part(s[20:], dims, 20, 50)])
    for a, b in ((whole, parts), (whole.rows(0, 50), whole)):
        for key in ("ptr", "col", "val", "sample_rows", "sample_scores"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_array_equal(whole.sample_rows, S.sample_rows(50, 7))
    np.testing.assert_array_equal(whole.sample_scores, s[S.sample_rows(50, 7)])


def _offset_part(s, dims, offset, n_total):
    sp = S.ScoreSparsifier(dims, 1e-3, 32, n_total=n_total, sample=7, offset=offset)
    sp.add(s)
    return sp.finish()


@pytest.mark.parametrize("eps,cap", [(0.01, None), (0.1, None), (0.2, 3), (0.0, 2)])
def test_jaccard_error_within_bound(rng, eps, cap):
    dims = [9, 14, 6]
    s = _softmax_blocks(rng, 60, dims, 1.5)
    sp = S.sparse_scores(s, dims, eps=eps, max_per_block=cap)
    ei, ej = np.triu_indices(60, 1)
    dense = torch.from_numpy(s).double()
    m = torch.minimum(dense[ei], dense[ej]).sum(1).numpy()
    exact = m / (dense.sum(1).numpy()[ei] + dense.sum(1).numpy()[ej] - m)
    kept = S.jaccard_on_edges(sp, ei, ej, tail=False)
    even = S.jaccard_on_edges(sp, ei, ej, tail=True)
    bound = S.jaccard_error_bound(sp, ei, ej)
    assert (exact - kept >= -1e-6).all()  # J~ never above J
    assert (exact - kept <= bound + 1e-6).all()
    assert (np.abs(exact - even) <= bound + 1e-6).all()
    assert (exact - kept).max() > 0  # the truncation did drop something
    if cap is None:
        assert bound.max() <= 4 * eps + 1e-6
    else:  # flat blocks cut hard: spreading the dropped mass evenly is the better estimate
        assert np.abs(exact - even).mean() < np.abs(exact - kept).mean()


@pytest.mark.parametrize("weight", [1.0, 0.37])
def test_even_tail_sums_against_dense(rng, weight):
    """Kept-on-both minima plus `weight` x the rest of the minima of the tail-filled rows."""
    dims = [5, 8, 1]
    s = _softmax_blocks(rng, 30, dims, 0.7)
    sp = S.sparse_scores(s, dims, eps=0.2, max_per_block=3)
    sp.tail_weight = weight
    trunc = sp.dense()
    est, start = sp.dense(), 0
    for b, k in enumerate(dims):  # every dropped entry holds its block's tail level
        block = est[:, start:start + k]
        block[block == 0] = np.repeat(sp.tail[:, b:b + 1], k, 1)[block == 0]
        start += k
    ei, ej = rng.integers(0, 30, 200), rng.integers(0, 30, 200)
    both = np.minimum(trunc[ei], trunc[ej]).sum(1)
    np.testing.assert_allclose(S.sparse_min_sums(sp, ei, ej, tail=True),
                               both + weight * (np.minimum(est[ei], est[ej]).sum(1) - both), rtol=1e-5)
    ref = S.sparse_scores_ref(s, dims, 0.2, 3)
    np.testing.assert_allclose(sp.tail, ref.tail, rtol=1e-6, atol=1e-7)


def test_fitted_tail_weight(rng):
    """The least-squares weight on the rows kept whole, within [0, 1]; on flat heads cut hard it
    brings J closer than the even tail does, and stays within the stated bound."""
    from iics_fast.similarity import pairwise_jaccard
    n, dims = 300, [40, 25, 33]
    s = _softmax_blocks(rng, n, dims, 0.3)
    cam = rng.integers(0, 3, n)
    sp = S.sparse_scores(s, dims, eps=1e-3, max_per_block=4, sample=60)
    w = S.fit_tail_weight(sp, cam, rows=40)
    rows = sp.sample_rows[S.sample_rows(60, 40)]
    a, b = np.triu_indices(40, 1)
    a, b = rows[a], rows[b]
    a, b = a[cam[a] != cam[b]], b[cam[a] != cam[b]]
    J = pairwise_jaccard(torch.from_numpy(s)).numpy().astype(np.float64)
    m = J[a, b] * (s[a].sum(1) + s[b].sum(1)) / (1 + J[a, b])
    kept = np.minimum(sp.dense()[a], sp.dense()[b]).sum(1)
    tail = S.sparse_min_sums(sp, a, b, tail=True) - kept
    assert 0 < w < 1
    assert w == pytest.approx(np.clip(np.linalg.lstsq(tail[:, None], m - kept, rcond=None)[0][0], 0, 1), rel=1e-4)
    ei, ej = rng.integers(0, n, 2000), rng.integers(0, n, 2000)
    even = S.jaccard_on_edges(sp, ei, ej)
    sp.tail_weight = w
    fitted = S.jaccard_on_edges(sp, ei, ej)
    assert np.abs(J[ei, ej] - fitted).mean() < 0.5 * np.abs(J[ei, ej] - even).mean()
    assert (np.abs(J[ei, ej] - fitted) <= S.jaccard_error_bound(sp, ei, ej) + 1e-5).all()
    whole = S.sparse_scores(s, dims, eps=0.0, max_per_block=None, sample=60)
    assert S.fit_tail_weight(whole, cam) == 1.0  # nothing dropped: nothing to fit


def test_min_sums_against_dense(rng):
    dims = [5, 8]
    s = _softmax_blocks(rng, 30, dims, 3.0)
    sp = S.sparse_scores(s, dims, eps=0.05)
    trunc = sp.dense()
    ei, ej = rng.integers(0, 30, 200), rng.integers(0, 30, 200)
    np.testing.assert_allclose(S.sparse_min_sums(sp, ei, ej), np.minimum(trunc[ei], trunc[ej]).sum(1), rtol=1e-6)


def tile_variants():
    """The instruction sets of tile_jaccard's lookups this CPU runs: "plain" always, "avx512"
    where present (the public path picks the widest)."""
    sp = S.sparse_scores(np.ones((1, 2), np.float32) / 2, [2], eps=0.0)
    names = ["plain"]
    try:
        S.tile_jaccard(sp, np.zeros(1), np.array([0, 1]), np.zeros(1), np.array([0, 1]), isa="avx512")
        names.append("avx512")
    except ValueError:
        pass
    return names


@pytest.mark.parametrize("isa", tile_variants())
@pytest.mark.parametrize("eps,cap,tail", [(0.2, 3, True), (0.2, 3, False), (0.0, None, True), (0.05, 1, True)])
def test_tile_jaccard_equals_pairwise(rng, eps, cap, tail, isa):
    """J of every pair of each tile (awkward shapes: 1 x 1, 1 x many, many x 1, an empty side,
    repeated members, rows with nothing kept in a head, a head wider than one 16-lane gather)
    equals jaccard_on_edges on the pairs, with 0 within a camera when camids are given, for
    each instruction set."""
    dims = [5, 8, 1, 12, 37]
    n = 40
    s = _softmax_blocks(rng, n, dims, 0.7)
    s[7] = 0.0  # an all-zero row: zero denominators
    sp = S.sparse_scores(s, dims, eps=eps, max_per_block=cap)
    sp.tail_weight = 0.6
    cam = rng.integers(0, 3, n)
    shapes = [(1, 1), (1, 9), (9, 1), (0, 4), (3, 0), (6, 5), (n, n)]
    rows = [rng.integers(0, n, r) for r, _ in shapes]
    cols = [rng.integers(0, n, c) for _, c in shapes]
    rows[1][0] = cols[1][0] = 7
    rp = np.cumsum([0] + [len(r) for r in rows])
    cp = np.cumsum([0] + [len(c) for c in cols])
    R, C = np.concatenate(rows), np.concatenate(cols)
    i, j, _ = S._tile_pairs(R, rp, C, cp)
    want = S.jaccard_on_edges(sp, i, j, tail)
    np.testing.assert_allclose(S.tile_jaccard(sp, R, rp, C, cp, tail=tail, isa=isa), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(S.tile_jaccard(sp, R, rp, C, cp, cam, tail, isa=isa),
                               np.where(cam[i] != cam[j], want, 0), rtol=1e-6, atol=1e-7)


def test_tile_jaccard_rejects_unknown_isa():
    sp = S.sparse_scores(np.ones((1, 2), np.float32) / 2, [2], eps=0.0)
    with pytest.raises(ValueError, match="isa must be"):
        S.tile_jaccard(sp, np.zeros(1), np.array([0, 1]), np.zeros(1), np.array([0, 1]), isa="sse9")


def test_sparsifier_rejects_bad_input():
    with pytest.raises(ValueError, match="eps"):
        S.ScoreSparsifier([3], eps=1.0, n_total=3)
    with pytest.raises(ValueError, match="n_total"):
        S.ScoreSparsifier([3])
    sp = S.ScoreSparsifier([3], sample=0)
    with pytest.raises(ValueError, match=r"\(b, 3\)"):
        sp.add(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="nonnegative"):
        sp.add(-np.ones((2, 3), np.float32))


# ----------------------------------------------------------------------------- linkage


def _linkage_problem(rng, n, cams, weighted):
    f = rng.standard_normal((n, 6)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    cam = rng.integers(0, cams, n)
    ei, ej = np.triu_indices(n, 1)
    pick = rng.random(len(ei)) < 0.25
    pick[np.arange(n - 1) * (2 * n - np.arange(n - 1) - 1) // 2] = True  # a path 0-1-...-(n-1)
    gi, gj = ei[pick].astype(np.int32), ej[pick].astype(np.int32)
    value = rng.random(len(gi)) + 0.5
    kw = {}
    if weighted:
        bg = rng.random((cams, cams)) * 0.05
        bg = (bg + bg.T) / 2
        np.fill_diagonal(bg, 0)
        kw = dict(b=rng.random(n) + 0.5, u=rng.random(n), c0=0.7, cams=cam, background=bg,
                  alpha=rng.random(n) * 0.02 - 0.01)
    return f, gi, gj, value, kw


def _model_matrix(f, gi, gj, value, b=None, u=None, c0=0.0, cams=None, background=None, alpha=None):
    """Every pair's value as the linkage sees it (dense, float64)."""
    n = len(f)
    b = np.ones(n) if b is None else b
    u = np.ones(n) if u is None else u
    cos = f.astype(np.float64) @ f.T.astype(np.float64)
    if background is not None:
        cos += background[np.ix_(cams, cams)] + (cams[:, None] != cams[None, :]) * (alpha[:, None] + alpha[None, :])
    pair = c0 + (u[:, None] + u[None, :]) / 2 - (b[:, None] + b[None, :]) / 2 * cos
    pair[gi, gj] = pair[gj, gi] = value
    return pair


@pytest.mark.parametrize("least", [1, 8])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bounds", ["none", "tight", "loose"])
def test_graph_linkage_matches_reference(rng, weighted, bounds, least):
    """The closest pair overall, whatever (valid) bounds say and however few edges there are, and
    however many clusters a search serves beyond those it must."""
    n = 40
    f, gi, gj, value, kw = _linkage_problem(rng, n, 3, weighted)
    bnd = None
    if bounds != "none":  # each sample's smallest model value with the samples it has no edge to
        pair = _model_matrix(f, gi, gj, value, **kw)
        adj = np.eye(n, dtype=bool)
        adj[gi, gj] = adj[gj, gi] = True
        bnd = np.where(adj, np.inf, pair).min(1) - 1e-9
        if bounds == "loose":
            bnd -= rng.random(n) * 0.3
    for k in (1, 5, 17, n):
        got, info = S.average_linkage(f, gi, gj, value, k, bounds=bnd, refresh_k=3, refresh_least=least, **kw)
        np.testing.assert_array_equal(got, S.average_linkage_ref(f, gi, gj, value, k, **kw))
        # each search serves at least `least` clusters (k + 1 or more are live at every search)
        assert info["clusters_searched"] >= min(least, k + 1) * info["refreshes"]


@pytest.mark.parametrize("least", [1, 8])
@pytest.mark.parametrize("bounds", ["none", "tight"])
def test_rechecked_linkage_is_greedy_on_exact_values(rng, bounds, least):
    """Pair values off the model by less than the margin: with re-checks the merges are plain
    average linkage's on the exact values (every pair given to the reference)."""
    n, margin = 40, 0.04
    f, gi, gj, value, kw = _linkage_problem(rng, n, 3, True)
    model = _model_matrix(f, gi, gj, value, **kw)
    noise = (rng.random((n, n)) - 0.5) * margin
    exact = model + np.triu(noise, 1) + np.triu(noise, 1).T
    exact[gi, gj] = exact[gj, gi] = value  # graph pairs hold their exact values already
    bnd = None
    if bounds == "tight":
        adj = np.eye(n, dtype=bool)
        adj[gi, gj] = adj[gj, gi] = True
        bnd = np.where(adj, np.inf, model).min(1) - 1e-9
    ai, aj = np.triu_indices(n, 1)
    for k, max_rects in ((1, 1 << 30), (6, 16), (23, 1 << 30), (6, 1)):
        seen = []

        def pair_values(i, j, seen=seen):
            seen.append(np.minimum(i, j) * n + np.maximum(i, j))
            return exact[i, j]
        got, info = S.average_linkage(f, gi, gj, value, k, bounds=bnd, refresh_k=3, pair_values=pair_values,
                                      margin=margin, batch=5, max_rects=max_rects, refresh_least=least, **kw)
        np.testing.assert_array_equal(got, S.average_linkage_ref(f, ai, aj, exact[ai, aj], k, **kw))
        assert info["pairs_checked"] > 0
        seen = np.concatenate(seen)
        assert len(seen) == info["sample_pairs_checked"]
        if max_rects == 1:  # model parts re-checked whole: pairs summed again
            assert info["rects_collapsed"] > 0 and len(np.unique(seen)) < len(seen)
        elif info["rects_collapsed"] == 0:  # only the model parts: each pair summed once
            assert len(np.unique(seen)) == len(seen)
    plain, _ = S.average_linkage(f, gi, gj, value, 6, bounds=bnd, refresh_k=3, **kw)
    np.testing.assert_array_equal(plain, S.average_linkage_ref(f, gi, gj, value, 6, **kw))  # model kept


@pytest.mark.parametrize("max_rects", [1, 3, 1 << 30])
def test_every_recheck_sums_exactly_its_cluster_pair(rng, monkeypatch, max_rects):
    """At every re-check, the exact part the linkage kept plus the sums over the rectangles it
    hands out equal the plain sum of the exact values over A x B, and the rectangles lie inside
    both member lists without overlapping (whole re-checks after a collapse included)."""
    n = 60
    f, gi, gj, value, kw = _linkage_problem(rng, n, 2, True)
    exact = _model_matrix(f, gi, gj, value, **kw) + np.triu(rng.random((n, n)), 1) * 0.3
    exact = np.triu(exact, 1) + np.triu(exact, 1).T
    exact[gi, gj] = exact[gj, gi] = value
    native, last, checks = S._native(), {}, []

    class Recorded:  # the native linkage, remembering what `pending` handed out
        def __init__(self, *args):
            self._link = native.SparseLinkage(*args)

        def __getattr__(self, name):
            return getattr(self._link, name)

        def pending(self, count):
            last["out"] = self._link.pending(count)
            return last["out"]

    monkeypatch.setattr(S, "_native", lambda: type("N", (), {"SparseLinkage": Recorded})())
    part_sums = S._model_part_sums

    def checked(link, a, c, rect_ptr, rects, tile_sums, **kws):
        sums, pairs = part_sums(link, a, c, rect_ptr, rects, tile_sums, **kws)
        kept = last["out"][3]
        pa, ma = link.members(a)
        pc, mc = link.members(c)
        for e in range(len(a)):
            A, C = ma[pa[e]:pa[e + 1]], mc[pc[e]:pc[e + 1]]
            cover = np.zeros((len(A), len(C)), int)
            for r0, r1, c0, c1 in rects[rect_ptr[e]:rect_ptr[e + 1]]:
                assert 0 <= r0 < r1 <= len(A) and 0 <= c0 < c1 <= len(C)
                cover[r0:r1, c0:c1] += 1
            assert cover.max() <= 1
            checks.append((kept[e] + sums[e], exact[np.ix_(A, C)].sum()))
        return sums, pairs

    monkeypatch.setattr(S, "_model_part_sums", checked)
    for k in (1, 7, 20):
        S.average_linkage(f, gi, gj, value, k, refresh_k=3, pair_values=lambda i, j: exact[i, j],
                          margin=0.5, batch=4, max_rects=max_rects, **kw)
    got, want = np.array(checks).T
    assert len(got) > 10
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_linkage_searches_clusters_off_the_graph(rng):
    """Two edges only: the rest comes from searches over the cluster sums, which widen until a
    merge goes through; the partition is the full model's."""
    f = rng.standard_normal((30, 5)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    gi, gj = np.array([0, 2], np.int32), np.array([1, 3], np.int32)
    value = np.array([0.1, 0.2])
    labels, info = S.average_linkage(f, gi, gj, value, 4, refresh_k=1)
    assert info["refreshes"] >= 1 and info["clusters_searched"] >= 30
    np.testing.assert_array_equal(labels, S.average_linkage_ref(f, gi, gj, value, 4))


def test_model_columns_carry_the_background(rng):
    """<x_i, g_j> = b_j (cos + background[c_i, c_j] + [c_i != c_j] (alpha_i + alpha_j))."""
    f, gi, gj, value, kw = _linkage_problem(rng, 25, 4, True)
    x, g = S._model_columns(f, kw["b"], kw["cams"], kw["background"], kw["alpha"])
    cam, al = kw["cams"], kw["alpha"]
    want = (f.astype(np.float64) @ f.T + kw["background"][np.ix_(cam, cam)]
            + (cam[:, None] != cam[None, :]) * (al[:, None] + al[None, :])) * kw["b"][None, :]
    np.testing.assert_allclose(x.astype(np.float64) @ g.T.astype(np.float64), want, rtol=1e-5, atol=1e-6)


def test_jaccard_background_against_dense(rng):
    """Camera-pair means of J over the rows kept whole, and each image's mean excess over them
    against the probe rows of other cameras (J^ = J here: eps = 0, no cap); batches of 100 rows
    in 64-row tiles, so that batch and tile ends fall inside the rows."""
    from iics_fast.similarity import pairwise_jaccard
    n = 150
    f, s, cam, dims = _problem(rng, n, 3)
    sp = S.sparse_scores(s, dims, eps=0.0, max_per_block=None, sample=20)
    a, alpha = S.jaccard_background(sp, cam, probes=8, batch=100)
    J = pairwise_jaccard(torch.from_numpy(s)).numpy().astype(np.float64)
    rows = S.sample_rows(n, 20)
    probe = rows[S.sample_rows(20, 8)]
    for c1 in range(3):
        for c2 in range(3):
            sel = [(i, j) for i in rows for j in rows if i != j and cam[i] == c1 and cam[j] == c2]
            want = 0.0 if c1 == c2 else np.mean([J[i, j] for i, j in sel])
            assert a[c1, c2] == pytest.approx(want, abs=1e-6)
    ahat = np.zeros((3, 3))
    for c1 in range(3):
        for c2 in range(3):
            if c1 != c2:
                ahat[c1, c2] = np.mean([J[i, j] for i in probe for j in probe if cam[i] == c1 and cam[j] == c2])
    for i in range(n):
        other = [t for t in probe if cam[t] != cam[i]]
        assert alpha[i] == pytest.approx(np.mean([J[i, t] - ahat[cam[i], cam[t]] for t in other]), abs=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_initial_bounds_hold_off_the_graph(rng, weighted):
    """Each sample's bound is at most its model value with every sample it has no edge to."""
    n, k = 120, 6
    f, s, cam, dims = _problem(rng, n, 3)
    f = S._normalise(f)
    sp = S.sparse_scores(s, dims, eps=1e-2, max_per_block=None)
    built = S._faiss_index(f, "flat", None)
    blk = S._row_block(f, sp, cam, 0.02, k, k, 0, n, False, 4, "flat", None, built, None)
    gi, gj, value = S._undirected(blk["ei"], blk["ej"], blk["d"])
    bg = rng.random((3, 3)) * 0.01
    bg = (bg + bg.T) / 2
    np.fill_diagonal(bg, 0)
    kw = dict(b=np.ones(n), u=np.ones(n), c0=0.0, cams=cam, background=bg, alpha=rng.random(n) * 0.004 - 0.002)
    if weighted:
        kw.update(b=0.3 / (1 + rng.random(n) * 0.3), u=0.3 * rng.random(n), c0=0.7)
    bounds = S._initial_bounds(blk, n, kw["b"], kw["u"], kw["c0"], cam, bg, kw["alpha"])
    pair = _model_matrix(f, gi, gj, value, **kw)
    adj = np.eye(n, dtype=bool)
    adj[gi, gj] = adj[gj, gi] = True
    off = np.where(adj, np.inf, pair).min(1)
    assert np.isfinite(bounds).all()
    assert (bounds <= off).all()
    assert (off - bounds).min() < 0.05  # and not vacuous


# ----------------------------------------------------------------------------- the round


def _ari(a, b):
    from sklearn.metrics import adjusted_rand_score
    return adjusted_rand_score(a, b)


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
@pytest.mark.parametrize("n,cams", [(90, 3), (61, 1), (25, 4)])
def test_complete_graph_equals_dense_round(rng, similarity, n, cams):
    f, s, cam, dims = _problem(rng, n, cams)
    sp = S.sparse_scores(s, dims, eps=0.0, max_per_block=None)
    k_inter = max(2, n // 5)
    dense = S.inter_round_dense_ref(f, s, cam, k_inter, similarity=similarity)
    got, info = S.sparse_inter_round(f, sp, cam, k_inter, similarity=similarity, k=n - 1)
    np.testing.assert_array_equal(got, dense)
    if similarity == "rerank":
        assert info["rows_uncertified"] == 0 and info["rows_max_uncertified"] == 0


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
def test_rechecked_round_equals_dense_linkage_of_its_pair_values(similarity):
    """A 6-NN graph and scores cut to 4 entries a head (flat synthetic heads, a Jaccard weight of
    0.5 that makes the model's errors matter): with every merge re-checked (a margin above any
    model error) the partition is the dense round's on Eq. 5 with the round's J (fitted tail);
    with the model alone it is not, for cosine."""
    from benchmarks.profile import heads_from_samples, synthetic_features, synthetic_scores
    from iics_fast.cluster import agglomerative
    from iics_fast.rerank import k_reciprocal
    n, mu = 300, 0.5
    f, cam, _ = synthetic_features(n, 4, seed=1, dim=64)
    heads = heads_from_samples(f, cam, 40, seed=1)
    sp = S.sparse_scores(synthetic_scores(f, cam, heads), [h.shape[0] for h in heads], eps=1e-3,
                         max_per_block=4, sample=100)
    kw = dict(mu=mu, similarity=similarity, k=6, k_candidates=40)
    got, info = S.sparse_inter_round(f, sp, cam, 20, recheck_margin=1.0, **kw)
    assert 0 < info["tail_weight"] < 1 and info["graph_pairs"] < n * (n - 1) // 2  # not the complete graph
    sp.tail_weight = S.fit_tail_weight(sp, cam)
    i, j = np.triu_indices(n, 1)
    i, j = i.astype(np.int32), j.astype(np.int32)
    d = (1.0 - S._pair_cos(S._normalise(f), i, j) - mu * S._cross_jaccard(sp, cam, i, j)).astype(np.float32)
    if similarity == "rerank":
        k_reciprocal(d, out=d)
    want = np.asarray(agglomerative(d, n_clusters=20, inplace=True))
    np.testing.assert_array_equal(got, want)
    if similarity == "cosine":
        model, _ = S.sparse_inter_round(f, sp, cam, 20, recheck_margin=None, **kw)
        assert not np.array_equal(model, want)


def _recheck_values(rng, similarity, n=70, mu=0.3):
    """A small round's re-check pair values (`_exact_pairs`) with what built them: Eq. 5 with a
    fitted-like tail weight, re-ranked (k1 = 4, k2 = 2) for "rerank"."""
    f, s, cam, dims = _problem(rng, n, 3)
    f = S._normalise(f)
    sp = S.sparse_scores(s, dims, eps=0.05, max_per_block=2, sample=30)
    sp.tail_weight = 0.6
    built = S._faiss_index(f, "flat", None)
    blk = S._row_block(f, sp, cam, mu, 4, n - 1, 0, n, similarity == "rerank", n, "flat", None, built)
    if similarity == "rerank":
        gi, gj, value, lo, rng_, c0, _ = S._rerank_edges(f, sp, cam, mu, blk, n, 4, 2, 0.3)
        values = S._exact_pairs(f, sp, cam, mu, n, gi, gj, value, (lo, rng_, np.float32(c0), np.float32(0.3)))
    else:
        gi, gj, value = S._undirected(blk["ei"], blk["ej"], blk["d"])
        values = S._exact_pairs(f, sp, cam, mu, n, gi, gj, value, None)
    return f, sp, cam, values, gi


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
def test_exact_pair_values_equal_the_dense_matrix(rng, similarity):
    """What the re-checks sum: every pair's value (graph pair or not, either order) is the dense
    matrix's entry (Eq. 5 with the round's J, re-ranked (k1 = 4, k2 = 2) with row min(i, j)'s normalisation)."""
    from iics_fast.rerank import k_reciprocal
    n, mu = 70, 0.3
    f, sp, cam, values, gi = _recheck_values(rng, similarity, n, mu)
    i, j = np.triu_indices(n, 1)
    i, j = i.astype(np.int32), j.astype(np.int32)
    d = (1.0 - S._pair_cos(f, i, j) - mu * S._cross_jaccard(sp, cam, i, j)).astype(np.float32)
    if similarity == "rerank":
        k_reciprocal(d, k1=4, k2=2, out=d)
        assert len(gi) < len(i)  # pairs off the graph are checked too
    np.testing.assert_allclose(values(i, j), d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values(j, i), d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
def test_tile_sums_equal_pairwise_sums(rng, similarity):
    """The re-checks' fast tile sums (cosine: feature sums and tile_jaccard; rerank: a product a
    tile and tile_jaccard) equal the sums of the exact pair values over the tiles' pairs."""
    n, mu = 70, 0.3
    f, sp, cam, values, _ = _recheck_values(rng, similarity, n, mu)
    fast = (S._rerank_tile_sums(f, sp, cam, mu, values) if similarity == "rerank"
            else S._cosine_tile_sums(f, sp, cam, mu))
    sizes = [(1, 1), (0, 5), (1, 30), (25, 1), (4, 0), (7, 9), (n, n)]  # empty tiles too
    perm = [rng.permutation(n) for _ in sizes]
    rows = [p[:r] for p, (r, _) in zip(perm, sizes)]
    cols = [p[n - c:] if r + c <= n else rng.permutation(n)[:c] for p, (r, c) in zip(perm, sizes)]
    rp = np.cumsum([0] + [len(r) for r in rows])
    cp = np.cumsum([0] + [len(c) for c in cols])
    R, C = np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)
    want = S._tile_sums_ref(values)(R, rp, C, cp)
    np.testing.assert_allclose(fast(R, rp, C, cp), want, rtol=1e-6, atol=1e-5)
    # feature sums of long segments, gathered a few rows at a time
    np.testing.assert_allclose(S._segment_sums(f, C, cp, chunk=3),
                               [f[c].astype(np.float64).sum(0) for c in cols], rtol=1e-6, atol=1e-6)


def _eq5_matrix(f, sp, cam, mu):
    """Eq. 5 over all pairs (n x n float32, zero diagonal): the plain reference of the searches."""
    n = len(f)
    i, j = (a.ravel() for a in np.meshgrid(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32),
                                           indexing="ij"))
    d = (1.0 - S._pair_cos(f, i, j) - mu * S._cross_jaccard(sp, cam, i, j)).astype(np.float32).reshape(n, n)
    np.fill_diagonal(d, 0)
    return d


def _flat(f, host):
    """The flat search as the round builds it: faiss's index, or (host) none, both ends of each
    row then coming from one product (`_both_ends`)."""
    return (None, "flat") if host else S._faiss_index(f, "flat", None)


@pytest.mark.parametrize("host", [False, True])
def test_uncertified_rows_search_wider(rng, host):
    """Rows whose k_rank-th nearest by Eq. 5 the cosine candidates do not certify get four times
    as many; every row certified then lists its true k_rank nearest (Eq. 5 over all images)."""
    n, mu, k_rank = 200, 0.5, 5
    f, s, cam, dims = _problem(rng, n, 3)
    f = S._normalise(f)
    sp = S.sparse_scores(s, dims, eps=0.05, max_per_block=2, sample=30)
    built = _flat(f, host)
    blk = S._row_block(f, sp, cam, mu, 4, 6, 0, n, True, 4, "flat", None, built, k_rank)
    assert 0 < blk["widened"].sum() < n
    d = _eq5_matrix(f, sp, cam, mu)
    starts = np.searchsorted(blk["cand_i"], np.arange(n))
    counts = np.diff(np.append(starts, len(blk["cand_i"])))
    assert (counts[blk["widened"]] == 4 * 7).all() and (counts[~blk["widened"]] == 7).all()
    kth = blk["cand_d"][starts + k_rank - 1]
    certified = kth <= blk["bound"]
    assert certified[blk["widened"]].any()
    for r in np.flatnonzero(certified):
        got = blk["cand_j"][starts[r]:starts[r] + k_rank]
        np.testing.assert_array_equal(np.sort(d[r, got]), np.sort(d[r])[:k_rank])


@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("n,cams,k_far", [(97, 3, 1), (64, 1, 2), (130, 5, 4)])
def test_row_max_searches_wider_until_certified(rng, n, cams, k_far, host):
    """Each row's maximum equals the largest Eq. 5 distance over all images (self's 0 included),
    on a flat index (or its first farthest from `_both_ends`), however few farthest images the
    first search takes; an IVF index certifies no row (its search may miss the farthest)."""
    mu = 0.5  # the Jaccard term reorders the farthest by cosine: the first search rarely suffices
    f, s, cam, dims = _problem(rng, n, cams)
    f = S._normalise(f)
    f[5] = f[6]  # a duplicate image: ties
    sp = S.sparse_scores(s, dims, eps=0.05, max_per_block=2, sample=30)
    d = _eq5_matrix(f, sp, cam, mu)
    floor = np.zeros(n - 10, np.float32)
    first = S._both_ends(f, 10, n, 1, k_far)[1] if host else None
    hi, certified, widened = S._row_max(f, sp, cam, mu, 10, k_far, _flat(f, host), floor, first)
    assert certified.all()
    np.testing.assert_allclose(hi, d[10:].max(1), rtol=0, atol=1e-6)
    i, j = np.meshgrid(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), indexing="ij")
    cos = S._pair_cos(f, i.ravel(), j.ravel()).reshape(n, n)
    first = np.take_along_axis(d, np.argsort(cos, 1, kind="stable")[:, :k_far], 1).max(1)
    needed_more = (d.max(1) > np.maximum(first, 0) + 1e-6)[10:].any()
    assert needed_more == (cams > 1)  # one camera: no Jaccard term, the farthest by cosine is the max
    assert widened.any() == needed_more
    ivf = S._faiss_index(f, "ivf", None)
    _, none, _ = S._row_max(f, sp, cam, mu, 10, k_far, ivf, floor)
    assert not none.any()


def test_sorted_candidates_equal_lexsort(rng):
    """The candidates' order (row, then Eq. 5 distance, then index) is np.lexsort's: ties, equal
    distances of either sign, -0.0 beside 0.0, negative distances, rows in any order."""
    m = 5000
    ci = rng.integers(0, 300, m).astype(np.int32)
    cj = rng.integers(0, 2_000_000, m).astype(np.int32)
    cd = rng.choice(np.array([-0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 2.0, 3e38], np.float32), m)
    cd[::7] = rng.standard_normal(len(cd[::7])).astype(np.float32)
    got = S._sorted_candidates(ci, cj, cd)
    order = np.lexsort((cj, cd, ci))
    for g, want in zip(got, (ci[order], cj[order], cd[order])):
        np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("n,rows,k_near,k_far,budget", [
    (97, (19, 97), 9, 4, 300),      # row blocks of 17 that do not divide the rows, columns before them
    (211, (40, 150), 37, 5, 1000),  # columns on both sides of the rows, blocks of 31
    (40, (0, 40), 40, 40, 1 << 24),  # every image in both lists, one block
    (64, (0, 64), 3, 2, 16 * 16),   # rows a whole number of blocks
    (1, (0, 1), 1, 1, 1)])
def test_both_ends_are_the_exact_ends(rng, monkeypatch, n, rows, k_near, k_far, budget):
    """The blocked symmetric product's two ends equal `_both_ends_ref` (each row's whole product,
    sorted) and a float64 sort of the cosines: ties (duplicate images), blocks that do not divide
    the rows, rows with columns outside them on either side."""
    monkeypatch.setattr(S, "SEARCH_BUDGET", budget)
    f = S._normalise(rng.standard_normal((n, 16)).astype(np.float32))
    f[n // 2] = f[n // 3]
    f[n - 1] = f[0]
    r0, r1 = rows
    got = S._both_ends(f, r0, r1, k_near, k_far)
    ref = S._both_ends_ref(f, r0, r1, k_near, k_far)
    cos = f[r0:r1].astype(np.float64) @ f.T.astype(np.float64)
    for (c, i), (ref_c, ref_i), full, k in zip(got, ref, (-np.sort(-cos, 1), np.sort(cos, 1)), (k_near, k_far)):
        want = full[:, :k]
        assert i.dtype == np.int32 and c.shape == i.shape == want.shape
        np.testing.assert_allclose(c, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(c, ref_c, rtol=0, atol=1e-6)
        np.testing.assert_allclose(c, np.take_along_axis(cos, i.astype(np.int64), 1), rtol=0, atol=1e-6)
        assert all(len(set(row)) == len(row) for row in i.tolist())
        # the same images wherever a cosine is apart from its neighbours (the first one dropped
        # included) by more than rounding
        gap = np.abs(np.diff(full[:, :k + 1], axis=1)) > 1e-5  # gap[:, e]: between entries e and e + 1
        apart = np.ones(want.shape, bool)
        apart[:, 1:] &= gap[:, :k - 1]
        apart[:, :gap.shape[1]] &= gap
        np.testing.assert_array_equal(i[apart], ref_i[apart])


@pytest.mark.parametrize("n,pairs,presorted", [(1, 0, False), (7, 30, False), (50, 400, True), (2000, 5000, False)])
def test_pair_lookup_equals_a_search_over_every_key(rng, n, pairs, presorted):
    """The row-wise pair table finds what a search over every pair's key finds: duplicates (the
    first one's value), rows without pairs, queries absent from the table, empty tables."""
    ei = rng.integers(0, n, pairs).astype(np.int32)
    ej = rng.integers(0, n, pairs).astype(np.int32)
    values = rng.standard_normal(pairs)
    if presorted:
        order = np.argsort(ei.astype(np.int64) * n + ej, kind="stable")
        ei, ej, values = ei[order], ej[order], values[order]
    qi = np.concatenate([ei, rng.integers(0, n, 3 * pairs + 5)]).astype(np.int32)
    qj = np.concatenate([ej, rng.integers(0, n, 3 * pairs + 5)]).astype(np.int32)
    got, found = S._lookup(S._pairs_lookup(n, ei, ej, values, presorted=presorted), qi, qj)
    want, want_found = S._lookup_ref(n, ei, ej, values, qi, qj)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(got[found], want[found])
    assert found[:pairs].all() and (pairs == 0 or not found.all())


@pytest.mark.parametrize("rows", [(0, 20), (6, 20), (3, 11)])
def test_both_ends_sorts_ties_by_index(monkeypatch, rows):
    """Equal cosines (the same image several times) are kept and listed by index in both lists,
    whatever the block size and wherever the rows start or end (the columns then come in another
    order), also when a tied entry must give way to an equal one of smaller index."""
    f = S._normalise(np.tile(np.eye(4, dtype=np.float32), (5, 1)))  # 20 images, 4 distinct
    g = S._normalise(np.eye(2, dtype=np.float32)[[0, 1, 1, 0, 0]])
    for budget in (1, 4, 9, 49, 1 << 24):
        monkeypatch.setattr(S, "SEARCH_BUDGET", budget)
        for x, k_near, k_far, r in ((f, 5, 3, rows), (f, 3, 7, rows), (g, 4, 2, (0, 5)), (g, 2, 2, (1, 4))):
            got = S._both_ends(x, *r, k_near, k_far)
            for (c, i), (ref_c, ref_i) in zip(got, S._both_ends_ref(x, *r, k_near, k_far)):
                np.testing.assert_array_equal(i, ref_i)
                np.testing.assert_array_equal(c, ref_c)


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
def test_one_product_round_equals_faiss_flat_search(rng, monkeypatch, similarity):
    """The re-ranking round takes both ends of each row from one product on the host instead of
    faiss's flat index (and the cosine round keeps faiss's): the same graph, the same partition
    as with faiss's index for every search."""
    n = 150
    f, s, cam, dims = _problem(rng, n, 3)
    sp = S.sparse_scores(s, dims, eps=0.05, max_per_block=2, sample=30)
    kw = dict(similarity=similarity, k=6, k_candidates=8, k_far=2, k1=6, k2=3, mu=0.3)
    made = []
    faiss_index = S._faiss_index
    monkeypatch.setattr(S, "_faiss_index", lambda *a: made.append(1) or faiss_index(*a))
    got, info = S.sparse_inter_round(f, sp, cam, 20, **kw)
    assert bool(made) == (similarity == "cosine")
    monkeypatch.setattr(S, "_one_product", lambda *a: False)  # every search through the index
    want, want_info = S.sparse_inter_round(f, sp, cam, 20, **kw)
    np.testing.assert_array_equal(got, want)
    for key in ("graph_pairs", "rows_widened", "rows_max_widened", "jaccard_pairs"):
        assert info.get(key) == want_info.get(key), key


def test_ivf_certifies_no_nearest_row(rng):
    """The k1 + 1 nearest certificate assumes an exact search: on a flat index it certifies rows,
    on an IVF index none (info["rows_uncertified"] counts every row)."""
    n, mu = 200, 0.02
    f, s, cam, dims = _problem(rng, n, 3)
    f = S._normalise(f)
    sp = S.sparse_scores(s, dims, eps=0.05, max_per_block=2, sample=30)
    counts = {}
    for kind in ("flat", "ivf"):
        blk = S._row_block(f, sp, cam, mu, 8, 12, 0, n, True, 4, kind, None, S._faiss_index(f, kind, None), 5)
        counts[kind] = S._rerank_edges(f, sp, cam, mu, blk, n, 4, 2, 0.3)[-1]["rows_uncertified"]
    assert counts["flat"] < n and counts["ivf"] == n


class GpuFlatStandIn:
    """A flat index that searches like faiss-gpu (named Gpu..., refusing k above GPU_K_MAX) and
    records the largest search it was asked for (rows x k)."""

    def __init__(self, idx):
        self.idx, self.largest = idx, 0

    def search(self, x, k):
        assert k <= S.GPU_K_MAX, f"k = {k} above GPU_K_MAX"
        self.largest = max(self.largest, len(x) * k)
        return self.idx.search(x, k)


@pytest.mark.parametrize("n,cams,k_far", [(97, 3, 1), (130, 5, 2)])
def test_row_max_caps_k_on_gpu_and_chunks(rng, monkeypatch, n, cams, k_far):
    """On a GPU index the widening stops at GPU_K_MAX and the rows still uncertified are finished
    by an exact product on the host; every search stays within SEARCH_BUDGET entries; the maxima
    equal Eq. 5's over all images."""
    monkeypatch.setattr(S, "GPU_K_MAX", 4)
    monkeypatch.setattr(S, "SEARCH_BUDGET", 300)  # a few rows a search
    mu = 0.5
    f, s, cam, dims = _problem(rng, n, cams)
    f = S._normalise(f)
    sp = S.sparse_scores(s, dims, eps=0.05, max_per_block=2, sample=30)
    d = _eq5_matrix(f, sp, cam, mu)
    idx, kind = S._faiss_index(f, "flat", None)
    gpu = GpuFlatStandIn(idx)
    floor = np.zeros(n - 10, np.float32)
    calls = []
    farthest = S._farthest
    monkeypatch.setattr(S, "_farthest", lambda f_, b, q, kf: calls.append((len(q), kf)) or farthest(f_, b, q, kf))
    hi, certified, _ = S._row_max(f, sp, cam, mu, 10, k_far, (gpu, kind), floor)
    assert certified.all()
    np.testing.assert_allclose(hi, d[10:].max(1), rtol=0, atol=1e-6)
    assert 0 < gpu.largest <= S.SEARCH_BUDGET
    host = [(rows, kf) for rows, kf in calls if kf > S.GPU_K_MAX]
    assert host and all(rows * n <= S.SEARCH_BUDGET for rows, _ in host)


def test_feature_only_complete_graph_equals_dense_round(rng):
    f, _, cam, _ = _problem(rng, 70, 3)
    dense = S.inter_round_dense_ref(f, None, cam, 9, similarity="cosine")
    got, _ = S.sparse_inter_round(f, None, cam, 9, similarity="cosine", k=69)
    np.testing.assert_array_equal(got, dense)


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
def test_knn_graph_round_close_to_dense(similarity):
    from benchmarks.profile import heads_from_samples, synthetic_features, synthetic_scores
    f, cam, _ = synthetic_features(900, 4, seed=3, dim=64)
    heads = heads_from_samples(f, cam, 40, seed=3)
    s = synthetic_scores(f, cam, heads)
    sp = S.sparse_scores(s, [h.shape[0] for h in heads], eps=1e-3, max_per_block=None)
    dense = S.inter_round_dense_ref(f, s, cam, 40, similarity=similarity)
    got, info = S.sparse_inter_round(f, sp, cam, 40, similarity=similarity, k=32)
    assert info["graph_pairs"] < 900 * 899 // 2 // 3  # not the complete graph
    assert _ari(got, dense) >= 0.99


def test_round_rejects_bad_input(rng):
    f, s, cam, dims = _problem(rng, 20, 2)
    sp = S.sparse_scores(s, dims)
    with pytest.raises(ValueError, match="similarity"):
        S.sparse_inter_round(f, sp, cam, 3, similarity="jaccard")
    with pytest.raises(ValueError, match="k_inter"):
        S.sparse_inter_round(f, sp, cam, 0)
    with pytest.raises(ValueError, match="one row per image"):
        S.sparse_inter_round(f[:-1], sp, cam, 3)
    with pytest.raises(ValueError, match="k_candidates >= k1"):
        S.sparse_inter_round(f, sp, cam, 3, k=5, k_candidates=5)
    with pytest.raises(ValueError, match="recheck_margin"):
        S.sparse_inter_round(f, sp, cam, 3, recheck_margin=-1e-3)
    for bad in (np.nan, np.inf):
        g = f.copy()
        g[7, 3] = bad
        with pytest.raises(ValueError, match=r"1 feature rows hold NaN or inf \(rows \[7\]"):
            S.sparse_inter_round(g, sp, cam, 3)
    labels, _ = S.sparse_inter_round(f[:1], sp.rows(0, 1), cam[:1], 1)
    np.testing.assert_array_equal(labels, [0])


def test_choose_inter_mode():
    logs = []
    assert S.choose_inter_mode("dense", 10**6, 2048, 9000, available=1) == "dense"
    assert S.choose_inter_mode("sparse", 10, 2048, 9000) == "sparse"
    need = S.dense_round_bytes(1000, 2048, 100)
    assert S.choose_inter_mode("auto", 1000, 2048, 100, available=need, log=logs.append) == "dense"
    assert S.choose_inter_mode("auto", 1000, 2048, 100, available=need - 1, log=logs.append) == "sparse"
    assert "needs" in logs[-1] and "sparse round" in logs[-1]
    assert S.choose_inter_mode("auto", 10, 8, 8, log=logs.append) == "dense"  # measured here
    with pytest.raises(ValueError, match="dense, sparse or auto"):
        S.choose_inter_mode("fast", 10, 10, 10)


# ----------------------------------------------------------------------------- two processes


def _worker(r, port, outdir, problem):
    from iics_fast import distributed as D
    os.environ.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    f, s, cam, dims = problem
    out = {}
    with D.init_from_env():
        share = D.shard_indices(len(f), D.rank(), D.world_size())
        part = S.ScoreSparsifier(dims, 1e-2, None, n_total=len(f), sample=16, offset=share.start)
        part.add(s[share.start:share.stop])
        sp = S.gather_sparse_scores(part.finish())
        out["scores"] = (sp.ptr, sp.col, sp.val, sp.sample_rows)
        for similarity in ("cosine", "rerank"):
            out[similarity] = S.sparse_inter_round(f, sp, cam, 12, similarity=similarity, k=24)
    torch.save(out, os.path.join(outdir, f"rank{r}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    rng = np.random.default_rng(7)
    problem = _problem(rng, 151, 4)
    f, s, cam, dims = problem
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), problem), nprocs=2, join=True)
    sp = S.sparse_scores(s, dims, eps=1e-2, max_per_block=None, sample=16)
    for r in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False)
        for a, b in zip(got["scores"], (sp.ptr, sp.col, sp.val, sp.sample_rows)):
            np.testing.assert_array_equal(a, b)
        for similarity in ("cosine", "rerank"):
            one, info = S.sparse_inter_round(f, sp, cam, 12, similarity=similarity, k=24)
            np.testing.assert_array_equal(got[similarity][0], one)
            assert got[similarity][1]["graph_pairs"] == info["graph_pairs"]


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_trainer_inter_mode_sparse_and_auto(tmp_path, monkeypatch, capsys):
    from iics_fast import train
    from tests.test_train import TINY
    monkeypatch.setenv("IICS_FAST_CACHE", str(tmp_path / "cache"))
    args = TINY + ["--rounds", "1", "--similarity", "rerank"]
    rows = train.main(args + ["--inter-mode", "sparse", "--out", str(tmp_path / "sparse")])
    assert rows[0]["inter_clusters"] == 8 and rows[0]["sparse_round"]["similarity"] == "rerank"
    assert "similarity" not in rows[0]["time"]  # no dense distance was built
    monkeypatch.setattr(S, "dense_round_bytes", lambda *a: 2**60)  # cannot fit: auto -> sparse
    rows = train.main(args + ["--inter-mode", "auto", "--verbose", "--out", str(tmp_path / "auto")])
    assert "sparse_round" in rows[0]
    assert "--inter-mode auto" in capsys.readouterr().out
    with pytest.raises(ValueError, match="threshold-inter"):
        train.main(args + ["--inter-mode", "sparse", "--threshold-inter", "0.01",
                           "--out", str(tmp_path / "bad")])


def test_resumed_auto_run_keeps_its_mode(tmp_path, monkeypatch):
    """--inter-mode auto decides once: a resumed run keeps the saved mode even when the memory
    now says otherwise."""
    from iics_fast import train
    from iics_fast.trainer import Trainer
    from tests.test_train import TINY
    monkeypatch.setenv("IICS_FAST_CACHE", str(tmp_path / "cache"))
    config = train.resolve(train.parse_args(TINY + ["--inter-mode", "auto",
                                                    "--out", str(tmp_path / "run")]))
    with monkeypatch.context() as m:
        m.setattr(S, "dense_round_bytes", lambda *a: 2**60)  # the dense round did not fit
        state = Trainer(config).state()
    assert state["inter_mode"] == "sparse"
    assert Trainer(config).inter_mode == "dense"  # it fits now: a new run goes dense
    assert Trainer(config, resume_state=state).inter_mode == "sparse"


@pytest.mark.parametrize("eps,cap", [(1e-9, 3), (0.2, 4), (0.05, 1)])
def test_profiler_direct_scores_equal_sparsifier(eps, cap):
    """The profiler's direct sparse scores (top entries of projected logits) against
    ScoreSparsifier on the dense softmax of the same logits; N not a multiple of the batch."""
    from benchmarks.profile import direct_sparse_scores, heads_from_samples, projected_logits, synthetic_features
    f, cam, _ = synthetic_features(203, 3, seed=5, dim=32)
    heads = heads_from_samples(f, cam, 9, seed=5)
    dims = [h.shape[0] for h in heads]
    logits = projected_logits(f, heads, rank=8)
    got = direct_sparse_scores(logits, 203, dims, eps, cap, batch=50, sample=17)
    z = logits(np.arange(203)).double()
    starts = np.concatenate([[0], np.cumsum(dims)])
    dense = torch.cat([torch.softmax(z[:, starts[h]:starts[h + 1]], 1) for h in range(len(dims))], 1).float()
    want = S.sparse_scores(dense.numpy(), dims, eps=eps, max_per_block=cap, sample=17)
    np.testing.assert_array_equal(got.ptr, want.ptr)
    np.testing.assert_array_equal(got.col, want.col)
    np.testing.assert_allclose(got.val, want.val, rtol=1e-5)
    np.testing.assert_allclose(got.tail, want.tail, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.dropped, want.dropped, atol=1e-5)
    np.testing.assert_array_equal(got.sample_rows, want.sample_rows)
    np.testing.assert_allclose(got.sample_scores, want.sample_scores, rtol=1e-5, atol=1e-8)


def test_profiler_sparse_mode(tmp_path):
    import json
    from benchmarks import profile
    record = profile.main(["--mode", "sparse", "--scale", "400", "--cameras", "3", "--k", "24",
                           "--k-inter", "20", "--compare-dense", "--out", str(tmp_path)])
    assert record["k_inter"] == 20
    saved = json.loads((tmp_path / "profile_sparse_400.json").read_text())
    assert saved["info"]["ari_sparse_vs_dense"] == record["info"]["ari_sparse_vs_dense"] >= 0.99
    names = [p["name"] for p in saved["phases"]]
    assert names == ["extract", "intra", "scores", "sparse_round", "dense_scores", "dense_round"]
    assert saved["info"]["round"]["graph_pairs"] < 400 * 399 // 2


def test_profiler_sparse_index_choice(tmp_path):
    """--index reaches the round: at N = 400 auto is flat; ivf is taken when asked for."""
    from benchmarks import profile
    common = ["--mode", "sparse", "--scale", "400", "--cameras", "3", "--k", "24", "--k-inter", "20",
              "--heads", "samples", "--out", str(tmp_path)]
    assert profile.main(common)["info"]["round"]["index"] == "flat"
    record = profile.main(common + ["--index", "ivf"])
    assert record["info"]["index"] == record["info"]["round"]["index"] == "ivf"


@pytest.mark.parametrize("similarity,n,want", [("cosine", 150, "ivf"), ("rerank", 150, "flat"), ("rerank", 301, "ivf"),
                                               ("cosine", 100, "flat")])
def test_auto_index_keeps_the_reranking_round_exact_longer(rng, monkeypatch, similarity, n, want):
    """index="auto": flat up to FLAT_MAX images, up to RERANK_FLAT_MAX for the re-ranking round
    (IVF multiplies its V-sharing pairs), IVF above; the round reports the index it used."""
    monkeypatch.setattr(S, "FLAT_MAX", 100)
    monkeypatch.setattr(S, "RERANK_FLAT_MAX", 300)
    f = rng.standard_normal((n, 8)).astype(np.float32)
    cam = rng.integers(0, 3, n)
    _, info = S.sparse_inter_round(f, None, cam, 10, similarity=similarity, k=24)
    assert info["index"] == want
    # where the round searches through a faiss index (as on a GPU), that index is of the kind chosen
    built = []
    faiss_index = S._faiss_index
    monkeypatch.setattr(S, "_one_product", lambda *a: False)
    monkeypatch.setattr(S, "_faiss_index", lambda x, index, device: built.append(faiss_index(x, index, device)[1])
                        or faiss_index(x, index, device))
    _, info = S.sparse_inter_round(f, None, cam, 10, similarity=similarity, k=24)
    assert built == [want] and info["index"] == want


def test_round_logs_each_step_with_its_memory(rng):
    """log= hears each step as it ends, with the resident memory and its peak so far (Linux)."""
    from iics_fast.memory import resident

    lines = []
    f = rng.standard_normal((120, 8)).astype(np.float32)
    S.sparse_inter_round(f, None, rng.integers(0, 3, 120), 10, k=24, log=lines.append)
    assert [line.split(":")[0].strip() for line in lines] == ["graph", "rerank", "linkage"]
    mem = resident()
    if mem is not None:
        assert 0 < mem[0] <= mem[1]
        assert all("resident" in line and "peak" in line for line in lines)


@pytest.mark.parametrize("similarity", ["cosine", "rerank"])
def test_row_block_in_chunks_equals_one_chunk(rng, monkeypatch, similarity):
    """The candidate lists built ROW_CHUNK rows at a time (chunks that do not divide the rows,
    rows starting mid-way) equal those built at once."""
    n, rows = 90, (7, 90)
    f = S._normalise(rng.standard_normal((n, 8)).astype(np.float32))
    cam = rng.integers(0, 3, n)
    sp = S.sparse_scores(rng.dirichlet(np.ones(12) * 0.2, n).astype(np.float32), [6, 6], 1e-3)
    rerank = similarity == "rerank"

    def block():  # mu = 0.1 and one farthest: some rows widened, some maxima searched again
        built = (None, "flat") if rerank else S._faiss_index(f, "flat", None)
        return S._row_block(f, sp, cam, 0.1, 5, 8, *rows, rerank, 1, "flat", None, built, 4 if rerank else None)

    whole = block()
    if rerank:
        assert 0 < whole["widened"].sum() < rows[1] - rows[0] and whole["max_widened"].any()
    monkeypatch.setattr(S, "ROW_CHUNK", 13)
    chunked = block()
    assert whole.keys() == chunked.keys() and len(whole["kappa"]) == rows[1] - rows[0]
    for key in whole:  # a maximum searched again comes from a product of other rows: BLAS rounding
        check = np.testing.assert_array_equal if key != "hi" else partial(np.testing.assert_allclose, atol=1e-6)
        check(chunked[key], whole[key], err_msg=key)


def test_round_refuses_no_farthest_images(rng):
    """k_far < 1 leaves the re-ranking's row maximum unknown: a clear error, not a native one."""
    f = rng.standard_normal((30, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="k_far"):
        S.sparse_inter_round(f, None, rng.integers(0, 3, 30), 5, k=24, k_far=0)
