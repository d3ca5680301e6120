"""Re-ID evaluation: CMC and mAP under the Market-1501 protocol.

Protocol, for each query q (pid p, camera c), over the gallery ranked by ascending distance:

* gallery items with pid p *and* camera c are dropped (same person seen by the same camera);
* gallery items with pid -1 (junk) are dropped for every query;
* gallery items with pid 0 (distractors) stay as ordinary non-matches;
* a query with no remaining gallery item of its pid is skipped (it counts in neither CMC nor mAP);
* rank k of the CMC is the fraction of (non-skipped) queries whose first match is within the top
  k of the remaining gallery; AP is the mean, over the query's matches, of the precision at each.

Order and ties: distances are compared as float32 (float64 input is rounded to float32 first);
equal distances are ordered by gallery index (lower index ranks first), exactly as a stable
sort would order them. The result is therefore deterministic and independent of the block size
and of the device.

``max_rank`` larger than the gallery: the CMC still has ``max_rank`` entries; ranks beyond the
gallery repeat the last value (every non-skipped query has its first match within the gallery,
so the tail is 1.0).

The fast paths never sort a gallery row. Each gallery item gets a unique key (the float32
distance's order-preserving integer bits, then the gallery index), the query's few matches are
sorted by key, and one binary search per gallery item finds how many matches it precedes;
prefix sums of those counts give the rank of every match. Queries go in blocks so that MSMT17
(11,659 x 82,161) fits in a few hundred MB. On the CPU this runs in the C++ core
(``iics_fast._C.rank_queries``, OpenMP over queries) when the extension is built; on the GPU,
or with ``backend="torch"``, as batched torch operations (``_rank_block``).
``evaluate_features`` computes the cosine distances block by block, so the full distance matrix
is never formed either. ``evaluate_ref`` is the plain per-query loop the tests hold both to.

The pseudo labels of a round are scored against the true identities by ``adjusted_rand_index``
and ``normalized_mutual_info``.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["evaluate", "evaluate_features", "evaluate_ref", "adjusted_rand_index",
           "normalized_mutual_info"]

_INT64_MAX = torch.iinfo(torch.int64).max
# Elements (queries x gallery) handled at once: the torch path holds ~30 bytes each at peak,
# the C++ core only the float32 block itself (a view when the input is float32 already).
_BLOCK_ELEMS_TORCH_CPU = 1 << 22
_BLOCK_ELEMS_GPU = 1 << 25
_BLOCK_ELEMS_NATIVE = 1 << 25


# ----------------------------------------------------------------------------- input checks
def _as_ids(x, name: str) -> np.ndarray:
    """Return pids/camids as a 1-D int64 array, or raise naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one id per image), got shape {a.shape}")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}; pass ids as ints")
    return a.astype(np.int64, copy=False)


def _check_ids(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int):
    ids = [
        _as_ids(q_pids, "q_pids"),
        _as_ids(g_pids, "g_pids"),
        _as_ids(q_camids, "q_camids"),
        _as_ids(g_camids, "g_camids"),
    ]
    for arr, name, n, what in zip(
        ids, ("q_pids", "g_pids", "q_camids", "g_camids"), (num_q, num_g, num_q, num_g),
        ("queries", "gallery items", "queries", "gallery items"),
    ):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries but there are {n} {what}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"need at least one query and one gallery item, got {num_q} x {num_g}")
    if num_g >= 2**31:
        raise ValueError(f"gallery of {num_g} items is beyond the supported 2**31 - 1")
    return ids


def _check_max_rank(max_rank) -> int:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    return int(max_rank)


