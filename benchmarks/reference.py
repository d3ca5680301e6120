"""The IICS reference pipeline's clustering steps, re-created as a user would run them.

These are the baselines every speed and memory claim of iics_fast is measured against. They
follow the original IICS code path step by step, dense N x N matrices included:

* inter-camera similarity: ``1 - x x^T`` as a dense matrix, the generalised Jaccard of the
  per-camera softmax scores by a row loop (for each row, N x D |a - b| and a + b temporaries
  against all rows, then two row sums), a dense cross-camera mask from tiled camera ids, and
  ``dist -= mask * J * mu`` (the paper's Eq. 5);
* k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the IICS changes (see iics_fast.rerank):
  column min-max normalisation then transpose, a full N x N argsort, dense float16 V and query
  expansion, Jaccard through an inverted index, negatives clamped to 0;
* average-linkage clustering with scikit-learn's ``AgglomerativeClustering`` on the dense
  precomputed matrix.

They are deliberately unoptimised: fast code lives elsewhere in the package. ``rows=`` of
:func:`reference_jaccard` lets a profiler time a subset of the row loop and extrapolate (its
cost is the same for every row).
"""
from __future__ import annotations

import numpy as np
import torch

from iics_fast.pipeline import cluster_count

__all__ = [
    "reference_cosine_distance",
    "reference_jaccard",
    "reference_fuse",
    "reference_inter_camera_distance",
    "reference_rerank",
    "reference_cluster",
    "reference_intra_camera",
]


def _as_2d_float(name, x):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dims), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got {x.dtype}; cast with .astype(np.float32)")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_square(dist):
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(
            f"dist must be a dense square (n, n) matrix, got shape {dist.shape}; "
            "expand a condensed vector with scipy.spatial.distance.squareform first"
        )
    return dist


def reference_cosine_distance(features):
    """Dense ``1 - x x^T`` of L2-normalised features, float32 (n, n)."""
    x = torch.from_numpy(_as_2d_float("features", features))
    return (1 - torch.mm(x, x.t())).numpy()


def reference_jaccard(scores, rows=None):
    """Dense generalised Jaccard similarity of nonnegative score rows by the reference row loop.

    For each row i: ``|s_i - S|`` and ``s_i + S`` as N x D temporaries, intersection
    ``sum(sum - abs) / 2`` and union ``sum(sum + abs) / 2``. Returns float32 (n, n). With
    ``rows`` (indices) only those rows are computed and the others are left 0: that is for
    timing a subset of the loop, whose cost per row is constant.
    """
    s = torch.from_numpy(_as_2d_float("scores", scores))
    n = s.shape[0]
    if rows is None:
        rows = range(n)
    else:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"rows must index 0..{n - 1}, got range [{rows.min()}, {rows.max()}]")
    jac = torch.zeros((n, n))
    for i in rows:
        a = s[int(i)]
        abs_sub = torch.abs(a - s)
        both = a + s
        inter = (both - abs_sub).sum(dim=1) / 2
        union = (both + abs_sub).sum(dim=1) / 2
        jac[int(i), :] = inter / union
    return jac.numpy()


def reference_fuse(dist, jaccard, camids, mu):
    """``dist - mu * J * [cam_m != cam_n]`` with the dense tiled-camera mask, in place on dist."""
    dist = _check_square(dist)
    camids = np.asarray(camids)
    n = dist.shape[0]
    if camids.shape != (n,):
        raise ValueError(f"camids must have shape ({n},) to match dist, got {camids.shape}")
    cams = camids.reshape((n, 1))
    tiled = np.tile(cams, n)
    mask = np.array(tiled != tiled.T, dtype=np.float32)
    dist -= mask * jaccard * mu
    return dist


def reference_inter_camera_distance(features, scores, camids, mu, rows=None):
    """Eq. 5 distance as the reference computes it: dense float32 (n, n).

    ``rows`` restricts the Jaccard row loop (see :func:`reference_jaccard`); the result is then
    only meaningful on those rows.
    """
    features = _as_2d_float("features", features)
    scores = _as_2d_float("scores", scores)
    if features.shape[0] != scores.shape[0]:
        raise ValueError(f"features and scores must have the same number of rows, got {features.shape[0]} and {scores.shape[0]}")
    dist = reference_cosine_distance(features)
    jac = reference_jaccard(scores, rows=rows)
    return reference_fuse(dist, jac, camids, mu)


