"""The sparse inter-camera round against the dense round, same input, same run.

    pytest benchmarks/bench_sparse.py -s                          # N = 3,000, C = 6
    IICS_BENCH_SCALE=large pytest benchmarks/bench_sparse.py -s   # N = 12,936, C = 6 (Market shape)

Input: the profiler's synthetic features (identities seen by several cameras), one classifier
head a camera of prototypes drawn from its images, and their softmax scores, dense for the dense
round and sparsified (eps 1e-3) for the sparse one. Ours is `sparse_inter_round` (k-NN graph,
edge terms, linkage without an N x N matrix); the peer is the dense round (fused Eq. 5 in a
condensed triangle, re-ranking in place, in-place average linkage), the path the trainer takes
when the matrix fits; at these sizes it is the faster one (the sparse round is for N where the
matrix does not fit: docs/sparse.md). Both end at the same k_inter clusters; their partitions must agree (ARI
>= 0.99 on two seeds) before anything is timed. Larger N: `python -m benchmarks.profile --mode
sparse` (docs/sparse.md).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.profile import MU, heads_from_samples, synthetic_features, synthetic_scores
from iics_fast import sparse as S

EPS = 1e-3
K_INTRA = 100  # prototypes a camera head (at most; fewer for a camera with fewer images)


def _size():
    return (12936, 6) if os.environ.get("IICS_BENCH_SCALE") == "large" else (3000, 6)


def inputs(n, cams, seed=0):
    """(features, camids, dense scores, sparse scores, dims) of one synthetic camera network."""
    feats, camids, _ = synthetic_features(n, cams, seed)
    heads = heads_from_samples(feats, camids, K_INTRA, seed)
    scores = synthetic_scores(feats, camids, heads)
    dims = [h.shape[0] for h in heads]
    return feats, camids, scores, S.sparse_scores(scores, dims, EPS, max_per_block=None), dims


def _k_inter(n):
    return min(800, n // 16)


def _ours(similarity):
    return lambda f, c, scores, sp: S.sparse_inter_round(f, sp, c, _k_inter(len(f)), MU, similarity=similarity)[0]


def _dense(similarity):
    return lambda f, c, scores, sp: S.inter_round_dense_ref(f, scores, c, _k_inter(len(f)), MU, similarity=similarity)


def build(impl, n, cams, similarity):
    """Inputs and a callable running `impl` ("ours" or "dense") whole on them (memory_probe)."""
    fn = (_ours if impl == "ours" else _dense)(similarity)
    fn(*inputs(200, cams, 1)[:4])  # warm-up: libraries, threads, native module
    args = inputs(n, cams)[:4]
    return lambda: fn(*args)


@pytest.mark.parametrize("similarity", ["rerank", "cosine"])
def test_bench_sparse_round_vs_dense(side_by_side, similarity):
    from sklearn.metrics import adjusted_rand_score

    n, cams = _size()
    aris = []
    for seed in (0, 1):
        args = inputs(n, cams, seed)[:4]
        aris.append(adjusted_rand_score(_dense(similarity)(*args), _ours(similarity)(*args)))
    assert min(aris) >= 0.99, f"ARI(sparse, dense) = {aris}"
    args = inputs(n, cams)[:4]
    size = dict(n=n, cams=cams, similarity=similarity)
    peer = f"dense round (fused Eq. 5{', re-ranking' if similarity == 'rerank' else ''}, in-place merge)"
    side_by_side(f"inter-camera round ({similarity})", f"N={n}, C={cams}, k_inter={_k_inter(n)}",
                 lambda: _ours(similarity)(*args), {peer: lambda: _dense(similarity)(*args)},
                 rounds=3, ours_label="iics_fast sparse round",
                 memory={"ours": dict(module_file=__file__, impl="ours", **size),
                         peer: dict(module_file=__file__, impl="dense", **size)},
                 extra={"ari_sparse_vs_dense": {"seeds": [0, 1], "ari": [float(a) for a in aris]},
                        "eps": EPS, "nnz_per_row": float(np.diff(args[3].ptr).mean())})