def _pick_device(device, *tensors) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_float_matrix(x, name: str):
    """2-D float array/tensor view of ``x`` without copying the whole of it."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        return x.detach()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {a.dtype}; cast it first")
    return a


def _count_nan(x, block_rows: int) -> int:
    """NaN count of a 2-D array/tensor, read in row blocks (no full-size temporary)."""
    total = 0
    for s in range(0, x.shape[0], block_rows):
        part = x[s : s + block_rows]
        total += int(torch.isnan(part).sum()) if isinstance(x, torch.Tensor) else int(
            np.isnan(part).sum()
        )
    return total


def _block_rows(num_g: int, device: torch.device, block_elems, native: bool) -> int:
    if not block_elems:
        block_elems = (_BLOCK_ELEMS_NATIVE if native else
                       _BLOCK_ELEMS_GPU if device.type == "cuda" else _BLOCK_ELEMS_TORCH_CPU)
    return max(1, int(block_elems) // max(1, num_g))


# ----------------------------------------------------------------------------- ranking core
def _sort_keys(d: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordering (distance as float32, gallery index) lexicographically."""
    bits = d.to(torch.float32).view(torch.int32)
    x = bits >> 31
    x &= 0x7FFFFFFF
    x ^= bits  # order-preserving int32 image of the float, negatives included
    x -= x >> 31  # negatives up by one, so -0.0 (-> -1) ties with +0.0 (-> 0)
    key = x.to(torch.int64)
    key <<= 32
    key |= torch.arange(d.shape[1], device=d.device, dtype=torch.int64)
    return key


