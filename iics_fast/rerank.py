"""Sparse k-reciprocal re-ranking (Zhong et al., CVPR 2017) exactly as IICS runs it.

IICS re-ranks the all-vs-all distance before every agglomerative clustering. Its code sorts whole
rows and keeps several dense N x N arrays (about 45 GB at MSMT17's N = 32,621). The algorithm
only needs each row's k1 + 1 nearest neighbours, a sparse V (tens to a few hundred non-zeros a
row) and a Jaccard distance through an inverted index, so `k_reciprocal` keeps O(N * k1 * k2)
memory at worst beside the matrix (about 1 KB a sample in practice) and writes the dense result
straight into the input buffer or the condensed layout (upper triangle i < j, SciPy `pdist`
order) that the clustering reads.

What the reference computes, and this module with it, for a symmetric distance D:

* ``norm[i, j] = (D[i, j] - min_i) / (max_i - min_i)`` with row i's own min and max (diagonal
  included), so ``norm`` is not symmetric. A constant row (max == min) normalises to 0.
* Rows are ranked by ``norm``; ties go to the smaller index (a stable sort; the reference's
  quicksort leaves tie order unspecified).
* R(i) = the k-reciprocal neighbours of i among its k1 + 1 nearest; every candidate c in R(i)
  whose own k-reciprocal set at round(k1 / 2) + 1 neighbours overlaps R(i) by more than 2/3 adds
  that set. Weights ``exp(-norm)`` normalised to sum 1 form row i of V (float16, as in the
  reference), then V is averaged over each row's k2 nearest neighbours (query expansion).
* ``jaccard[i, j] = 1 - m / (2 - m)``, m = sum_c min(V[i, c], V[j, c]) accumulated in float16,
  negatives clamped to 0; ``final = (1 - lambda) * jaccard + lambda * norm`` (jaccard term in
  float16, as in the reference, the sum in float32).

The condensed output holds ``final[i, j]`` for i < j: the upper triangle the reference's
clustering reads, normalised by row i.

Every float16 and float32 operation is rounded as NumPy rounds it, so the result equals the
reference bit for bit, with one exception: the weights' exp is correctly rounded here, while
NumPy's float32 exp is sometimes an ulp off; in rare entries that moves the result by up to
~2e-3 (see `k_reciprocal_ref`).
"""
from __future__ import annotations

import numpy as np

from . import condensed

__all__ = ["k_reciprocal", "k_reciprocal_ref"]


def _expansion_width(k1: int) -> int:
    """round(k1 / 2) + 1 with NumPy's round-half-to-even, as the reference computes it."""
    return int(np.around(k1 / 2)) + 1


def k_reciprocal_ref(dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                     stable: bool = True, exact_exp: bool = False) -> np.ndarray:
    """Dense transcription of the reference re-ranking; returns the full (N, N) float32 result.

    `dist` is a square float32 matrix (column j normalised by its own min and max, then
    transposed, as the reference does) or a condensed one (zero diagonal). With
    ``stable=False`` rows are ranked by NumPy's default quicksort like the reference, whose order
    of tied entries is unspecified; the default stable sort breaks ties by index, the rule the
    fast path follows. NumPy's float32 exp is often an ulp off the correctly rounded value the
    fast path uses; rarely that flips a float16 rounding of V, which moves the few entries
    sharing it by up to ~2e-3 (one float16 step of the Jaccard sum m, times the slope of
    1 - m / (2 - m)). ``exact_exp=True`` rounds exp from float64 instead, and then the two
    agree bit for bit.
    Memory: several N x N arrays; for tests and baselines only.
    """
    d = _as_numpy(dist)
    if d.ndim == 1:
        d = condensed.to_square(np.asarray(d, np.float32))
    norm = _normalise_columns_ref(np.asarray(d, np.float32))
    rank = np.argsort(norm, kind="stable" if stable else "quicksort").astype(np.int32)
    V = _weights_ref(norm, rank, k1, exact_exp)
    if k2 != 1:
        expanded = np.zeros_like(V)
        for i in range(len(V)):
            expanded[i, :] = np.mean(V[rank[i, :k2], :], axis=0)
        V = expanded
    jaccard = _jaccard_ref(V)
    # lambda = 0 returns the float16 jaccard in the reference: the same values as this sum.
    return jaccard * (1 - lambda_value) + norm * lambda_value