def reference_rerank(dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking of a dense (n, n) distance, the IICS variant; float32 (n, n).

    Each column is shifted by its minimum and divided by its maximum, then the matrix is
    transposed (so row i is normalised by its own range when ``dist`` is symmetric). Row i's
    k-reciprocal set R(i, k1) is expanded by any R(j, k1/2) (j in R(i, k1)) that shares more than
    2/3 of its members with R(i, k1); V holds exp(-d) weights on the expanded set, averaged over
    the k2 nearest rows (query expansion); the Jaccard distance comes from an inverted index of
    V's columns. Result: ``(1 - lambda) * jaccard + lambda * normalised``, not symmetric.
    """
    dist = _check_square(dist)
    if not (isinstance(k1, (int, np.integer)) and k1 >= 1 and isinstance(k2, (int, np.integer)) and k2 >= 1):
        raise ValueError(f"k1 and k2 must be positive integers, got k1={k1!r}, k2={k2!r}")
    n = dist.shape[0]
    d = dist.astype(np.float32) - np.min(dist, axis=0)
    d = np.transpose(d / np.max(d, axis=0))
    V = np.zeros_like(d).astype(np.float16)
    rank = np.argsort(d).astype(np.int32)
    half = int(np.around(k1 / 2))

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(n):
        r_i = reciprocal(i, k1)
        expanded = r_i
        for c in r_i:
            r_c = reciprocal(c, half)
            if len(np.intersect1d(r_c, r_i)) > 2 / 3 * len(r_c):
                expanded = np.append(expanded, r_c)
        expanded = np.unique(expanded)
        w = np.exp(-d[i, expanded])
        V[i, expanded] = w / np.sum(w)
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float16)
        for i in range(n):
            V_qe[i, :] = np.mean(V[rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del rank
    inverted = [np.where(V[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros_like(d, dtype=np.float16)
    for i in range(n):
        acc = np.zeros(shape=[1, n], dtype=np.float16)
        nonzero = np.where(V[i, :] != 0)[0]
        for j in nonzero:
            holders = inverted[j]
            acc[0, holders] = acc[0, holders] + np.minimum(V[i, j], V[holders, j])
        jaccard[i] = 1 - acc / (2 - acc)
    jaccard[jaccard < 0] = 0.0
    if lambda_value == 0:
        return jaccard.astype(np.float32, copy=False)
    return (jaccard * (1 - lambda_value) + d * lambda_value).astype(np.float32, copy=False)


def reference_cluster(dist, n_clusters):
    """Average-linkage labels from scikit-learn on the dense precomputed matrix (reads i < j)."""
    from sklearn.cluster import AgglomerativeClustering

    dist = _check_square(dist)
    if not 1 <= n_clusters <= dist.shape[0]:
        raise ValueError(f"n_clusters must be in [1, {dist.shape[0]}], got {n_clusters}")
    model = AgglomerativeClustering(n_clusters=int(n_clusters), metric="precomputed", linkage="average")
    return model.fit_predict(dist)


def reference_intra_camera(features, camids, k_intra=600):
    """Per camera: dense cosine distance, then average linkage into
    ``pipeline.cluster_count(n_c, k_intra)`` clusters. Returns global labels (cluster ids
    offset camera by camera), int64 (n,).
    """
    features = _as_2d_float("features", features)
    camids = np.asarray(camids)
    labels = np.empty(features.shape[0], dtype=np.int64)
    offset = 0
    for cam in np.unique(camids):
        idx = np.flatnonzero(camids == cam)
        k = cluster_count(idx.size, k_intra)
        if idx.size == 1:
            labels[idx] = offset
        else:
            labels[idx] = offset + reference_cluster(reference_cosine_distance(features[idx]), k)
        offset += k
    return labels
