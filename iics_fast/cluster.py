"""Agglomerative clustering on a precomputed distance matrix, in place, as both IICS stages need.

The reference runs scikit-learn's ``AgglomerativeClustering(linkage="average",
metric="precomputed")``, which reads the upper triangle (i < j) of the square matrix and hands it to
``scipy.cluster.hierarchy.linkage``, copying the matrix several times on the way (about 23 GB at
N = 32,621). Here the nearest-neighbour chain (Murtagh 1983) runs in C++ on the condensed upper
triangle itself, with O(N) extra memory: exact for the reducible linkages "average" (UPGMA, the
one IICS uses), "single", "complete" and "weighted" (WPGMA).

Inputs. ``dist`` is either condensed (1-D, length n(n-1)/2, SciPy ``pdist`` order) or square
(n x n), of which only the strict upper triangle i < j is read -- the re-ranked IICS distance is not
symmetric and, as in the reference, only i < j counts; the diagonal and lower triangle are ignored.
NumPy arrays or CPU torch tensors. Distances may be negative (the IICS inter-camera distance can be);
NaN or infinite ones are rejected.

Precision. The Lance-Williams update is computed in float64 and stored in the input's precision.
For float64 input the result is SciPy's, bit for bit (same tie rules, same arithmetic). For float32
input every updated cluster distance is rounded to float32 (relative error about 6e-8 a merge
level), so heights agree with SciPy run on the same values to about 1e-6 relative, and a pair of
candidate merges closer than that may be taken in the other order: with ties or near-ties the
partition can differ from a float64 run (both are then valid average-linkage dendrograms of the
float32 data up to rounding).
"""
import math
import numbers

import numpy as np

from . import condensed
from ._native import native

METHODS = {"single": 0, "complete": 1, "average": 2, "weighted": 3}
_INDEX_MAX = 2**31 - 1  # the core names points by int32


def _as_numpy(x, name):
    """A NumPy view of a NumPy array or CPU torch tensor (no copy)."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.split(".")[0] == "torch":
        if x.device.type != "cpu":
            raise ValueError(f"{name} is a torch tensor on {x.device}; move it to the CPU first "
                             "(tensor.cpu())")
        return x.detach().numpy()
    raise TypeError(f"{name} must be a NumPy array or a CPU torch tensor, got {type(x).__name__}")


def _num_points(arr, name="dist"):
    """n for a condensed (length n(n-1)/2) or square (n x n) distance array."""
    if arr.ndim == 1:
        m = arr.shape[0]
        n = condensed.points(m)
        if n < 0:
            raise ValueError(f"{name} has length {m}, which is not n*(n-1)/2 for any n: pass the "
                             "condensed upper triangle (scipy.spatial.distance.pdist order) or the "
                             "square n x n matrix")
    elif arr.ndim == 2:
        if arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
            raise ValueError(f"{name} has shape {arr.shape}: a 2-D distance matrix must be square "
                             "and non-empty (n x n)")
        n = arr.shape[0]
    else:
        raise ValueError(f"{name} has {arr.ndim} dimensions: pass a condensed (1-D) or square "
                         "(2-D) distance matrix")
    if n > _INDEX_MAX:
        raise ValueError(f"{name} describes {n} points; at most {_INDEX_MAX} are supported")
    return n


def _prepare(dist, method, inplace):
    """Validates everything before any work; returns (array for the core, n, method code,
    whether the core may overwrite the array)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {sorted(METHODS)}")
    arr = _as_numpy(dist, "dist")
    n = _num_points(arr)
    native_dtype = arr.dtype in (np.float32, np.float64)
    if inplace and not native_dtype:
        raise TypeError(f"inplace=True needs a float32 or float64 buffer, got {arr.dtype}; "
                        "convert it first or use inplace=False")
    if not native_dtype and not (np.issubdtype(arr.dtype, np.floating)
                                 or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"dist has dtype {arr.dtype}; distances must be real numbers")
    if not arr.flags.c_contiguous:
        raise ValueError("dist is not C-contiguous; pass np.ascontiguousarray(dist) "
                         "(or tensor.contiguous())")
    if inplace and not arr.flags.writeable:
        raise ValueError("inplace=True needs a writable buffer, but dist is read-only; "
                         "use inplace=False (one copy) or pass a writable array")
    core_inplace = inplace
    if not native_dtype:
        arr = arr.astype(np.float64)  # this conversion is the one copy
        core_inplace = True
    bad = native().cluster_first_nonfinite(arr)
    if bad >= 0:
        i, j = condensed.pair(n, bad)
        raise ValueError(f"dist has a NaN or infinite entry at pair ({i}, {j}) (of the upper "
                         "triangle); distances must be finite")
    return arr, n, METHODS[method], core_inplace


