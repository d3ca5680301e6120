from functools import partial

import numpy as np
import pytest
import torch

from iics_fast.evaluation import evaluate, evaluate_features, evaluate_ref


BACKENDS = ["torch", "native"]
ALL = [partial(evaluate, backend=b) for b in BACKENDS] + [evaluate_ref]


def _random_case(rng, num_q, num_g, num_pids=6, num_cams=3, levels=5):
    """Integer-valued distances (many ties, some negative), pids with junk -1 and distractor 0."""
    d = rng.integers(-2, levels, (num_q, num_g)).astype(np.float32)
    qp = rng.integers(-1, num_pids, num_q)
    gp = rng.integers(-1, num_pids, num_g)
    qc = rng.integers(0, num_cams, num_q)
    gc = rng.integers(0, num_cams, num_g)
    return d, qp, gp, qc, gc


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-12)
    assert a[1] == pytest.approx(b[1], abs=1e-12)




@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trial", range(12))
def test_matches_reference_with_ties(trial, backend, rng):
    num_q, num_g = int(rng.integers(1, 40)), int(rng.integers(1, 90))
    d, qp, gp, qc, gc = _random_case(rng, num_q, num_g)
    qp[0], qc[0] = 1, 0  # at least one query with a valid match
    gp[0], gc[0] = 1, 1
    max_rank = int(rng.integers(1, 120))  # often beyond the gallery
    ref = evaluate_ref(d, qp, gp, qc, gc, max_rank)
    got = evaluate(d, qp, gp, qc, gc, max_rank, backend=backend,
                   block_elems=int(rng.integers(1, 300)))
    assert got[0].shape == (max_rank,) and got[0].dtype == np.float64
    _assert_same(got, ref)


def test_block_size_backend_and_input_type_do_not_change_result(rng):
    d, qp, gp, qc, gc = _random_case(rng, 57, 131, num_pids=10)
    base = evaluate(d, qp, gp, qc, gc, 20)
    for backend in BACKENDS:
        for block in (1, 131, 132, 1000, 10**7):
            _assert_same(evaluate(d, qp, gp, qc, gc, 20, backend=backend, block_elems=block), base)
    _assert_same(evaluate(np.asfortranarray(d), qp, gp, qc, gc, 20, backend="native"), base)
    t = (torch.as_tensor(x) for x in (d, qp, gp, qc, gc))
    _assert_same(evaluate(*t, max_rank=20), base)
    _assert_same(evaluate(d.astype(np.float64), qp, gp, qc, gc, 20), base)
    _assert_same(evaluate(d.astype(np.float16), qp, gp, qc, gc, 20), base)  # small ints: exact


def test_hand_computed_example():
    # Gallery ranked by distance: g3 (pid 5, cam 0: same pid+cam -> dropped), g0 (pid 2),
    # g4 (pid 5, cam 1: hit), g1 (pid -1: junk), g2 (pid 0: distractor), g5 (pid 5, cam 2: hit).
    d = np.array([[0.2, 0.5, 0.6, 0.1, 0.3, 0.9]], np.float32)
    gp, gc = [2, -1, 0, 5, 5, 5], [1, 1, 1, 0, 1, 2]
    # Kept ranking: g0, g4 (hit at 2), g2, g5 (hit at 4). AP = (1/2 + 2/4) / 2.
    for fn in ALL:
        cmc, mAP = fn(d, [5], gp, [0], gc, max_rank=6)
        np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1, 1])
        assert mAP == pytest.approx(0.5)


def test_ties_are_broken_by_gallery_index():
    # All distances equal: the kept order is the gallery order.
    d = np.zeros((1, 4), np.float32)
    d[0, 1] = -0.0  # -0.0 ties with +0.0
    for fn in ALL:
        cmc, mAP = fn(d, [1], [0, 1, 0, 1], [0], [1, 1, 1, 1], max_rank=2)
        np.testing.assert_allclose(cmc, [0, 1])
        assert mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
        cmc, mAP = fn(d, [1], [1, 0, 0, 1], [0], [1, 1, 1, 1], max_rank=2)
        np.testing.assert_allclose(cmc, [1, 1])
        assert mAP == pytest.approx((1 + 2 / 4) / 2)


def test_queries_without_valid_match_are_skipped(rng):
    d, qp, gp, qc, gc = _random_case(rng, 30, 60)
    qp[:10] = 99  # pid absent from the gallery
    qp[10:15] = 98  # present only under the query's own camera
    gp[:3], gc[:3] = 98, qc[10]
    qc[10:15] = qc[10]
    gp[3], gc[3], qp[15], qc[15] = 3, 0, 3, 1  # make sure some query is valid
    full = evaluate(d, qp, gp, qc, gc, 10)
    kept = evaluate(d[15:], qp[15:], gp, qc[15:], gc, 10)
    _assert_same(full, kept)
    _assert_same(full, evaluate_ref(d, qp, gp, qc, gc, 10))