def _normalise_columns_ref(d: np.ndarray) -> np.ndarray:
    """Each column shifted by its min, divided by its range, then transposed (the reference's
    normalisation); a constant column normalises to 0 instead of 0/0."""
    shifted = d - np.min(d, axis=0)
    top = np.max(shifted, axis=0)
    top[top == 0] = 1
    return np.transpose(shifted / top)


def _reciprocal_ref(rank: np.ndarray, i, k: int) -> np.ndarray:
    """Row i's k-reciprocal neighbours among its k nearest (in rank order)."""
    forward = rank[i, :k]
    return forward[np.where(rank[forward, :k] == i)[0]]


def _weights_ref(norm: np.ndarray, rank: np.ndarray, k1: int, exact_exp: bool) -> np.ndarray:
    """The float16 (N, N) V: row i's expanded k-reciprocal set weighted by exp(-norm), summing
    to 1 (see `k_reciprocal_ref` for ``exact_exp``)."""
    n = len(norm)
    half = int(np.around(k1 / 2)) + 1  # the reference's own expression (not the fast path's helper)
    V = np.zeros((n, n), np.float16)
    for i in range(n):
        reciprocal = _reciprocal_ref(rank, i, k1 + 1)
        expansion = reciprocal
        for cand in reciprocal:
            cand_reciprocal = _reciprocal_ref(rank, cand, half)
            overlap = len(np.intersect1d(cand_reciprocal, reciprocal))
            if overlap > 2 / 3 * len(cand_reciprocal):
                expansion = np.append(expansion, cand_reciprocal)
        expansion = np.unique(expansion)
        if exact_exp:
            weight = np.exp(-norm[i, expansion].astype(np.float64)).astype(np.float32)
        else:
            weight = np.exp(-norm[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    return V


def _jaccard_ref(V: np.ndarray) -> np.ndarray:
    """The float16 Jaccard distance 1 - m / (2 - m) between V's rows, m summed in float16
    through an inverted index, negatives clamped to 0."""
    n = len(V)
    inverted = [np.where(V[:, c] != 0)[0] for c in range(n)]
    jaccard = np.zeros((n, n), np.float16)
    for i in range(n):
        common = np.zeros(n, np.float16)
        for c in np.where(V[i, :] != 0)[0]:
            rows = inverted[c]
            common[rows] = common[rows] + np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1 - common / (2 - common)
    jaccard[jaccard < 0] = 0
    return jaccard


def _as_numpy(x):
    """NumPy view of an ndarray or a CPU torch tensor (zero-copy); TypeError/ValueError else."""
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(
                f"k_reciprocal runs on the CPU; got a tensor on {x.device}. Move it with "
                "`dist.cpu()` (the re-ranking is memory-bound host work).")
        return x.detach().numpy()
    raise TypeError(f"expected a NumPy array or a torch CPU tensor, got {type(x).__name__}")


def _check_matrix(d: np.ndarray, name: str) -> tuple[int, bool]:
    """(N, is_square) of a float32 C-contiguous square or condensed matrix; raises otherwise."""
    if d.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {d.dtype}; convert with .astype(np.float32)")
    if d.ndim == 2:
        if d.shape[0] != d.shape[1]:
            raise ValueError(f"{name} must be square (N, N) or condensed (N*(N-1)/2,), "
                             f"got shape {d.shape}")
        n, square = d.shape[0], True
    elif d.ndim == 1:
        n, square = condensed.points(d.shape[0]), False
        if n < 0:
            raise ValueError(f"{name} has length {d.shape[0]}, not N*(N-1)/2 for any N: pass a "
                             "condensed upper triangle (scipy.spatial.distance.pdist order)")
    else:
        raise ValueError(f"{name} must be square (N, N) or condensed (N*(N-1)/2,), "
                         f"got {d.ndim} dimensions")
    if not d.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; use np.ascontiguousarray")
    return n, square


def _check_parameters(n: int, k1, k2, lambda_value) -> None:
    """Raise a ValueError naming the problem for too few samples or a bad k1, k2 or lambda."""
    if n < 2:
        raise ValueError(f"re-ranking needs at least 2 samples, got N = {n}")
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    if k2 > k1 + 1:
        raise ValueError(f"k2 = {k2} exceeds k1 + 1 = {k1 + 1}: query expansion reads each "
                         "row's k2 nearest neighbours out of the k1 + 1 kept; lower k2")
    if not isinstance(lambda_value, (int, float, np.floating)) or not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")


def _output_buffer(out, dist, d: np.ndarray, n: int, in_square: bool):
    """(NumPy buffer to write, object to return) for `k_reciprocal`'s ``out``: a new array or
    tensor (memory checked first), or the caller's buffer once checked for size, writeability
    and partial overlap with ``dist``."""
    if out is None or isinstance(out, str):
        layout = {None: in_square, "square": True, "condensed": False}.get(out)
        if layout is None:
            raise ValueError(f"out must be None, 'square', 'condensed' or an array, got {out!r}")
        shape = (n, n) if layout else (n * (n - 1) // 2,)
        from .memory import require
        require(4 * int(np.prod(shape)) + 1024 * n, f"re-ranking N = {n} samples (a new output)",
                way_out="pass out=dist to re-rank in place, or use fewer samples")
        o = np.empty(shape, np.float32)
        if isinstance(dist, np.ndarray):
            return o, o
        import torch
        return o, torch.from_numpy(o)
    o = _as_numpy(out)
    m, _ = _check_matrix(o, "out")
    if m != n:
        raise ValueError(f"out has room for N = {m} samples but dist has N = {n}")
    if not o.flags.writeable:
        raise ValueError("out is read-only; pass a writeable buffer")
    same = (o.__array_interface__["data"][0] == d.__array_interface__["data"][0]
            and o.shape == d.shape)
    if not same and np.may_share_memory(o, d):
        raise ValueError("out overlaps dist without being dist itself: pass dist (in "
                         "place, same layout) or a separate buffer")
    return o, out


def k_reciprocal(dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, out=None):
    """Re-rank an all-vs-all distance; returns `out` holding the result.

    dist: float32 NumPy array or torch CPU tensor, either square (N, N) — row i is sample i's
      distance to every sample; for a symmetric matrix this is the reference exactly, for an
      asymmetric one it equals the reference applied to the transpose — or condensed
      (N*(N-1)/2,), the upper triangle of a symmetric matrix with zero diagonal.
    out: None (a new array or tensor in dist's layout), "square" or "condensed" (a new one of
      that layout), or a float32 C-contiguous (N, N) or (N*(N-1)/2,) buffer, which may be
      `dist` itself (in place); it may not otherwise overlap `dist`.
      Square output holds every final[i, j]; condensed holds final[i, j] for i < j.
    k1, k2, lambda_value: the reference's k1 = 20, k2 = 6, lambda = 0.3. Neighbour lists are
      cut at N entries when N <= k1 (as the reference's slices are); k2 must be <= k1 + 1.

    Extra memory is O(N * k1 * k2) at worst, ~30 MB measured at N = 32,621, the work done row
    block by row block (OpenMP threads, GIL released). GPU tensors are refused with a
    ValueError; move them to the CPU. Raises TypeError/ValueError before writing anything on bad
    input, including NaN or inf entries.
    """
    d = _as_numpy(dist)
    n, in_square = _check_matrix(d, "dist")
    _check_parameters(n, k1, k2, lambda_value)
    o, result = _output_buffer(out, dist, d, n, in_square)

    from ._native import native
    # Lists stop at N entries, so k1 >= N acts like k1 = N (and stays within C++ int range).
    native().k_reciprocal(d, o, k1=min(int(k1), n), k_half=min(_expansion_width(int(k1)), n),
                          k2=min(int(k2), n),
                          jaccard_weight=float(np.float16(1 - lambda_value)),
                          dist_weight=float(np.float32(lambda_value)))
    return result