def linkage(dist, method="average", inplace=False):
    """Hierarchical agglomerative clustering; returns SciPy's linkage matrix Z.

    Z is (n-1) x 4 float64, rows sorted by merge height (stably, in the order the merges were
    found); row r merges clusters Z[r,0] < Z[r,1] (ids < n are points, id n+r is the cluster made
    by row r) at height Z[r,2] into a cluster of Z[r,3] points, exactly as
    ``scipy.cluster.hierarchy.linkage``. One point gives an empty (0, 4) Z.

    With inplace=False the triangle is copied once (a condensed copy, half a square one); with
    inplace=True the caller's float32/float64 C-contiguous buffer is destroyed and nothing of
    size O(n^2) is allocated (a square buffer is first compacted into its condensed prefix).
    """
    arr, _, code, core_inplace = _prepare(dist, method, inplace)
    return native().cluster_linkage(arr, code, core_inplace)


def agglomerative(dist, n_clusters=None, distance_threshold=None, method="average",
                  inplace=False):
    """Flat clustering: int64 labels 0..K-1, numbered by first appearance (point 0 is in cluster 0,
    the next point not in it starts cluster 1, ...).

    Exactly one of n_clusters (1..n: merge until that many clusters remain) or distance_threshold
    (do every merge of height < threshold, i.e. scikit-learn's
    ``n_clusters_ = count(distances_ >= threshold) + 1``) must be given. The merges are the first
    rows of ``linkage(dist, method, inplace)``; see there for inplace and input formats.
    """
    if (n_clusters is None) == (distance_threshold is None):
        raise ValueError("give exactly one of n_clusters and distance_threshold")
    if n_clusters is not None and (isinstance(n_clusters, bool)
                                   or not isinstance(n_clusters, numbers.Integral)):
        raise TypeError(f"n_clusters must be an integer, got {n_clusters!r}")
    if distance_threshold is not None:
        if isinstance(distance_threshold, bool) or not isinstance(distance_threshold, numbers.Real):
            raise TypeError(f"distance_threshold must be a real number, got "
                            f"{distance_threshold!r}")
        if math.isnan(distance_threshold):
            raise ValueError("distance_threshold is NaN")
    n = _num_points(_as_numpy(dist, "dist"))
    if n_clusters is not None and not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters} is outside 1..{n} (the number of points)")
    Z = linkage(dist, method=method, inplace=inplace)
    if n_clusters is not None:
        n_merges = n - int(n_clusters)
    else:
        n_merges = int(np.count_nonzero(Z[:, 2] < distance_threshold))
    return native().cluster_cut(Z, n, n_merges)


def quantile_threshold(dist, q):
    """The reference's distance threshold at quantile q: of the condensed distances, drop the
    exact zeros (the reference takes ``np.nonzero`` of the upper triangle), sort the rest
    ascending and take the one at rank ``round(q * count)`` (NumPy's round half to even; no
    interpolation).

    Exact, without sorting or copying: the zeros and negatives are counted in chunks, then a
    two-pass (float32) or four-pass (float64) radix selection with one 2^16-bin histogram a
    thread picks the value. dist: condensed 1-D array or CPU tensor, float32 or float64 (other
    real dtypes are converted, which copies).
    """
    arr = _as_numpy(dist, "dist")
    if arr.ndim != 1:
        raise ValueError(f"dist must be the condensed (1-D) distances, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("dist is empty: no pairwise distances to take a quantile of")
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise TypeError(f"q must be a real number, got {q!r}")
    if arr.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"dist has dtype {arr.dtype}; distances must be real numbers")
        arr = arr.astype(np.float64)
    if not arr.flags.c_contiguous:
        raise ValueError("dist is not contiguous; pass np.ascontiguousarray(dist)")
    C = native()
    bad = C.cluster_first_nonfinite(arr)
    if bad >= 0:
        raise ValueError(f"dist[{bad}] is NaN or infinite; distances must be finite")
    zeros, negatives = _zeros_and_negatives(arr)
    count = arr.shape[0] - zeros
    if count == 0:
        raise ValueError("every distance is 0: no nonzero distance to take a quantile of")
    rank = int(np.round(q * count)) if 0.0 <= q < 1.0 else -1
    if not 0 <= rank < count:
        raise ValueError(f"q={q} gives rank round(q * {count}) = {rank}, outside 0..{count - 1} "
                         f"(the nonzero distances); use 0 <= q < 1, a little lower")
    # sorted order: the negatives, then the zeros, then the positives
    return float(C.cluster_select_rank(arr, rank if rank < negatives else rank + zeros))