def _rank_block(d, qp, qc, gp, gc):
    """First-match rank (0 = no valid match) and AP of a block of queries.

    d: (B, G) distances; qp, qc: (B,) query pids/cameras; gp, gc: (G,) gallery pids/cameras.
    The rank of match j (0-based, in key order) among the kept gallery is j + 1 + the number of
    kept non-matches whose key is smaller: one binary search per gallery item finds, for every
    non-match, how many matches precede it, and a cumulative count turns that into ranks.
    """
    b, g = d.shape
    dev = d.device
    same = gp[None, :] == qp[:, None]
    hit = same & (gc[None, :] != qc[:, None])  # same pid, other camera (pid -1 never matches)
    hit &= (qp != -1)[:, None]
    num_hits = hit.sum(1)
    first_rank = torch.zeros(b, dtype=torch.int64, device=dev)
    ap = torch.zeros(b, dtype=torch.float64, device=dev)
    m = int(num_hits.max()) if b else 0
    if m == 0:
        return first_rank, ap
    key = _sort_keys(d)
    # Each row's match keys in ascending order, padded with INT64_MAX (above every real key).
    rows, cols = hit.nonzero(as_tuple=True)
    slot = torch.arange(rows.numel(), device=dev) - (torch.cumsum(num_hits, 0) - num_hits)[rows]
    hit_keys = torch.full((b, m), _INT64_MAX, dtype=torch.int64, device=dev)
    hit_keys[rows, slot] = key[rows, cols]
    hit_keys = torch.sort(hit_keys, dim=1).values
    pos = torch.searchsorted(hit_keys, key)  # matches ranked before each gallery item
    # Only kept non-matches are counted: same-pid items (matches, same-camera drops) and junk
    # go to the spare bucket m.
    pos.masked_fill_(same | (gp == -1)[None, :], m)
    counts = torch.zeros(b, m + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(1, pos, torch.ones(1, 1, dtype=torch.int64, device=dev).expand(b, g))
    j = torch.arange(m, device=dev, dtype=torch.int64)
    rank = torch.cumsum(counts[:, :m], 1) + j + 1  # 1-based rank of match j
    valid = j[None, :] < num_hits[:, None]
    prec = torch.where(valid, (j + 1).to(torch.float64) / rank.to(torch.float64), 0.0)
    has = num_hits > 0
    ap = torch.where(has, prec.sum(1) / num_hits.clamp(min=1).to(torch.float64), 0.0)
    first_rank = torch.where(has, rank[:, 0], 0)
    return first_rank, ap


def _finish(first_rank: np.ndarray, ap: np.ndarray, max_rank: int):
    valid = first_rank > 0
    n = int(valid.sum())
    if n == 0:
        raise ValueError(
            "no query has a valid match in the gallery (a match needs the same pid under "
            "another camera, pid != -1): check the pids and camids passed"
        )
    hist = np.bincount(np.minimum(first_rank[valid], max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(hist[1 : max_rank + 1]).astype(np.float64) / n
    return cmc, float(ap[valid].mean())


def _ranker(dev: torch.device, backend: str, gp: np.ndarray, gc: np.ndarray):
    """(fn, is_native): fn(block of distances, query pids, query cams) -> (first ranks, APs).

    ``native``: the C++ core (CPU only); ``torch``: ``_rank_block`` on ``dev``; ``auto``: the
    C++ core on the CPU when the extension is built, torch otherwise.
    """
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    if backend == "native" and dev.type != "cpu":
        raise ValueError(f"backend='native' runs on the CPU; device is {dev}: use backend='torch'")
    if backend != "torch" and dev.type == "cpu":
        try:
            from ._native import native

            rank_queries = native().rank_queries
        except (ImportError, AttributeError):
            if backend == "native":
                raise
        else:
            def run_native(block, qp, qc):
                if isinstance(block, torch.Tensor):
                    block = block.detach().to("cpu", torch.float32).contiguous().numpy()
                block = np.ascontiguousarray(block, dtype=np.float32)
                return rank_queries(block, qp, qc, gp, gc)

            return run_native, True
    gp_t, gc_t = torch.as_tensor(gp, device=dev), torch.as_tensor(gc, device=dev)

    def run_torch(block, qp, qc):
        block = torch.as_tensor(block).to(dev)
        f, a = _rank_block(block, torch.as_tensor(qp, device=dev),
                           torch.as_tensor(qc, device=dev), gp_t, gc_t)
        return f.cpu().numpy(), a.cpu().numpy()

    return run_torch, False


# ----------------------------------------------------------------------------- public API
def evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
             device=None, backend: str = "auto", block_elems: int | None = None):
    """CMC (float64 array of length ``max_rank``) and mAP of a (queries x gallery) distance matrix.

    ``distmat`` is a NumPy array or torch tensor (smaller = more similar); ids are 1-D integer
    arrays. Runs on ``device`` (default: the tensor's device, else CUDA when available, else
    CPU) in blocks of about ``block_elems`` matrix entries; on the CPU with the C++ core when it
    is built (``backend="torch"`` forces the torch path). See the module docstring for the
    protocol, the tie order and ``max_rank`` beyond the gallery.
    """
    d = _as_float_matrix(distmat, "distmat")
    num_q, num_g = d.shape
    qp, gp, qc, gc = _check_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    max_rank = _check_max_rank(max_rank)
    dev = _pick_device(device, d)
    rank, native = _ranker(dev, backend, gp, gc)
    rows = _block_rows(num_g, dev, block_elems, native)
    nan = _count_nan(d, max(1, _BLOCK_ELEMS_TORCH_CPU // num_g))
    if nan:
        raise ValueError(f"distmat has {nan} NaN entries; distances must be comparable numbers")
    parts = [rank(d[s : s + rows], qp[s : s + rows], qc[s : s + rows])
             for s in range(0, num_q, rows)]
    return _finish(np.concatenate([f for f, _ in parts]), np.concatenate([a for _, a in parts]),
                   max_rank)


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                      device=None, backend: str = "auto", block_elems: int | None = None):
    """CMC and mAP with cosine distance ``1 - cos(q, g)`` computed block by block.

    ``qf`` (Q, D) and ``gf`` (G, D) are features (NumPy or torch); they are L2-normalised here
    (a zero row gets distance 1 to everything). Only a block of queries x the gallery is ever
    materialised, which is what makes MSMT17-size evaluation fit in memory. ``device``,
    ``backend`` and ``block_elems`` as in ``evaluate``.
    """
    qf = _as_float_matrix(qf, "qf")
    gf = _as_float_matrix(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"qf and gf must have the same feature size, got {qf.shape[1]} and {gf.shape[1]}"
        )
    num_q, num_g = qf.shape[0], gf.shape[0]
    qp, gp, qc, gc = _check_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    max_rank = _check_max_rank(max_rank)
    dev = _pick_device(device, qf, gf)
    for x, name in ((qf, "qf"), (gf, "gf")):
        bad = _count_nan(x, 4096)
        if bad:
            raise ValueError(f"{name} has {bad} NaN entries; features must be finite")
    rank, native = _ranker(dev, backend, gp, gc)
    qf = torch.nn.functional.normalize(torch.as_tensor(qf).to(dev, torch.float32), dim=1)
    gf = torch.nn.functional.normalize(torch.as_tensor(gf).to(dev, torch.float32), dim=1)
    rows = _block_rows(num_g, dev, block_elems, native)
    parts = [rank((qf[s : s + rows] @ gf.T).neg_().add_(1.0), qp[s : s + rows], qc[s : s + rows])
             for s in range(0, num_q, rows)]  # 1 - cos, in place: one block buffer
    return _finish(np.concatenate([f for f, _ in parts]), np.concatenate([a for _, a in parts]),
                   max_rank)


def evaluate_ref(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """Plain per-query implementation of the same protocol (the tests' oracle).

    Same inputs and outputs as ``evaluate``; sorts each row with a stable sort of the float32
    distances, drops the junk, and reads the match positions off the ranked list.
    """
    d = np.asarray(distmat)
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {d.shape}")
    d = d.astype(np.float32)
    qp, gp, qc, gc = (np.asarray(x).astype(np.int64) for x in (q_pids, g_pids, q_camids, g_camids))
    cmc_sum = np.zeros(max_rank)
    ap_sum = 0.0
    num_valid = 0
    for i in range(d.shape[0]):
        order = np.argsort(d[i] + np.float32(0.0), kind="stable")
        pid, cam = gp[order], gc[order]
        keep = (pid != -1) & ~((pid == qp[i]) & (cam == qc[i]))
        match = (pid[keep] == qp[i]).astype(np.float64)
        if not match.any():
            continue
        num_valid += 1
        hit_at = np.flatnonzero(match)  # 0-based positions of the matches in the kept list
        ap_sum += np.mean(np.arange(1, len(hit_at) + 1) / (hit_at + 1))
        if hit_at[0] < max_rank:
            cmc_sum[hit_at[0] :] += 1
    if num_valid == 0:
        raise ValueError("no query has a valid match in the gallery")
    return cmc_sum / num_valid, ap_sum / num_valid


# ----------------------------------------------------------------------------- pseudo labels


def _contingency(a, b):
    """Sparse contingency table of two labelings: (row, column, count) of every nonzero cell,
    and the row and column sums."""
    _, ai = np.unique(np.asarray(a), return_inverse=True)
    _, bi = np.unique(np.asarray(b), return_inverse=True)
    width = int(bi.max()) + 1
    key, cells = np.unique(ai.astype(np.int64) * width + bi, return_counts=True)
    return key // width, key % width, cells, np.bincount(ai), np.bincount(bi)


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings."""
    _, _, cells, rows, cols = _contingency(a, b)
    n = len(a)
    comb = lambda x: (x * (x - 1) / 2.0).sum()  # noqa: E731
    sum_cells, sum_rows, sum_cols = comb(cells), comb(rows), comb(cols)
    expected = sum_rows * sum_cols / (n * (n - 1) / 2.0) if n > 1 else 0.0
    top = 0.5 * (sum_rows + sum_cols)
    return 1.0 if top == expected else float((sum_cells - expected) / (top - expected))


def normalized_mutual_info(a, b) -> float:
    """Normalised mutual information with the arithmetic-mean normalisation."""
    r, c, cells, rows, cols = _contingency(a, b)
    n = len(a)
    mi = (cells / n * np.log(cells * n / (rows[r] * cols[c]))).sum()
    entropy = lambda x: -(x / n * np.log(x / n)).sum()  # noqa: E731
    ha, hb = entropy(rows), entropy(cols)
    return 1.0 if ha + hb == 0 else float(max(0.0, mi) / (0.5 * (ha + hb)))
