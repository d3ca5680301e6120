"""The inter-camera round without an N x N matrix: O(N (k + d)) memory, for 10^5 to 10^6 images.

The dense round (Eq. 5 -> k-reciprocal re-ranking -> average linkage, iics_fast.pipeline) stays
the exact reference; this module computes the same average linkage from sparse pieces
(docs/sparse.md has the derivations and measurements):

1. **Sparse scores** (`ScoreSparsifier`, `sparse_scores`): per image and camera head, the
   largest softmax entries until their mass reaches 1 - eps (at most `max_per_block`), the mass
   each head dropped spread evenly over its dropped entries (`tail`), and a few evenly spaced
   rows kept whole. Extraction feeds it batch by batch: the dense N x D matrix never exists.
   With full row sums S_a, S_b and dropped masses r_a, r_b, the kept-only Jaccard J~ and the
   even-tail estimate J^ satisfy

       0 <= J - J~ <= B,   |J - J^| <= B,   B = (S_a + S_b)(r_a + r_b) / max(S_a, S_b)^2

   (`jaccard_error_bound`); B <= 4 eps when no head hit the cap (S = C, r <= C eps). The round
   uses J_w, J^ with its tail terms weighed by w in [0, 1] fitted on the rows kept whole
   (`fit_tail_weight`), which lies between J~ and J^ and so within B of J too.
2. **Candidate graph** (`knn`): each image's k nearest by cosine through faiss (flat, exact, up
   to FLAT_MAX images, RERANK_FLAT_MAX for the re-ranking round; IVF above; faiss-gpu on CUDA
   where installed), symmetrised; Eq. 5 and the re-ranking's sparse terms on its edges only. The
   re-ranking also needs each row's farthest images: on a flat index on the host both ends come
   from one blocked product (`_both_ends`; a block of two row blocks serves both, F F^T being
   symmetric) instead of one faiss search each.
3. **Average linkage from sums** (`average_linkage`, the native SparseLinkage): a pair of
   clusters joined by the graph holds the exact sum of its pair values; every other pair's sum is
   a model made of per-cluster sums, exact for the cosine part
   (sum over A x B of 1 - cos = |A||B| - <F_A, F_B>). The closest pair overall is merged
   (priority queue over the graph's pairs, Lance-Williams sums) until k_inter clusters: every
   cluster carries a lower bound on its model distance to the clusters it has no edge to, and
   when the closest edge lies above a bound, those clusters' nearest clusters by the model are
   searched exactly (a blocked GEMM over the cluster sums) and become edges. The model only
   ranks: a pair of clusters whose sum holds model parts is re-checked before it may be merged
   (the model's heights count `recheck_margin` lower until then): the exact pair values are
   summed over the parts of A x B the model covered (rectangles of the two member lists, which
   merges only append to; each sample pair summed at most once, unless a pair of clusters' model
   part passes `max_rects` rectangles and is re-checked whole) and replace the model's, so every
   merge taken is at its exact height (up to the float32 rounding of each pair's value). The
   cosine round takes those sums' cosine part from feature sums (sum over R x C of 1 - cos =
   |R||C| - <F_R, F_C>) and only J_w pair by pair (`tile_jaccard`); the re-ranking round a
   product of features a rectangle.

Exact and approximate, `similarity="cosine"` (Eq. 5, then average linkage):
  exact    the cosine part of every cluster distance; Eq. 5 on every graph pair and in every
           merge taken, given J_w; the merge order on these exact values wherever the model errs
           by less than the margin and the k-NN search is exact (the flat index).
  approx.  J_w for J: J^ with its tail terms weighed by `fit_tail_weight` (within the bound
           above); the model that ranks the pairs to re-check (off the graph, Eq. 5's Jaccard
           term as a[c_i, c_j] + alpha_i + alpha_j, `jaccard_background`).
`similarity="rerank"` (Eq. 5, k-reciprocal re-ranking: row min-max normalisation, upper triangle
read, k1, k2, lambda; then average linkage), in addition:
  exact    each row's k1 + 1 nearest by Eq. 5 distance and its minimum when the k-th cosine
           neighbour is at least mu farther (rows failing this are searched again with
           4 k_candidates, info["rows_widened"]; those failing still are counted in
           info["rows_uncertified"]); the row maximum when the farthest search by cosine,
           widened until the last cosine searched bounds it (info["rows_max_widened"]; past
           GPU_K_MAX on a GPU index by an exact product on the host), certifies it. Both
           certificates need the exact (flat) index: an IVF index (above RERANK_FLAT_MAX images)
           certifies no row (info["rows_uncertified"], info["rows_max_uncertified"]); from these
           lists the k-reciprocal sets, V, the query expansion and the Jaccard distance of every
           pair sharing a column of V (the dense path's float16 arithmetic, on its own native
           code); the re-ranked value of every graph pair (graph = k-NN pairs and V-sharing
           pairs) and, in every merge taken, of every pair (off the graph: Jaccard distance 1,
           normalised by row min(i, j) as the dense round does).
  approx.  the ranking model off the graph takes the mean of the two rows' (min, range), which
           makes it a sum of per-cluster terms.
With k = N - 1 and eps = 0 every pair is on the graph and nothing is approximated: the partition is
the dense round's (tests/test_sparse.py; also to ARI on k-NN graphs).

Several processes (torch.distributed): each rank searches, and evaluates Eq. 5 on, the edges of
its contiguous block of rows (`distributed.shard_indices`); extraction sparsifies each rank's own
rows (`gather_sparse_scores`). Rank 0 receives the edge and neighbour lists, runs the
re-ranking's combinatorics and the linkage, and broadcasts the labels: equal to one process's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SparseScores", "ScoreSparsifier", "sparse_scores", "sparse_min_sums", "jaccard_on_edges",
           "jaccard_error_bound", "tile_jaccard", "knn", "sparse_inter_round", "inter_round_dense_ref", "FLAT_MAX",
           "RERANK_FLAT_MAX",
           "dense_round_bytes", "choose_inter_mode", "sparse_scores_ref", "average_linkage_ref",
           "gather_sparse_scores", "camera_jaccard", "jaccard_background"]

FLAT_MAX = 60_000  # above this many images the k-NN search uses an IVF index
RERANK_FLAT_MAX = 200_000  # the same for the re-ranking round, whose pairs IVF multiplies (docs/sparse.md)
GPU_K_MAX = 2048  # the largest k a faiss-gpu index searches
SEARCH_BUDGET = 1 << 24  # entries one search of the row max (rows x k, or rows x N on the host) or one
#                          block of `_both_ends`' product allocates
ROW_CHUNK = 16384  # rows whose candidate lists are built together
RECHECK_MARGIN = 2e-3  # heights the model may err by before its merge is re-checked (docs/sparse.md)


# ----------------------------------------------------------------------------- sparse scores


@dataclass
class SparseScores:
    """CSR rows of truncated score vectors: row i is col/val[ptr[i]:ptr[i+1]] (columns ascending,
    int32 / float32), with its full row sum `total` and the mass it dropped, `dropped`."""

    ptr: np.ndarray
    col: np.ndarray
    val: np.ndarray
    total: np.ndarray
    dropped: np.ndarray
    dims: tuple
    sample_rows: np.ndarray = None  # rows kept whole, for the Jaccard background
    sample_scores: np.ndarray = None
    tail: np.ndarray = None  # (n, blocks): a block's dropped mass / its dropped entries
    tail_weight: float = 1.0  # how much the tail terms of J^ count (fit_tail_weight)

    @property
    def offsets(self) -> np.ndarray:
        """Column offsets of the blocks (len(dims) + 1, int64)."""
        return np.concatenate([[0], np.cumsum(self.dims)]).astype(np.int64)

    @property
    def n(self) -> int:
        return len(self.ptr) - 1

    def rows(self, start: int, stop: int) -> SparseScores:
        """Rows [start, stop) as their own SparseScores."""
        a, b = int(self.ptr[start]), int(self.ptr[stop])
        keep = (self.sample_rows >= start) & (self.sample_rows < stop)
        return SparseScores(self.ptr[start:stop + 1] - a, self.col[a:b], self.val[a:b],
                            self.total[start:stop], self.dropped[start:stop], self.dims,
                            self.sample_rows[keep] - start, self.sample_scores[keep], self.tail[start:stop],
                            self.tail_weight)

    @staticmethod
    def concat(parts) -> SparseScores:
        """Rows of several SparseScores one after another."""
        parts = list(parts)
        offsets = np.cumsum([0] + [int(p.ptr[-1]) for p in parts])
        ptr = np.concatenate([np.zeros(1, np.int64)] + [p.ptr[1:] + o for p, o in zip(parts, offsets)])
        rows = np.cumsum([0] + [p.n for p in parts])
        return SparseScores(ptr, np.concatenate([p.col for p in parts]), np.concatenate([p.val for p in parts]),
                            np.concatenate([p.total for p in parts]), np.concatenate([p.dropped for p in parts]),
                            parts[0].dims, np.concatenate([p.sample_rows + r for p, r in zip(parts, rows)]),
                            np.concatenate([p.sample_scores for p in parts]), np.concatenate([p.tail for p in parts]),
                            parts[0].tail_weight)

    def dense(self) -> np.ndarray:
        """The truncated rows as a dense (n, D) float32 array (tests)."""
        out = np.zeros((self.n, sum(self.dims)), np.float32)
        rows = np.repeat(np.arange(self.n), np.diff(self.ptr))
        out[rows, self.col] = self.val
        return out


def sample_rows(n_total: int, sample: int) -> np.ndarray:
    """The min(sample, n_total) evenly spaced rows floor(t * n_total / sample) kept whole."""
    m = min(int(sample), int(n_total))
    return (np.arange(m, dtype=np.int64) * int(n_total)) // max(m, 1)


class ScoreSparsifier:
    """Turns batches of concatenated per-head scores (b, sum(dims)) into SparseScores: in every
    head's block, the largest entries until their sum reaches (1 - eps) x the block's sum, at most
    max_per_block of them (None: no cap). Feed `add(batch)` in row order, then `finish()`.

    The rows `sample_rows(n_total, sample)` are also kept whole: the round estimates from them the
    mean Jaccard between cameras, which it uses for pairs off its graph. `offset`: the global
    index of the first row fed here (a rank's share under several processes)."""

    def __init__(self, dims, eps: float = 1e-3, max_per_block: int | None = 32, n_total: int | None = None,
                 sample: int = 1024, offset: int = 0):
        dims = tuple(int(k) for k in dims)
        if not dims or min(dims) < 1:
            raise ValueError(f"dims must list each head's class count (>= 1), got {dims}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if max_per_block is not None and max_per_block < 1:
            raise ValueError(f"max_per_block must be >= 1 or None, got {max_per_block}")
        if sample and n_total is None:
            raise ValueError("give n_total (all images, all ranks) to keep the sampled rows, or sample=0")
        self.dims, self.eps, self.cap = dims, float(eps), max_per_block
        self._wanted = sample_rows(n_total, sample) if sample else np.zeros(0, np.int64)
        self._next = int(offset)
        self._parts = []
        self._starts = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(np.intp)

    def add(self, batch) -> None:
        s = torch.as_tensor(batch).float().contiguous()
        if s.ndim != 2 or s.shape[1] != sum(self.dims):
            raise ValueError(f"a score batch must be (b, {sum(self.dims)}), got {tuple(s.shape)}")
        # every block's sum in float64 (one pass; a NaN or inf entry makes its sum non-finite)
        sums = torch.from_numpy(np.add.reduceat(s.numpy(), np.asarray(self._starts), axis=1,
                                                dtype=np.float64)) if s.shape[0] else \
            torch.zeros(0, len(self.dims), dtype=torch.float64)
        if s.numel() and (not torch.isfinite(sums).all() or s.min() < 0):
            raise ValueError("scores must be finite and nonnegative (softmax outputs)")
        first = self._next
        self._next += s.shape[0]
        picked = self._wanted[(self._wanted >= first) & (self._wanted < self._next)] - first
        rows, cols, vals, tails = [], [], [], []
        total = sums.sum(1)
        kept = torch.zeros(s.shape[0], dtype=torch.float64)
        start = 0
        for b, k in enumerate(self.dims):
            block = s[:, start:start + k]
            width = k if self.cap is None else min(k, self.cap)
            if width == k:
                v, idx = torch.sort(block, dim=1, descending=True, stable=True)
            else:  # the cap's top entries only (ties: the lower column first, as a stable sort)
                v, idx = _stable_top(block, width)
            csum = torch.cumsum(v.double(), 1)
            block_total = sums[:, b]
            target = (1.0 - self.eps) * block_total[:, None]
            count = (csum < target).sum(1) + 1  # entries up to the first that reaches the target
            count = count.clamp(max=width)
            if self.eps == 0:
                count = torch.full_like(count, width)
            keep = torch.arange(width)[None, :] < count[:, None]
            r, t = keep.nonzero(as_tuple=True)
            rows.append(r)
            cols.append(idx[r, t] + start)
            vals.append(v[r, t])
            block_kept = torch.where(keep, v.double(), torch.zeros((), dtype=torch.float64)).sum(1)
            kept += block_kept
            left = (k - count).double()
            tails.append(torch.where(left > 0, (block_total - block_kept).clamp_min(0) / left.clamp_min(1), 0.0))
            start += k
        r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        order = torch.argsort(r * sum(self.dims) + c)  # row-major, columns ascending
        ptr = torch.zeros(s.shape[0] + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.bincount(r, minlength=s.shape[0]), 0)
        tail = (torch.stack(tails, 1).float().numpy() if tails
                else np.zeros((0, len(self.dims)), np.float32))
        self._parts.append(SparseScores(
            ptr.numpy(), c[order].to(torch.int32).numpy(), v[order].numpy(),
            total.float().numpy(), (total - kept).clamp_min(0).float().numpy(),
            self.dims, picked, s[torch.from_numpy(picked)].numpy(), tail))

    def finish(self) -> SparseScores:
        if not self._parts:
            self.add(torch.zeros(0, sum(self.dims)))
        out = SparseScores.concat(self._parts)
        self._parts = []
        return out


def _stable_top(block, width):
    """The `width` largest entries of each row, descending, ties to the lower column (the order
    of a stable descending sort), without sorting whole rows."""
    v, idx = torch.topk(block, width + 1, dim=1, sorted=True)
    if bool((v[:, width - 1] == v[:, width]).any()):
        # a value tied at the cut has copies outside the top `width`: the stable sort decides
        v, idx = torch.sort(block, dim=1, descending=True, stable=True)
        return v[:, :width], idx[:, :width]
    v, idx = v[:, :width], idx[:, :width]
    # topk leaves the order of equal values unspecified: columns ascending, then values
    # descending, both stable
    by_col = torch.argsort(idx, dim=1, stable=True)
    v, idx = torch.gather(v, 1, by_col), torch.gather(idx, 1, by_col)
    by_val = torch.argsort(-v, dim=1, stable=True)
    return torch.gather(v, 1, by_val), torch.gather(idx, 1, by_val)


def sparse_scores(scores, dims, eps: float = 1e-3, max_per_block: int | None = 32, batch: int = 4096,
                  sample: int = 1024, n_total: int | None = None):
    """SparseScores of a dense (N, D) score array, or of an iterable of row batches (then give
    n_total for the sampled rows)."""
    if n_total is None and isinstance(scores, (np.ndarray, torch.Tensor)):
        n_total = len(scores)
    sp = ScoreSparsifier(dims, eps, max_per_block, n_total, sample)
    if isinstance(scores, (np.ndarray, torch.Tensor)):
        for start in range(0, len(scores), batch):
            sp.add(scores[start:start + batch])
    else:
        for b in scores:
            sp.add(b)
    return sp.finish()


def _native():
    from ._native import native
    return native()


def sparse_min_sums(sp: SparseScores, ei, ej, tail: bool = False) -> np.ndarray:
    """sum_c min(a_c, b_c) of rows ei[e], ej[e] (float32): over the kept entries, or with
    tail=True over rows whose dropped entries each hold their block's dropped mass evenly, the
    terms holding such a tail counted sp.tail_weight times (1 unless fitted)."""
    ei = np.ascontiguousarray(ei, np.int32)
    ej = np.ascontiguousarray(ej, np.int32)
    extra = (sp.offsets, np.ascontiguousarray(sp.tail, np.float32), float(sp.tail_weight)) if tail \
        else (None, None, 1.0)
    return _native().sparse_min_sums(np.ascontiguousarray(sp.ptr, np.int64), sp.col, sp.val, ei, ej, *extra)


def fit_tail_weight(sp: SparseScores, camids, rows: int = 256) -> float:
    """The weight w in [0, 1] of J^'s tail terms that best fits, by least squares on m, the exact
    sum of minima m between `rows` evenly spaced rows kept whole (pairs of different cameras):
    m ~ m_kept + w (m^ - m_kept). The even tail overstates the overlap of two dropped tails
    (their entries vary, and the mean of a minimum is below the minimum of the means); any w in
    [0, 1] keeps J within jaccard_error_bound, as m_kept <= m_w <= m^. 1 without such rows."""
    from .similarity import pairwise_jaccard

    if sp.sample_rows is None or len(sp.sample_rows) < 2:
        return 1.0
    pick = sample_rows(len(sp.sample_rows), rows)
    glob = sp.sample_rows[pick]
    whole = np.ascontiguousarray(sp.sample_scores[pick], np.float32)
    J = pairwise_jaccard(torch.from_numpy(whole)).numpy().astype(np.float64)
    tot = whole.sum(1, dtype=np.float64)
    a, b = np.triu_indices(len(pick), 1)
    cam = np.asarray(camids)[glob]
    cross = cam[a] != cam[b]
    a, b = a[cross], b[cross]
    if len(a) == 0:
        return 1.0
    m = J[a, b] * (tot[a] + tot[b]) / (1.0 + J[a, b])
    one = SparseScores(**{**sp.__dict__, "tail_weight": 1.0})
    kept = sparse_min_sums(one, glob[a], glob[b]).astype(np.float64)
    tail = sparse_min_sums(one, glob[a], glob[b], tail=True).astype(np.float64) - kept
    den = float(tail @ tail)
    return float(np.clip((m - kept) @ tail / den, 0.0, 1.0)) if den > 0 else 1.0


def jaccard_on_edges(sp: SparseScores, ei, ej, tail: bool = True) -> np.ndarray:
    """m / (S_a + S_b - m) with m = sparse_min_sums(sp, ei, ej, tail) and S the full row sums,
    float32, 0 for two all-zero rows: J~ (tail=False, never above J) or the even-tail estimate
    (tail=True, the round's choice); both lie within jaccard_error_bound of J."""
    m = sparse_min_sums(sp, ei, ej, tail).astype(np.float64)
    den = sp.total[ei].astype(np.float64) + sp.total[ej] - m
    return np.where(den > 0, m / np.where(den > 0, den, 1), 0).astype(np.float32)


def tile_jaccard(sp: SparseScores, rows, rows_ptr, cols, cols_ptr, camids=None, tail: bool = True,
                 isa: str = "auto") -> np.ndarray:
    """jaccard_on_edges of every pair of each tile rows[rows_ptr[t]:rows_ptr[t + 1]] x
    cols[cols_ptr[t]:cols_ptr[t + 1]], tile after tile, row-major (float32); with camids, 0 for
    the pairs within one camera (Eq. 5 masks them). Native: a row's kept values are spread once
    into a dense vector and the other rows' entries looked up in it (16 a gather with isa "auto"
    on an AVX-512 CPU, or "avx512"; one by one with "plain"), instead of a merge of two rows a
    pair."""
    extra = (np.ascontiguousarray(sp.tail, np.float32), float(sp.tail_weight)) if tail else (None, 1.0)
    cams = None if camids is None else np.ascontiguousarray(camids, np.int64)
    return _native().sparse_tile_jaccard(
        np.ascontiguousarray(sp.ptr, np.int64), sp.col, sp.val, np.ascontiguousarray(sp.total, np.float32),
        np.ascontiguousarray(rows, np.int32), np.ascontiguousarray(rows_ptr, np.int64),
        np.ascontiguousarray(cols, np.int32), np.ascontiguousarray(cols_ptr, np.int64), sp.offsets, *extra, cams,
        isa)


def jaccard_error_bound(sp: SparseScores, ei, ej) -> np.ndarray:
    """Upper bound on J - J~ for the pairs (ei, ej): (S_a + S_b)(r_a + r_b) / max(S_a, S_b)^2."""
    sa, sb = sp.total[ei].astype(np.float64), sp.total[ej].astype(np.float64)
    big = np.maximum(sa, sb)
    r = sp.dropped[ei].astype(np.float64) + sp.dropped[ej]
    return np.where(big > 0, (sa + sb) * r / np.where(big > 0, big, 1) ** 2, 0.0)


# ----------------------------------------------------------------------------- candidate graph


def _index_kind(n: int, index: str, rerank: bool = False) -> str:
    """The k-NN index `index` names; "auto": flat (exact) up to FLAT_MAX images, or
    RERANK_FLAT_MAX for the re-ranking round, IVF above."""
    if index not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be 'auto', 'flat' or 'ivf', got {index!r}")
    return index if index != "auto" else ("flat" if n <= (RERANK_FLAT_MAX if rerank else FLAT_MAX) else "ivf")


def _on_gpu(device) -> bool:
    import faiss

    return device is not None and torch.device(device).type == "cuda" and hasattr(faiss, "StandardGpuResources")


def _faiss_index(x: np.ndarray, index: str, device):
    import faiss

    n, d = x.shape
    kind = _index_kind(n, index)
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
    elif kind == "ivf":  # 2 sqrt(N) lists trained on 40 samples a list, 16 probed
        nlist = max(1, int(2 * math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = x[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
        idx.cp.seed = 0
        idx.cp.niter = 10
        idx.train(sample)
        idx.nprobe = min(nlist, 16)
    if _on_gpu(device):
        idx = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), torch.device(device).index or 0, idx)
    idx.add(x)
    return idx, kind


def knn(features, k: int, rows=None, index: str = "auto", device=None, _built=None):
    """The k nearest (largest cosine) samples of rows [r0, r1) of L2-normalised float32
    `features`, self included where it falls in: (cos (m, k) float32, indices (m, k) int64), best
    first. Flat (exact) up to FLAT_MAX images, IVF (approximate) above, or as `index` says."""
    x = np.ascontiguousarray(features, np.float32)
    r0, r1 = (0, len(x)) if rows is None else rows
    idx, _ = _built if _built is not None else _faiss_index(x, index, device)
    return idx.search(x[r0:r1], min(k, len(x)))


def _search_k_max(idx) -> float:
    """The largest k the index searches: faiss-gpu refuses k above GPU_K_MAX (no index: the
    exact product on the host, any k)."""
    return GPU_K_MAX if type(idx).__name__.startswith("Gpu") else math.inf


def _farthest(f, built, q, kf):
    """(cos, ids) of the kf farthest (smallest cosine) images of rows q: the index's search, or,
    without an index or where it cannot search kf (a GPU index), the exact product of those rows
    with every image on the host."""
    idx = built[0]
    if idx is not None and kf <= _search_k_max(idx):
        sims, ids = idx.search(np.ascontiguousarray(-f[q]), kf)
        return -sims, ids
    cos = f[q] @ f.T
    ids = np.argpartition(cos, kf - 1, axis=1)[:, :kf]
    return np.take_along_axis(cos, ids, 1), ids


def _one_product(rerank: bool, kind: str, device) -> bool:
    """Whether the round takes both ends of each row from one product (`_both_ends`) instead of a
    faiss index: the re-ranking (which needs both) on a flat index on the host."""
    return rerank and kind == "flat" and not _on_gpu(device)


def _both_ends(f, r0, r1, k_near, k_far):
    """Rows [r0, r1)'s k_near nearest (largest cosine, best first) and k_far farthest (smallest
    cosine, farthest first) among the normalised rows f, exactly: ((cos, ids), (cos, ids)), int32
    ids, equal cosines by index. The re-ranking needs both ends of every row. The product of the
    rows with every image goes block by block (within SEARCH_BUDGET entries) into running lists
    (`sparse_top_update`); F F^T is symmetric, so a block of two row blocks serves both: the
    rows' own square is computed once, half the product a faiss flat search takes for each end.
    The columns of other ranks' rows (under torch.distributed) go in blocks as wide as the budget
    allows."""
    native = _native()
    n, m = len(f), r1 - r0
    near = (np.full((m, k_near), -np.inf, np.float32), np.full((m, k_near), -1, np.int32))
    far = (np.full((m, k_far), np.inf, np.float32), np.full((m, k_far), -1, np.int32))
    bs = max(1, min(m, math.isqrt(SEARCH_BUDGET)))
    width = max(bs, SEARCH_BUDGET // bs)
    own = [(a, min(r1, a + bs)) for a in range(r0, r1, bs)]
    others = ([(a, min(r0, a + width)) for a in range(0, r0, width)]
              + [(a, min(n, a + width)) for a in range(r1, n, width)])
    buf = np.empty(bs * width, np.float32)
    for t, (a0, a1) in enumerate(own):
        for b0, b1 in own[t:] + others:
            p = np.matmul(f[a0:a1], f[b0:b1].T, out=buf[:(a1 - a0) * (b1 - b0)].reshape(a1 - a0, b1 - b0))
            native.sparse_top_update(p, a0, b0, r0, *near, *far, rows_side=True, cols_side=r0 <= b0 < r1 and b0 != a0)
    native.sparse_top_sort(*near, descending=True)
    native.sparse_top_sort(*far, descending=False)
    return near, far


def _both_ends_ref(f, r0, r1, k_near, k_far):
    """`_both_ends` plainly: each row's whole product with every image, sorted (ties by index)."""
    cos = f[r0:r1] @ f.T
    ids = np.arange(len(f))[None, :].repeat(r1 - r0, 0)
    near = np.lexsort((ids, -cos))[:, :k_near]
    far = np.lexsort((ids, cos))[:, :k_far]
    return tuple((np.take_along_axis(cos, o, 1), o.astype(np.int32)) for o in (near, far))


# ----------------------------------------------------------------------------- the round


class _Timer:
    """Wall time of the round's steps, recorded into its info dict (and told to `log`, when
    given, as each step ends, with the process's resident memory and its peak so far: a round in
    the 10^5s of images runs for many minutes, near the machine's memory)."""

    def __init__(self, log=None):
        import time
        self._clock = time.perf_counter
        self._t = self._clock()
        self._log = log

    def lap(self, info, key):
        now = self._clock()
        info[key] = round(now - self._t, 3)
        self._t = now
        if self._log is not None:
            from .memory import format_bytes, resident

            mem = resident()
            mem = f" (resident {format_bytes(mem[0])}, peak {format_bytes(mem[1])})" if mem else ""
            self._log(f"    {key[5:-2] if key.startswith('time_') else key}: {info[key]:.1f} s{mem}")


def _normalise(features) -> np.ndarray:
    f = torch.nn.functional.normalize(torch.as_tensor(features).float(), dim=1)
    return np.ascontiguousarray(f.numpy())


def _cross_jaccard(sp, camids, ei, ej):
    """J~ on the pairs, 0 for pairs within one camera (Eq. 5 masks them) or without scores."""
    out = np.zeros(len(ei), np.float32)
    if sp is None or len(ei) == 0:
        return out
    cross = camids[ei] != camids[ej]
    out[cross] = jaccard_on_edges(sp, ei[cross], ej[cross])
    return out


def _eq5(cos, sp, camids, mu, ei, ej, jac=None):
    """Eq. 5's distance 1 - cos - mu J~ [cameras differ] of the pairs (ei, ej) with cosines cos,
    float32; jac: their masked J~ when already computed (tile_jaccard with camids)."""
    if jac is None:
        jac = _cross_jaccard(sp, camids, ei, ej)
    return (1.0 - cos - mu * jac).astype(np.float32)


def _pair_cos(f, ei, ej):
    """cos of the pairs (float32) of the normalised rows f."""
    return _native().sparse_pair_dots(f, np.ascontiguousarray(ei, np.int32), np.ascontiguousarray(ej, np.int32))



def _sorted_candidates(ci, cj, cd):
    """Candidate triples sorted by row, then Eq. 5 distance, then index: two stable radix-friendly
    sorts (by index, then by row and distance in one int64 key; np.lexsort's order, 4x faster)."""
    by_j = torch.sort(torch.from_numpy(np.ascontiguousarray(cj)), stable=True).indices.numpy()
    bits = (cd[by_j] + np.float32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 ties 0.0
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # float order as 0 .. 2^32 - 1
    key = (ci[by_j].astype(np.int64) << 32) + bits
    order = by_j[torch.sort(torch.from_numpy(key), stable=True).indices.numpy()]
    return ci[order], cj[order], cd[order]


def _widen_candidates(f, sp, camids, mu, r0, cand, worst, k_rank, wide, built, listed=None):
    """Rows whose k_rank-th nearest candidate by Eq. 5 is farther than their certificate
    1 - worst - mu (an image outside the candidates might be nearer) get their `wide` nearest
    by cosine as candidates instead: from `listed` (every row's `wide` nearest, (cos, ids), when
    already found) or searched. Returns (candidates, worst, mask of the rows widened)."""
    ci, cj, cd = cand
    m = len(worst)
    starts = np.searchsorted(ci, np.arange(r0, r0 + m))
    count = np.diff(np.append(starts, len(ci)))
    redo = np.flatnonzero(cd[starts + np.minimum(k_rank, count) - 1] > 1.0 - worst - mu)
    widened = np.zeros(m, bool)
    if len(redo) == 0:
        return cand, worst, widened
    widened[redo] = True
    q = (r0 + redo).astype(np.int32)
    if listed is None:
        sims, ids = built[0].search(np.ascontiguousarray(f[q]), wide)
    else:
        sims, ids = listed[0][redo], listed[1][redo]
    rows = np.repeat(q, wide)
    ids, sims = ids.reshape(-1), sims.reshape(-1)
    ok = (ids >= 0) & (ids != rows)
    rows, ids, sims = rows[ok], ids[ok].astype(np.int32), sims[ok]
    d = _eq5(sims, sp, camids, mu, rows, ids)
    keep = ~widened[ci - r0] | (ci == cj)  # the widened rows keep only themselves
    worst = worst.copy()
    worst[redo] = np.inf
    np.minimum.at(worst, rows - r0, sims)
    return (_sorted_candidates(np.concatenate([ci[keep], rows]), np.concatenate([cj[keep], ids]),
                               np.concatenate([cd[keep], d])), worst, widened)


def _row_block(f, sp, camids, mu, k, k_cand, r0, r1, rerank, k_far, index, device, built, k_rank=None):
    """One block of rows' share of the round: their k-NN edges with Eq. 5 on them and, for the
    re-ranking, their candidate lists (the k_cand nearest by cosine; 4 k_cand for the rows whose
    k_rank-th nearest by Eq. 5 they do not certify) by Eq. 5 distance and the row min / max.
    The lists are built ROW_CHUNK rows at a time (`_row_chunk`): their sorts' temporaries, not
    the product, would otherwise set the round's peak memory."""
    n = len(f)
    kq = min(n, (max(k, k_cand) if rerank else k) + 1)
    ends = None
    if built[0] is None:  # the re-ranking on a flat index on the host: one product for both ends
        ends = _both_ends(f, r0, r1, min(n, 4 * kq), min(n, k_far))
    parts = []
    for a in range(r0, r1, ROW_CHUNK) or [r0]:  # a rank without rows still gives its (empty) arrays
        b = min(r1, a + ROW_CHUNK)
        wide, far = (None, None) if ends is None else (tuple(x[a - r0:b - r0] for x in end) for end in ends)
        parts.append(_row_chunk(f, sp, camids, mu, k, kq, a, b, rerank, k_far, index, device, built, k_rank,
                                wide, far))
    del ends, wide, far  # the last chunk's views would keep the whole lists alive
    if len(parts) == 1:
        return parts[0]
    block = {}
    for key in list(parts[0]):  # key by key, each part's array freed once copied
        block[key] = np.concatenate([p.pop(key) for p in parts])
    return block


def _row_chunk(f, sp, camids, mu, k, kq, r0, r1, rerank, k_far, index, device, built, k_rank, wide, far):
    """`_row_block` for rows [r0, r1), given their kq nearest to search (or, from `_both_ends`,
    their `wide` nearest and `far` farthest)."""
    n = len(f)
    if wide is not None:
        sims, ids = wide[0][:, :kq], wide[1][:, :kq]
    else:
        sims, ids = knn(f, kq, (r0, r1), index, device=device, _built=built)
    own = ids == np.arange(r0, r1)[:, None]
    before = np.cumsum(own, 1) - own  # self met earlier in the row
    in_graph = (np.arange(kq)[None, :] - before < k).reshape(-1)
    rows = np.repeat(np.arange(r0, r1), kq)
    ids = ids.reshape(-1)
    sims = sims.reshape(-1)
    ok = (ids >= 0) & ~own.reshape(-1)
    rows, ids, sims, in_graph = rows[ok], ids[ok], sims[ok], in_graph[ok]
    ei, ej, cos = rows.astype(np.int32), ids.astype(np.int32), sims
    d = _eq5(cos, sp, camids, mu, ei, ej)
    block = {"ei": ei[in_graph], "ej": ej[in_graph], "d": d[in_graph]}
    # every image outside a row's k-NN list has a cosine <= the list's last: the row's off-graph
    # bound (NaN for a row with fewer than k listed, whose bound is unknown)
    m = r1 - r0
    kappa = np.full(m, np.inf, np.float32)
    np.minimum.at(kappa, rows[in_graph] - r0, cos[in_graph])
    listed = np.bincount(rows[in_graph] - r0, minlength=m)
    block["kappa"] = np.where(listed >= min(k, n - 1), kappa, np.nan).astype(np.float32)
    block["listed"] = listed
    if not rerank:
        return block
    # candidates: self (distance 0) and the k-NN, ranked by Eq. 5 distance then index
    cand = _sorted_candidates(np.concatenate([np.arange(r0, r1, dtype=np.int32), ei]),
                              np.concatenate([np.arange(r0, r1, dtype=np.int32), ej]),
                              np.concatenate([np.zeros(m, np.float32), d]))
    # the smallest cosine among the candidates bounds every other image: d >= 1 - cos - mu
    worst = np.full(m, np.inf, np.float32)
    np.minimum.at(worst, rows - r0, sims)
    widened = np.zeros(m, bool)
    if k_rank is not None and kq < n:
        cand, worst, widened = _widen_candidates(f, sp, camids, mu, r0, cand, worst, k_rank, min(n, 4 * kq), built,
                                                 wide)
    cand_i, cand_j, cand_d = cand
    starts = np.searchsorted(cand_i, np.arange(r0, r1))  # every row has self and k others
    lo = np.minimum(0.0, np.minimum.reduceat(cand_d, starts))
    # the certificate assumes every image nearer than `worst` was searched: an IVF search may miss
    # some, so there it certifies no row
    bound = (1.0 - worst - mu) if built[1] == "flat" else np.full(m, -np.inf)
    block.update(cand_i=cand_i, cand_j=cand_j, cand_d=cand_d, bound=bound.astype(np.float32), widened=widened)
    # row max: the farthest by cosine, Eq. 5 on them; d <= 1 - cos for any pair
    hi, hi_exact, max_widened = _row_max(f, sp, camids, mu, r0, k_far, built,
                                         np.maximum(np.maximum.reduceat(cand_d, starts), 0.0), far)
    block.update(lo=lo.astype(np.float32), hi=hi, hi_exact=hi_exact, max_widened=max_widened)
    return block


def _row_max(f, sp, camids, mu, r0, k_far, built, floor, first=None):
    """The largest Eq. 5 distance of rows r0, r0 + len(floor), ... (at least `floor`) and a mask
    of the rows where it is certified. A row's k_far farthest by cosine get their Eq. 5 distance;
    every image not searched has a cosine >= the largest searched, so its d <= 1 - that cosine,
    and the maximum is certified when it reaches that. On an exact (flat) index the rows left
    uncertified are searched again with 4 times as many, until certified or every image was
    searched (beyond what a GPU index searches, GPU_K_MAX, by an exact product on the host; each
    search in chunks of rows within SEARCH_BUDGET); an IVF search may miss the farthest images, so
    it certifies nothing. first: every row's k_far farthest (cos, ids), when already found (the
    first pass then searches nothing; later ones use the index or, without one, the product).
    Returns (maxima, certified mask, mask of the rows searched more than once)."""
    n, m = len(f), len(floor)
    exact = built[1] == "flat"
    hi = floor.astype(np.float32)
    certified = np.zeros(m, bool)
    widened = np.zeros(m, bool)
    todo = np.arange(m)
    kf = min(n, k_far)
    while len(todo):
        host = built[0] is None or kf > _search_k_max(built[0])  # an exact product, rows x N, on the host
        chunk = max(1, SEARCH_BUDGET // (n if host else kf))
        done = np.zeros(len(todo), bool)
        for c0 in range(0, len(todo), chunk):
            part = todo[c0:c0 + chunk]
            q = (r0 + part).astype(np.int32)
            cos, ids = (first[0][part], first[1][part]) if first is not None else _farthest(f, built, q, kf)
            rows = np.repeat(q, kf)
            ids, cos = ids.reshape(-1), cos.reshape(-1)
            valid = ids >= 0
            d = np.full(len(ids), -np.inf, np.float32)
            d[valid] = _eq5(cos[valid], sp, camids, mu, rows[valid], ids[valid].astype(np.int32))
            hi[part] = np.maximum(hi[part], d.reshape(-1, kf).max(1))
            far_cos = np.where(valid, cos, np.inf).reshape(-1, kf).max(1)  # largest cosine searched
            done[c0:c0 + chunk] = (hi[part] >= 1.0 - far_cos) | (kf >= n)
        if not exact:
            break
        first = None
        certified[todo[done]] = True
        todo = todo[~done]
        widened[todo] = True
        kf = min(n, 4 * kf)
    return hi, certified, widened


def camera_jaccard(sp: SparseScores, camids) -> np.ndarray:
    """(C x C) mean generalised Jaccard between the sampled rows of each pair of cameras (exact,
    from the rows kept whole), indexed by the ranks of np.unique(camids); pairs of cameras
    without two sampled rows take the mean over all cross-camera sampled pairs; diagonal 0."""
    from .similarity import pairwise_jaccard

    cams, inv = np.unique(camids, return_inverse=True)
    if sp is None or sp.sample_rows is None or len(sp.sample_rows) < 2:
        return np.zeros((len(cams), len(cams)))
    J = pairwise_jaccard(torch.from_numpy(np.ascontiguousarray(sp.sample_scores))).numpy().astype(np.float64)
    return _pair_means(J, inv[sp.sample_rows], len(cams))


def _pair_means(J, c, ncams):
    """Mean of J over each pair of cameras (rows of camera c[i], columns of c[j], i != j), the
    mean over all cross-camera entries where a pair has none; diagonal 0."""
    one = np.eye(ncams)[c]
    count = np.bincount(c, minlength=ncams)
    pairs = np.outer(count, count) - np.diag(count)  # ordered pairs, i != j
    sums = one.T @ (J - np.diag(np.diag(J))) @ one
    cross = c[:, None] != c[None, :]
    fill = J[cross].mean() if cross.any() else 0.0
    out = np.where(pairs > 0, sums / np.maximum(pairs, 1), fill)
    np.fill_diagonal(out, 0.0)
    return out


def jaccard_background(sp: SparseScores, camids, probes: int = 64, batch: int = 8192):
    """The model of Eq. 5's Jaccard between two images of different cameras that the round
    uses off its graph: J(i, j) ~ a[c_i, c_j] + alpha_i + alpha_j, with a = camera_jaccard (the
    rows kept whole) and alpha_i, image i's own propensity, the mean over `probes` evenly
    spaced sampled rows t of other cameras of J^(i, t) - a^[c_i, c_t] (a^: the same camera-pair
    means of J^ among the probes, so that J^'s bias cancels). Returns (a, alpha)."""
    a = camera_jaccard(sp, camids)
    n = len(camids)
    alpha = np.zeros(n)
    if sp is None or sp.sample_rows is None or len(sp.sample_rows) < 2:
        return a, alpha
    cams, inv = np.unique(camids, return_inverse=True)
    pick = sp.sample_rows[sample_rows(len(sp.sample_rows), probes)]
    cp = inv[pick]
    ii, jj = np.meshgrid(np.arange(len(pick)), np.arange(len(pick)), indexing="ij")
    jp = jaccard_on_edges(sp, pick[ii.ravel()], pick[jj.ravel()]).astype(np.float64).reshape(len(pick), -1)
    ahat = _pair_means(jp, cp, len(cams))
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch))
        ei = np.repeat(rows, len(pick))
        ej = np.tile(pick, len(rows))
        tiles = -(-len(rows) // 64)  # 64-row tiles: the native kernel runs tiles in parallel
        rows_ptr = np.minimum(np.arange(tiles + 1) * 64, len(rows))
        jac = tile_jaccard(sp, rows, rows_ptr, np.tile(pick, tiles), np.arange(tiles + 1) * len(pick))
        resid = jac.astype(np.float64) - ahat[inv[ei], inv[ej]]
        cross = (inv[ei] != inv[ej]).reshape(len(rows), -1)
        resid = resid.reshape(len(rows), -1)
        alpha[rows] = (resid * cross).sum(1) / np.maximum(cross.sum(1), 1)
    return a, alpha


def _gather_blocks(block):
    """Every rank's block dict, concatenated in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from . import distributed as D

    if D.world_size() == 1:
        return block
    parts = [None] * D.world_size() if D.rank() == 0 else None
    dist.gather_object(block, parts, dst=0)
    if D.rank() != 0:
        return None
    return {key: np.concatenate([p[key] for p in parts]) for key in block}


def _pairs_lookup(n, ei, ej, values, presorted=False):
    """The directed pairs (ei, ej) of n rows and their values as a table for `_lookup`: a CSR
    by ei (ptr, ej ascending within a row, values in that order). presorted: the pairs are in
    that order already (sorted by ei * n + ej), so the table holds them without a copy."""
    if not presorted:
        order = np.argsort(ei.astype(np.int64) * n + ej, kind="stable")
        ei, ej, values = ei[order], ej[order], values[order]
    return np.searchsorted(ei, np.arange(n + 1)), np.ascontiguousarray(ej, np.int32), values


def _lookup(table, qi, qj):
    """values of the pairs (qi, qj) in the table (`_pairs_lookup`), and a mask of those found.
    Each query is a binary search among its row's pairs (native), not over every pair's key:
    the 10^8 re-checked pairs of a large round found in seconds, not minutes."""
    ptr, col, values = table
    if len(col) == 0:
        return np.zeros(len(qi), values.dtype), np.zeros(len(qi), bool)
    pos = _native().sparse_pair_find(ptr, col, np.ascontiguousarray(qi, np.int32),
                                     np.ascontiguousarray(qj, np.int32))
    found = pos >= 0
    return values[np.where(found, pos, 0)], found


def _lookup_ref(n, ei, ej, values, qi, qj):
    """`_lookup` plainly: a search over the sorted keys i * n + j of every pair."""
    order = np.argsort(ei.astype(np.int64) * n + ej, kind="stable")
    keys, values = ei[order].astype(np.int64) * n + ej[order], values[order]
    q = qi.astype(np.int64) * n + qj
    pos = np.clip(np.searchsorted(keys, q), 0, max(len(keys) - 1, 0))
    found = (keys[pos] == q) if len(keys) else np.zeros(len(q), bool)
    return values[pos] if len(keys) else np.zeros(len(q), values.dtype), found


def _undirected(ei, ej, values):
    """Unique pairs i < j (the first value met for a pair)."""
    a, b = np.minimum(ei, ej), np.maximum(ei, ej)
    key = a.astype(np.int64) * (int(max(b.max(initial=0), 0)) + 1) + b
    _, first = np.unique(key, return_index=True)
    return a[first], b[first], values[first]


def _rerank_edges(f, sp, camids, mu, blk, n, k1, k2, lam):
    """The re-ranked value of every graph pair i < j (k-NN edges and pairs sharing a V column),
    and the per-row (min, range) of the normalisation."""
    C = _native()
    lo, hi = blk["lo"], blk["hi"]
    rng_ = hi - lo
    rng_ = np.where(rng_ > 0, rng_, np.float32(1)).astype(np.float32)
    kk = min(k1 + 1, n)
    # each row's kk nearest by (key, index); key is monotone in d, so rank by d
    ci, cj, cd = blk["cand_i"], blk["cand_j"], blk["cand_d"]
    starts = np.searchsorted(ci, np.arange(n))
    counts = np.diff(np.append(starts, len(ci)))
    if counts.min() < kk:
        raise ValueError(f"k = {counts.min() - 1} neighbours are fewer than k1 + 1 = {kk}; raise k")
    sel = (starts[:, None] + np.arange(kk)[None, :]).reshape(-1)
    nbr = np.ascontiguousarray(cj[sel].reshape(n, kk), np.int32)
    certified = (cd[sel].reshape(n, kk)[:, -1] <= blk["bound"])
    from .rerank import _expansion_width
    ptr, col = C.sparse_expansion_sets(nbr, min(_expansion_width(k1), kk))
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(ptr))
    cand = _pairs_lookup(n, ci, cj, cd)
    dval, found = _lookup(cand, rows, col)
    if (~found).any():  # expansion members outside the candidate list: Eq. 5 computed here
        mi, mj = rows[~found], col[~found]
        dval[~found] = _eq5(_pair_cos(f, mi, mj), sp, camids, mu, mi, mj)
    keys = ((dval - lo[rows]) / rng_[rows]).astype(np.float32)
    pi, pj, m = C.sparse_k_reciprocal_pairs(ptr, col, np.ascontiguousarray(keys), nbr, min(k2, kk))
    del ptr, col, rows, keys, dval, found
    m16 = m.astype(np.float16)
    del m
    jac = (np.float16(1) - m16 / (np.float16(2) - m16)).astype(np.float16)
    del m16
    jac[jac < 0] = 0
    w16 = np.float16(1 - lam)
    jt = (jac * w16).astype(np.float32)
    del jac
    # graph pairs: k-NN edges (undirected) and the sharing pairs; the arrays of one pair each
    # (hundreds a row) are freed as soon as they are used, as they set the round's peak memory
    ei, ej, _ = _undirected(blk["ei"], blk["ej"], blk["d"])
    uniq = np.concatenate([ei.astype(np.int64) * n + ej, pi.astype(np.int64) * n + pj])
    # sorted in place, then the first of each run kept: np.unique without return_index takes
    # minutes on the 10^7-10^8 keys of a large round (numpy 2.4), this under a second
    uniq.sort()
    first = np.ones(len(uniq), bool)
    np.not_equal(uniq[1:], uniq[:-1], out=first[1:])
    uniq = uniq[first]
    del first
    jt_all = np.full(len(uniq), np.float32(w16), np.float32)
    jt_all[np.searchsorted(uniq, pi.astype(np.int64) * n + pj)] = jt
    sharing = len(pi)
    del pi, pj, jt
    gi, gj = (uniq // n).astype(np.int32), (uniq % n).astype(np.int32)
    del uniq
    dg, found = _lookup(cand, gi, gj)
    d2, found2 = _lookup(cand, gj, gi)
    dg = np.where(found, dg, d2)
    del d2
    miss = ~(found | found2)
    del found, found2
    if miss.any():
        mi, mj = gi[miss], gj[miss]
        dg[miss] = _eq5(_pair_cos(f, mi, mj), sp, camids, mu, mi, mj)
    value = jt_all + ((dg - lo[gi]) / rng_[gi]) * np.float32(lam)
    info = {"rows_uncertified": int((~certified).sum()), "rows_max_uncertified": int((~blk["hi_exact"]).sum()),
            "rows_widened": int(blk["widened"].sum()), "rows_max_widened": int(blk["max_widened"].sum()),
            "jaccard_pairs": sharing}
    return gi, gj, value, lo, rng_, float(w16), info


def _model_columns(f, b, cams, background, alpha):
    """The sums the linkage carries a sample: x (features, and with a background one column a
    camera plus one column a camera for the row effects) and g (the same, weighted by b, with
    the background's coefficients), so that <x_i, g_j> = b_j (cos(i, j) + bg(i, j)) with
    bg(i, j) = background[c_i, c_j] + [c_i != c_j] (alpha_i + alpha_j) (0 on one camera)."""
    bw = b[:, None].astype(np.float32)
    if background is None or (not np.any(background) and (alpha is None or not np.any(alpha))):
        x = np.array(f, np.float32, copy=True)
        return x, (x if np.all(b == 1) else np.ascontiguousarray(x * bw))
    nc = background.shape[0]
    hot = np.eye(nc, dtype=np.float32)[cams]
    alpha = np.zeros(len(f)) if alpha is None else np.asarray(alpha, np.float64)
    other = 1.0 - hot  # [c_j != c] for each camera c
    x = np.concatenate([f, hot, hot * alpha[:, None].astype(np.float32)], 1)
    g = np.concatenate([f, background.astype(np.float32)[:, cams].T + other * alpha[:, None].astype(np.float32),
                        other], 1)
    if not np.all(b == 1):
        g *= bw  # in place: at N = 10^6 each of x, g is GBs
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(g, np.float32)


def _refresh(link, x, g, c0, top, k, block=8192, least=64):
    """Searches, for every live cluster whose bound lies below `top` (the closest adjacent pair),
    and at least the `least` lowest bounds (a search reads every live cluster's sums however few
    it serves, so searching ahead saves searches), its k nearest live clusters by the model
    (cluster sums, exact), adds them as edges and raises its bound to its (k + 1)-th nearest
    model distance (a bound never falls: both are lower bounds on its pairs off the graph). The
    live clusters are read `block` at a time, the searched ones 2,048 at a time (memory
    O(block x width)). Returns the number of clusters searched."""
    live = link.live_slots()
    size, usum, bound = link.slot_sums(live)
    query = np.flatnonzero(bound < top)
    if len(query) == 0:
        return 0
    if len(query) < min(least, len(live)):
        lowest = np.argpartition(bound, least - 1)[:least] if least < len(live) else np.arange(len(live))
        query = np.union1d(query, lowest)
    half_u = usum / (2 * size)
    kk = min(k, len(live) - 1)
    best_d = np.full((len(query), kk + 1), np.inf)
    best_i = np.zeros((len(query), kk + 1), np.int64)
    for start in range(0, len(live), block):
        cols = np.arange(start, min(len(live), start + block))
        xl, gl = x[live[cols]], g[live[cols]]
        for q0 in range(0, len(query), 2048):
            q = query[q0:q0 + 2048]
            cross = (g[live[q]] @ xl.T + x[live[q]] @ gl.T) * np.float32(0.5)
            dist = c0 + half_u[q, None] + half_u[None, cols] - cross / (size[q, None] * size[None, cols])
            dist[q[:, None] == cols[None, :]] = np.inf  # itself
            both_d = np.concatenate([best_d[q0:q0 + 2048], dist], 1)
            both_i = np.concatenate([best_i[q0:q0 + 2048], np.broadcast_to(cols, dist.shape)], 1)
            part = np.argpartition(both_d, kk, axis=1)[:, :kk + 1]
            best_d[q0:q0 + 2048] = np.take_along_axis(both_d, part, 1)
            best_i[q0:q0 + 2048] = np.take_along_axis(both_i, part, 1)
    order = np.argsort(best_d, axis=1, kind="stable")
    best_d, best_i = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)
    near = best_i[:, :kk]
    found = np.isfinite(best_d[:, :kk])
    bounds = best_d[:, kk] if kk < len(live) - 1 else np.full(len(query), np.inf)
    bounds = np.maximum(bounds, bound[query])
    a = np.repeat(live[query], kk)[found.reshape(-1)]
    bb = live[near.reshape(-1)][found.reshape(-1)]
    link.add_edges(np.ascontiguousarray(a, np.int32), np.ascontiguousarray(bb, np.int32))
    link.set_bounds(np.ascontiguousarray(live[query], np.int32), np.ascontiguousarray(bounds))
    return len(query)


def average_linkage(f, gi, gj, value, k_inter, b=None, u=None, c0=0.0, cams=None, background=None,
                    alpha=None, bounds=None, refresh_k=32, pair_values=None, tile_sums=None, margin=0.0,
                    batch=256, max_rects=16, refresh_least=64):
    """Average linkage of the N samples into k_inter clusters, greedy on the closest pair overall,
    with the graph pairs (gi, gj) at their exact pair values and every other pair at the model
        c0 + (u_i + u_j) / 2 - (b_i + b_j) / 2 (cos(i, j) + bg(i, j)),
        bg(i, j) = background[cams_i, cams_j] + [cams_i != cams_j] (alpha_i + alpha_j)
    (b = u = 1, c0 = 0, no background: 1 - cos). The merges follow the graph's edges while the
    closest edge is no farther than every cluster's bound on its pairs off the graph (`bounds`: a
    lower bound a sample on its model value with every sample it has no edge to; None: none
    known); when it is farther, the clusters whose bound is below it get their `refresh_k`
    nearest clusters by the model (cluster sums, exact) as edges and a new bound (twice as many
    when that search let no merge through); a search serves at least the `refresh_least`
    clusters of lowest bound.

    Exact re-checks, with pair_values, a function (i, j) -> the exact value of each pair (i, j
    int32 arrays, any order within a pair), or tile_sums, a function (rows, rows_ptr, cols,
    cols_ptr) -> the sums of those values over each tile rows[rows_ptr[t]:rows_ptr[t + 1]] x
    cols[cols_ptr[t]:cols_ptr[t + 1]] (float64; the faster form: `_cosine_tile_sums`,
    `_rerank_tile_sums`): a pair of clusters whose sum holds model parts is merged only after
    the exact sums over those parts (rectangles of A x B, see SparseLinkage) replaced the model's,
    and the model's heights count `margin` lower until then (`batch` such pairs at a time, closest
    first). Each sample pair is summed once (its part of a sum stays exact through the merges),
    unless a pair of clusters' model part grew past `max_rects` rectangles: it is then re-checked
    whole (info["rects_collapsed"] counts them). The merges are then average linkage's on the
    exact pair values wherever the model errs by less than the margin; info reports the largest
    excess of a checked model height over the exact one (`model_excess_max`) and how many checked
    pairs exceeded the margin (`checked_beyond_margin`, each a pair whose check, and so its merge,
    may have come late).
    Returns (labels numbered by first appearance, info)."""
    n = len(f)
    b = np.ones(n) if b is None else np.asarray(b, np.float64)
    u = np.ones(n) if u is None else np.asarray(u, np.float64)
    if tile_sums is not None and pair_values is not None:
        raise ValueError("average_linkage takes pair_values or tile_sums for its re-checks, not both")
    if pair_values is not None:
        tile_sums = _tile_sums_ref(pair_values)
    x, g = _model_columns(f, b, cams, background, alpha)
    link = _native().SparseLinkage(x, g, np.ascontiguousarray(u), float(c0))
    if tile_sums is not None:
        link.check_pairs(float(margin), int(max_rects))
    link.add_edges(np.ascontiguousarray(gi, np.int32), np.ascontiguousarray(gj, np.int32),
                   np.ascontiguousarray(value, np.float64))
    bounds = np.full(n, -np.inf) if bounds is None else np.asarray(bounds, np.float64)
    link.set_bounds(np.arange(n, dtype=np.int32), np.ascontiguousarray(bounds))
    refreshes = searched = checked = checked_pairs = beyond = 0
    worst = -np.inf
    k, last = refresh_k, None
    while link.run(k_inter) > k_inter:
        if tile_sums is not None:
            a, c, model, exact, rect_ptr, rects = link.pending(batch)
            if len(a):
                sums, pairs = _model_part_sums(link, a, c, rect_ptr, rects, tile_sums)
                link.set_sums(a, c, sums)
                checked += len(a)
                checked_pairs += pairs
                under = model - (exact + sums) / (link.sizes(a) * link.sizes(c))  # the model's excess
                worst = max(worst, float(under.max()))
                beyond += int((under > margin).sum())
                continue
        # no merge since the last search (its nearest were edges already): search wider
        k = 2 * k if link.live == last else refresh_k
        last = link.live
        refreshes += 1
        searched += _refresh(link, x, g, float(c0), link.top() + (margin if tile_sums is not None else 0.0), k,
                             least=refresh_least)
    kept, absorbed, heights = link.merges()
    parent = np.arange(n)
    parent[absorbed] = kept
    root = parent.copy()
    while True:  # pointer jumping to the surviving slot
        nxt = parent[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    _, first, inv = np.unique(root, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv], {"refreshes": refreshes, "clusters_searched": searched, "merges": len(kept),
                       "pairs_checked": checked, "sample_pairs_checked": checked_pairs,
                       "model_excess_max": worst if checked else None, "checked_beyond_margin": beyond,
                       "rects_collapsed": link.collapsed}


def _model_part_sums(link, a, c, rect_ptr, rects, tile_sums, chunk=1 << 20):
    """The exact sums over the model rectangles of the live slot pairs (a[e], c[e]) (rectangle r:
    positions rects[r, 0]:rects[r, 1] of a's member list x rects[r, 2]:rects[r, 3] of c's, pair e's
    rectangles rect_ptr[e]:rect_ptr[e + 1]), float64, and the number of sample pairs summed.
    Tiles of at most `chunk` pairs (a rectangle split by rows), about `chunk` pairs a call."""
    pa, ma = link.members(a)
    pc, mc = link.members(c)
    owner = np.repeat(np.arange(len(a)), np.diff(rect_ptr))
    lo_a, hi_a, lo_c, hi_c = (rects[:, t].astype(np.int64) for t in range(4))
    width = hi_c - lo_c
    step = np.maximum(1, chunk // width)  # rows a tile
    pieces = -(-(hi_a - lo_a) // step)
    tile = np.repeat(np.arange(len(owner)), pieces)
    first = lo_a[tile] + (np.arange(len(tile)) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * step[tile]
    last = np.minimum(first + step[tile], hi_a[tile])
    nr, nc = last - first, width[tile]
    sums = np.zeros(len(a))
    ends = np.cumsum(nr * nc)
    t0 = 0
    while t0 < len(tile):
        t1 = max(t0 + 1, int(np.searchsorted(ends, (ends[t0 - 1] if t0 else 0) + chunk, "right")))
        e = owner[tile[t0:t1]]
        rows_ptr = np.concatenate([[0], np.cumsum(nr[t0:t1])])
        cols_ptr = np.concatenate([[0], np.cumsum(nc[t0:t1])])
        rows = ma[np.repeat(pa[e] + first[t0:t1] - rows_ptr[:-1], nr[t0:t1]) + np.arange(rows_ptr[-1])]
        cols = mc[np.repeat(pc[e] + lo_c[tile[t0:t1]] - cols_ptr[:-1], nc[t0:t1]) + np.arange(cols_ptr[-1])]
        sums += np.bincount(e, tile_sums(rows, rows_ptr, cols, cols_ptr), minlength=len(a))
        t0 = t1
    return sums, int(ends[-1]) if len(ends) else 0


def _check_inter_args(n, scores, camids, k_inter, k, k_candidates, k1, rerank, recheck_margin=None, k_far=1):
    """Raise a ValueError naming the problem for `sparse_inter_round`'s inputs: row counts that
    disagree, k_inter outside 1..N, k < 1, k_far < 1 for the re-ranking, too few candidates for
    its k1, or a negative re-check margin."""
    if len(camids) != n or (scores is not None and scores.n != n):
        raise ValueError(f"features ({n}), scores ({None if scores is None else scores.n}) and camids "
                         f"({len(camids)}) must have one row per image")
    if not 1 <= k_inter <= n:
        raise ValueError(f"k_inter = {k_inter} is outside 1..N = {n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rerank and k_far < 1:
        raise ValueError(f"k_far (the farthest images searched a row for the re-ranking's row maximum) "
                         f"must be >= 1, got {k_far}")
    if recheck_margin is not None and not recheck_margin >= 0:
        raise ValueError(f"recheck_margin must be >= 0 (or None: no re-checks), got {recheck_margin}")
    if rerank and min(max(k, k_candidates), n - 1) + 1 < min(k1 + 1, n):
        raise ValueError(f"the re-ranking reads k1 + 1 = {k1 + 1} neighbours a row but k = {k} and "
                         f"k_candidates = {k_candidates}; use k_candidates >= k1")


def _initial_bounds(blk, n, b, u, c0, cams, background, alpha):
    """A lower bound on each sample's model value with every sample it has no edge to, from its
    k-NN list's last cosine kappa_i (exact search): cos(i, j) + bg(i, j) <= t_i = kappa_i +
    max_j bg(i, j) for those j, so the value is at least
    c0 + (u_i - b_i t_i) / 2 + min_j (u_j - b_j t_i) / 2; the minimum over j, decreasing in t
    as b > 0, is taken at the next point of a grid. A row whose list holds every other sample
    has no such j (+inf); a row listing fewer than k gets -inf."""
    kappa = blk["kappa"].astype(np.float64)
    top_bg = np.zeros(n)
    if background is not None:
        off = np.where(np.eye(len(background), dtype=bool), -np.inf, background).max(1)
        al = np.zeros(n) if alpha is None else alpha
        top_bg = np.maximum(0.0, off[cams] + al + al.max(initial=0.0))
    t = kappa + top_bg
    known = np.isfinite(t)
    out = np.full(n, -np.inf)
    if known.any():
        grid = np.linspace(t[known].min(), t[known].max(), 257)
        env = np.array([np.min(u - b * x) for x in grid])  # min_j (u_j - b_j x), decreasing
        at = np.minimum(np.searchsorted(grid, t[known]), len(grid) - 1)
        out[known] = c0 + (u[known] - b[known] * t[known]) / 2 + env[at] / 2 - 1e-6
    out[blk["listed"] >= n - 1] = np.inf
    return out


def _exact_pairs(f, sp, camids, mu, n, gi, gj, value, rerank):
    """The pair values the linkage re-checks with: Eq. 5 with the round's J (1 - cos - mu J_w
    [cameras differ], J_w with sp's tail weight, float32 as on the graph) or, with rerank =
    (lo, range, c0, lambda), the re-ranked value: the graph pair's (gi < gj, sorted by
    gi * n + gj) where the pair is on the graph, else c0 + lambda (d - lo_m) / range_m with
    m = min(i, j), the row the dense round normalises by. The function takes (i, j) and, when
    known, the pairs' Eq. 5 distances d."""
    table = _pairs_lookup(n, gi, gj, value, presorted=True) if rerank is not None else None

    def values(i, j, d=None):
        if d is None:
            d = _eq5(_pair_cos(f, i, j), sp, camids, mu, i, j)
        if rerank is None:
            return d
        lo, rng_, c0, lam = rerank
        m = np.minimum(i, j)
        out = c0 + ((d - lo[m]) / rng_[m]) * lam
        found, hit = _lookup(table, m, np.maximum(i, j))
        return np.where(hit, found, out)
    return values


def _tile_pairs(rows, rows_ptr, cols, cols_ptr):
    """Every pair (i, j) of each tile, tile after tile, row-major, and the tile each belongs to."""
    nr, nc = np.diff(rows_ptr), np.diff(cols_ptr)
    count = nr * nc
    owner = np.repeat(np.arange(len(nr)), count)
    local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    return rows[rows_ptr[owner] + local // nc[owner]], cols[cols_ptr[owner] + local % nc[owner]], owner


def _tile_sums_ref(pair_values):
    """Tile sums (see average_linkage) from a function of pairs: every pair evaluated (plain)."""
    def sums(rows, rows_ptr, cols, cols_ptr):
        i, j, owner = _tile_pairs(rows, rows_ptr, cols, cols_ptr)
        return np.bincount(owner, np.asarray(pair_values(i, j), np.float64), minlength=len(rows_ptr) - 1)
    return sums


def _segment_sums(f, idx, ptr, chunk=8192):
    """float64 sums of the rows f[idx[ptr[t]:ptr[t + 1]]], gathered `chunk` rows at a time (a
    loop over segments: numpy's reduceat with a float64 accumulator is ~20x slower a row)."""
    out = np.zeros((len(ptr) - 1, f.shape[1]))
    for t in range(len(ptr) - 1):
        for a in range(int(ptr[t]), int(ptr[t + 1]), chunk):
            out[t] += f[idx[a:min(a + chunk, int(ptr[t + 1]))]].sum(0, dtype=np.float64)
    return out


def _cosine_tile_sums(f, sp, camids, mu):
    """Tile sums of Eq. 5 (the cosine round's pair values) without a pair's features: the
    cosine part from the tiles' feature sums, sum over R x C of 1 - cos = |R||C| - <F_R, F_C>,
    and the Jaccard part from tile_jaccard (the same J_w as the graph's)."""
    def sums(rows, rows_ptr, cols, cols_ptr):
        count = np.diff(rows_ptr) * np.diff(cols_ptr)
        cross = np.einsum("td,td->t", _segment_sums(f, rows, rows_ptr), _segment_sums(f, cols, cols_ptr))
        out = count - cross
        if sp is not None:
            jac = tile_jaccard(sp, rows, rows_ptr, cols, cols_ptr, camids).astype(np.float64)
            out -= mu * np.bincount(np.repeat(np.arange(len(count)), count), jac, minlength=len(count))
        return out
    return sums


def _rerank_tile_sums(f, sp, camids, mu, pair_values):
    """Tile sums of the re-ranked pair values (`_exact_pairs`' function `pair_values`) with each
    tile's cosines from one product of its rows (float64, rounded as the pair products are) and
    J from tile_jaccard, instead of a gather of two feature rows a pair."""
    def sums(rows, rows_ptr, cols, cols_ptr):
        i, j, owner = _tile_pairs(rows, rows_ptr, cols, cols_ptr)
        cos = np.concatenate([(f[rows[rows_ptr[t]:rows_ptr[t + 1]]].astype(np.float64)
                               @ f[cols[cols_ptr[t]:cols_ptr[t + 1]]].T.astype(np.float64)).ravel()
                              for t in range(len(rows_ptr) - 1)]).astype(np.float32)
        jac = tile_jaccard(sp, rows, rows_ptr, cols, cols_ptr, camids) if sp is not None else None
        d = _eq5(cos, sp, camids, mu, i, j, jac)
        return np.bincount(owner, np.asarray(pair_values(i, j, d), np.float64), minlength=len(rows_ptr) - 1)
    return sums


def _link_graph(f, scores, camids, mu, blk, k_inter, rerank, k1, k2, lambda_value, info, timer,
                recheck_margin=None):
    """Average linkage of the gathered candidate graph `blk` down to k_inter clusters (after
    the re-ranking's edge values when `rerank`); returns the labels, timings and counts go
    into `info`."""
    n = len(f)
    cams = np.unique(camids, return_inverse=True)[1]
    background = alpha = None
    if scores is not None:
        background, alpha = jaccard_background(scores, camids)
        background, alpha = mu * background, mu * alpha
        timer.lap(info, "time_background_s")
    c0, b, u = 0.0, np.ones(n), np.ones(n)
    if rerank:
        gi, gj, value, lo, rng_, c0, extra = _rerank_edges(f, scores, camids, mu, blk, n, k1, k2,
                                                           float(lambda_value))
        info.update(extra)
        timer.lap(info, "time_rerank_s")
        lam = np.float64(lambda_value)
        b = lam / rng_.astype(np.float64)
        u = lam * (1.0 - lo.astype(np.float64)) / rng_.astype(np.float64)
    else:
        gi, gj, value = _undirected(blk["ei"], blk["ej"], blk["d"])
        value = value.astype(np.float64)
        lo = rng_ = None
    bounds = _initial_bounds(blk, n, b, u, c0, cams, background, alpha)
    blk.clear()  # the candidate lists (hundreds of MB at N = 200,000) would sit in the linkage's peak
    tile_sums = None
    if recheck_margin is not None and rerank:
        pair_values = _exact_pairs(f, scores, camids, mu, n, gi, gj, value,
                                   (lo, rng_, np.float32(c0), np.float32(lambda_value)))
        tile_sums = _rerank_tile_sums(f, scores, camids, mu, pair_values)
    elif recheck_margin is not None:
        tile_sums = _cosine_tile_sums(f, scores, camids, mu)
    labels, extra = average_linkage(f, gi, gj, value, k_inter, b=b, u=u, c0=c0, cams=cams,
                                    background=background, alpha=alpha, bounds=bounds,
                                    tile_sums=tile_sums, margin=recheck_margin or 0.0)
    info.update(extra, graph_pairs=int(len(gi)))
    timer.lap(info, "time_linkage_s")
    return labels


def sparse_inter_round(features, scores, camids, k_inter, mu=0.02, *, similarity="rerank", k=32,
                       k_candidates=128, k1=20, k2=6, lambda_value=0.3, k_far=16, index="auto", device=None,
                       log=None, recheck_margin=RECHECK_MARGIN, fit_tail=True):
    """One inter-camera clustering round without an N x N matrix (see the module docstring for
    what is exact and what is approximated).

    features: (N, d) float array (normalised here); scores: SparseScores (or None: features
    alone, the "feature" ablation); camids: (N,) ints; k_inter: clusters wanted; mu: Eq. 5's
    weight; similarity: "cosine" (Eq. 5 then average linkage) or "rerank" (Eq. 5, k-reciprocal
    re-ranking with k1, k2, lambda_value, then average linkage); k: neighbours a row in the
    candidate graph (N - 1 or more: the complete graph, exact); k_candidates: nearest by cosine
    among which the re-ranking ranks each row by Eq. 5 distance; k_far: farthest samples searched
    a row for the re-ranking's row max; index: "auto" | "flat" | "ivf"; device: faiss-gpu device;
    log: a function told each step's wall time as it ends (None: silent); recheck_margin: None
    (the model stands for pairs off the graph) or the margin of the linkage's exact re-checks
    (`average_linkage`); fit_tail: weigh J^'s tail terms by `fit_tail_weight` (else 1).
    Under torch.distributed every rank passes the same full inputs and gets the labels.
    Returns (labels (N,) int64 numbered by first appearance, info dict).
    """
    from . import distributed as D
    from .evaluation import _count_bad

    if similarity not in ("cosine", "rerank"):
        raise ValueError(f"similarity must be 'cosine' or 'rerank', got {similarity!r}")
    f = _normalise(features)
    if _count_bad(f, 8192, infinite=True):  # in row blocks: no N x d temporary
        bad = np.flatnonzero(~np.isfinite(f).all(1))
        raise ValueError(f"{len(bad)} feature rows hold NaN or inf (rows {bad[:5].tolist()}...); "
                         "check the extraction (a diverged model gives such features)")
    camids = np.asarray(camids, np.int64)
    n = len(f)
    rerank = similarity == "rerank"
    _check_inter_args(n, scores, camids, k_inter, k, k_candidates, k1, rerank, recheck_margin, k_far)
    k = min(k, n - 1) if n > 1 else 0
    k_candidates = min(k_candidates, n - 1) if n > 1 else 0
    info = {"N": n, "k": k, "k_candidates": k_candidates if rerank else None, "similarity": similarity}
    if scores is not None and fit_tail:
        scores = SparseScores(**{**scores.__dict__, "tail_weight": fit_tail_weight(scores, camids)})
        info["tail_weight"] = round(scores.tail_weight, 4)
    if n == 1:
        return np.zeros(1, np.int64), info
    part = D.shard_indices(n, D.rank(), D.world_size())
    timer = _Timer(log if D.rank() == 0 else None)
    kind = _index_kind(n, index, rerank)
    built = (None, kind) if _one_product(rerank, kind, device) else _faiss_index(f, kind, device)
    info.update(index=kind)
    blk = _row_block(f, scores, camids, float(mu), k, k_candidates, part.start, part.stop, rerank, k_far, index,
                     device, built, min(k1 + 1, n) if rerank else None)
    del built
    timer.lap(info, "time_graph_s")
    blk = _gather_blocks(blk)
    labels = None
    if blk is not None:
        labels = _link_graph(f, scores, camids, float(mu), blk, k_inter, rerank, k1, k2, lambda_value,
                             info, timer, recheck_margin)
    if D.world_size() > 1:
        labels, info = D.broadcast_object((labels, info), src=0)
    return labels, info


# ----------------------------------------------------------------------------- references, choice


def inter_round_dense_ref(features, scores, camids, k_inter, mu=0.02, *, similarity="rerank", k1=20, k2=6,
                          lambda_value=0.3):
    """The dense round the sparse one is held to: Eq. 5 (condensed), the re-ranking in place
    (similarity="rerank"), average linkage into k_inter. scores: dense (N, D) or None."""
    from .cluster import agglomerative
    from .rerank import k_reciprocal
    from .similarity import inter_camera_distance

    mode = "eq5" if scores is not None else "feature"
    d = inter_camera_distance(features, scores, camids, mu, out="condensed", mode=mode).numpy()
    if similarity == "rerank":
        k_reciprocal(d, k1=k1, k2=k2, lambda_value=lambda_value, out=d)
    return np.asarray(agglomerative(d, n_clusters=k_inter, inplace=True))


def sparse_scores_ref(scores, dims, eps: float, max_per_block: int | None = None):
    """Row-by-row, block-by-block transcription of ScoreSparsifier (no sampled rows):
    SparseScores of a dense float32 array."""
    scores = np.asarray(scores, np.float32)
    ptr, cols, vals, dropped, tails = [0], [], [], [], []
    for row in scores:
        kept_cols, start = [], 0
        for k in dims:
            block = row[start:start + k].astype(np.float64)
            order = np.argsort(-block, kind="stable")
            total, acc, taken = block.sum(), 0.0, 0
            limit = k if max_per_block is None else min(k, max_per_block)
            while taken < limit and (eps == 0 or taken == 0 or acc < (1 - eps) * total):
                acc += block[order[taken]]
                taken += 1
            kept_cols += [start + int(c) for c in order[:taken]]
            tails.append(max(0.0, total - block[order[:taken]].sum()) / (k - taken) if taken < k else 0.0)
            start += k
        kept_cols.sort()
        cols += kept_cols
        vals += [row[c] for c in kept_cols]
        dropped.append(max(0.0, float(row.astype(np.float64).sum() - row[kept_cols].astype(np.float64).sum())))
        ptr.append(len(cols))
    return SparseScores(np.array(ptr, np.int64), np.array(cols, np.int32), np.array(vals, np.float32),
                        scores.sum(1, dtype=np.float64).astype(np.float32), np.array(dropped, np.float32),
                        tuple(dims), np.zeros(0, np.int64), np.zeros((0, scores.shape[1]), np.float32),
                        np.array(tails, np.float32).reshape(len(scores), len(dims)))


def average_linkage_ref(f, gi, gj, value, k_inter, b=None, u=None, c0=0.0, cams=None, background=None,
                        alpha=None):
    """Plain O(N^3) transcription of average_linkage: the model matrix for every pair, the graph
    pairs' values over it, then repeatedly the closest pair of live clusters (the mean of its
    pair values; ties to the lower pair) is merged."""
    f = np.asarray(f, np.float64)
    n = len(f)
    b = np.ones(n) if b is None else np.asarray(b, np.float64)
    u = np.ones(n) if u is None else np.asarray(u, np.float64)
    cos = f @ f.T
    if background is not None:
        cams = np.asarray(cams)
        bg = np.asarray(background, np.float64)[np.ix_(cams, cams)]
        if alpha is not None:
            bg = bg + (cams[:, None] != cams[None, :]) * (np.asarray(alpha)[:, None] + np.asarray(alpha)[None, :])
        cos = cos + bg
    pair = c0 + (u[:, None] + u[None, :]) / 2 - (b[:, None] + b[None, :]) / 2 * cos
    pair[gi, gj] = value
    pair[gj, gi] = value
    members = [[i] for i in range(n)]
    live = list(range(n))
    while len(live) > k_inter:
        best = None
        for x in range(len(live)):
            for y in range(x + 1, len(live)):
                a, c = live[x], live[y]
                dist = pair[np.ix_(members[a], members[c])].mean()
                if best is None or dist < best[0]:
                    best = (dist, a, c)
        _, a, c = best
        members[a] += members[c]
        live.remove(c)
    labels = np.empty(n, np.int64)
    for i, a in enumerate(live):
        labels[members[a]] = i
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


def gather_sparse_scores(part: SparseScores) -> SparseScores:
    """Every rank's rows (its extraction share, in rank order) on every rank."""
    from . import distributed as D

    if D.world_size() == 1:
        return part
    return SparseScores.concat(D.all_gather_object(part))


def dense_round_bytes(n: int, dim: int, d_scores: int) -> int:
    """Bytes of the dense inter-camera round's largest arrays, as the trainer's memory check
    counts them: the condensed float32 distance beside the features and scores (twice: the
    gathered copies and the device copies)."""
    return 4 * (n * (n - 1) // 2) + 8 * n * (dim + d_scores)


def choose_inter_mode(mode: str, n: int, dim: int, d_scores: int, available: int | None = None, log=print):
    """'dense' or 'sparse' for --inter-mode: as given, or for 'auto' sparse exactly when
    dense_round_bytes exceeds the memory available (iics_fast.memory.available, or `available`
    bytes), saying which and why through `log`."""
    if mode not in ("dense", "sparse", "auto"):
        raise ValueError(f"--inter-mode must be dense, sparse or auto, got {mode!r}")
    if mode != "auto":
        return mode
    source = "given"
    if available is None:
        from .memory import available as measure
        available, source = measure()
    need = dense_round_bytes(n, dim, d_scores)
    chosen = "dense" if available is None or need <= available else "sparse"
    have = "unknown" if available is None else f"{available / 2**30:.1f} GiB ({source})"
    log(f"--inter-mode auto: the dense inter-camera round needs {need / 2**30:.1f} GiB, available "
        f"{have}: {chosen} round")
    return chosen