def _zeros_and_negatives(arr, chunk=1 << 22):
    """Counts of the exact zeros and of the negative entries of a 1-D array, chunk by chunk."""
    zeros = negatives = 0
    for start in range(0, arr.shape[0], chunk):
        block = arr[start:start + chunk]
        zeros += int(np.count_nonzero(block == 0))
        negatives += int(np.count_nonzero(block < 0))
    return zeros, negatives


# ----------------------------------------------------------------------------- references


def _condensed64(dist):
    arr = np.asarray(_as_numpy(dist, "dist"), dtype=np.float64)
    return condensed.upper(arr) if arr.ndim == 2 else arr.copy()


def linkage_ref(dist, method="average"):
    """Reference: scipy.cluster.hierarchy.linkage on the float64 upper triangle."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    cond = _condensed64(dist)
    if cond.size == 0:
        return np.zeros((0, 4))
    return scipy_linkage(cond, method=method)


def linkage_naive_ref(dist, method="average"):
    """Independent O(n^3) reference: repeatedly merge the closest pair of live clusters (lowest
    pair on ties) and update distances by Lance-Williams, in float64; SciPy's Z format."""
    cond = _condensed64(dist)
    D = condensed.to_square(cond, diagonal=np.inf)
    n = D.shape[0]
    size = np.ones(n)
    ident = list(range(n))  # the linkage id of the cluster held in each slot
    live = np.ones(n, bool)
    Z = np.zeros((max(n - 1, 0), 4))
    for r in range(n - 1):
        sub = np.where(live[:, None] & live[None, :], D, np.inf)
        i, j = divmod(int(np.argmin(sub)), n)
        i, j = min(i, j), max(i, j)
        h = D[i, j]
        a, b = size[i], size[j]
        for k in np.flatnonzero(live):
            if k in (i, j):
                continue
            if method == "average":
                d = (a * D[i, k] + b * D[j, k]) / (a + b)
            elif method == "single":
                d = min(D[i, k], D[j, k])
            elif method == "complete":
                d = max(D[i, k], D[j, k])
            else:
                d = 0.5 * (D[i, k] + D[j, k])
            D[j, k] = D[k, j] = d
        Z[r] = [min(ident[i], ident[j]), max(ident[i], ident[j]), h, a + b]
        live[i] = False
        size[j] = a + b
        ident[j] = n + r
    return Z


def cut_ref(Z, n, n_merges):
    """Reference flat cut: union-find over the first n_merges rows of Z, first-appearance labels."""
    parent = list(range(2 * n - 1))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for r in range(n_merges):
        parent[int(Z[r, 0])] = parent[int(Z[r, 1])] = n + r
    roots, labels = {}, np.empty(n, np.int64)
    for x in range(n):
        labels[x] = roots.setdefault(find(x), len(roots))
    return labels


def agglomerative_ref(dist, n_clusters=None, distance_threshold=None, method="average"):
    """Reference: SciPy's linkage, then the first n - n_clusters merges (or those of height <
    distance_threshold), labels by first appearance."""
    Z = linkage_ref(dist, method)
    n = Z.shape[0] + 1
    if n_clusters is not None:
        n_merges = n - n_clusters
    else:
        n_merges = int(np.count_nonzero(Z[:, 2] < distance_threshold))
    return cut_ref(Z, n, n_merges)


def quantile_threshold_ref(dist, q):
    """Reference: the nonzero distances sorted in full, value at rank round(q * count)."""
    arr = np.asarray(_as_numpy(dist, "dist"))
    nonzero = np.sort(arr[arr != 0])
    return float(nonzero[int(np.round(q * nonzero.shape[0]))])