def test_junk_is_ignored_and_distractors_count(rng):
    d, qp, gp, qc, gc = _random_case(rng, 20, 40)
    gp[gp == -1] = 0
    qp[qp == 0] = 1  # queries are never distractors
    qp[0], qc[0], gp[0], gc[0] = 1, 0, 1, 1
    base = evaluate(d, qp, gp, qc, gc, 5)
    # Junk gallery items in front of everything change nothing.
    d_junk = np.concatenate([np.full((20, 7), -10, np.float32), d], 1)
    gp_junk = np.concatenate([np.full(7, -1), gp])
    gc_junk = np.concatenate([np.zeros(7, int), gc])
    _assert_same(evaluate(d_junk, qp, gp_junk, qc, gc_junk, 5), base)
    # The same items as distractors push every first match down by 7 ranks.
    cmc, mAP = evaluate(d_junk, qp, np.where(gp_junk == -1, 0, gp_junk), qc, gc_junk, 12)
    np.testing.assert_allclose(cmc[:7], 0)
    np.testing.assert_allclose(cmc[7:], base[0][:5])
    assert mAP < base[1]


def test_max_rank_beyond_gallery_saturates():
    d = np.array([[0.3, 0.1, 0.2]], np.float32)
    for fn in ALL:
        cmc, _ = fn(d, [1], [0, 0, 1], [0], [1, 1, 1], max_rank=8)
        np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1, 1, 1, 1])


def test_features_path_matches_reference(rng):
    qf = rng.standard_normal((45, 16)).astype(np.float32)
    gf = rng.standard_normal((150, 16)).astype(np.float32)
    gf[:45] += 2 * qf  # give queries near matches
    qp = rng.integers(0, 45, 45)
    gp = np.concatenate([qp, rng.integers(0, 45, 105)])
    qc, gc = rng.integers(0, 4, 45), rng.integers(0, 4, 150)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    ref = evaluate_ref(1 - qn @ gn.T, qp, gp, qc, gc, 30)
    for backend, block in [(b, k) for b in BACKENDS for k in (None, 7, 200)]:
        cmc, mAP = evaluate_features(qf, gf, qp, gp, qc, gc, 30, backend=backend, block_elems=block)
        np.testing.assert_allclose(cmc, ref[0], atol=1e-12)
        assert mAP == pytest.approx(ref[1], abs=1e-9)
    cmc, mAP = evaluate_features(torch.as_tensor(qf), torch.as_tensor(gf), qp, gp, qc, gc, 30)
    assert mAP == pytest.approx(ref[1], abs=1e-9)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(q_pids=np.zeros(4, int)), ValueError, "q_pids has 4 entries but there are 3 queries"),
        (dict(g_camids=np.zeros(4, int)), ValueError, "g_camids has 4 entries"),
        (dict(distmat=np.zeros(5, np.float32)), ValueError, "2-D"),
        (dict(distmat=np.zeros((3, 5), int)), TypeError, "floating point"),
        (dict(q_pids=np.zeros(3)), TypeError, "integers"),
        (dict(q_pids=np.zeros((3, 1), int)), ValueError, "1-D"),
        (dict(max_rank=0), ValueError, "max_rank"),
        (dict(distmat=np.zeros((0, 5), np.float32), q_pids=[], q_camids=[]), ValueError,
         "at least one query"),
        (dict(q_pids=np.full(3, 7)), ValueError, "no query has a valid match"),
        (dict(backend="fast"), ValueError, "backend must be"),
        (dict(backend="native", device="cuda"), ValueError, "runs on the CPU"),
    ],
)
def test_bad_input(change, exc, match):
    args = dict(distmat=np.zeros((3, 5), np.float32), q_pids=np.array([1, 1, 2]),
                g_pids=np.array([1, 2, 2, 3, 0]), q_camids=np.zeros(3, int),
                g_camids=np.ones(5, int), max_rank=5)
    args.update(change)
    with pytest.raises(exc, match=match):
        evaluate(**args)


def test_nan_rejected():
    d = np.zeros((3, 5), np.float32)
    d[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        evaluate(d, [1, 1, 2], [1, 2, 2, 3, 0], [0, 0, 0], [1] * 5)
    qf = np.ones((2, 4), np.float32)
    qf[0, 0] = np.nan
    with pytest.raises(ValueError, match="qf has 1 NaN"):
        evaluate_features(qf, np.ones((3, 4), np.float32), [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="same feature size"):
        evaluate_features(np.ones((2, 4)), np.ones((3, 5)), [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
