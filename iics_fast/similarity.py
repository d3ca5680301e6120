"""Inter-camera similarity (paper Eq. 5) and the generalised Jaccard, with device dispatch.

    d(m, n) = 1 - cos(f_m, f_n) - mu * J(s_m, s_n) * [cam_m != cam_n]
    J(a, b) = sum_k min(a_k, b_k) / sum_k max(a_k, b_k)                 J(0, 0) := 0

Row ranges: `rows=(r0, r1)` returns only the condensed entries of rows [r0, r1), i.e.
`d[condensed_row_offset(N, r0):condensed_row_offset(N, r1)]` of the whole condensed vector,
holding no more than that block (a rank of a sharded build, iics_fast.distributed). On the CPU
the blocks of any split put end to end are bitwise the whole build; on the GPU they agree with it
to float32 rounding (see `inter_camera_distance`).

Backends: "triton" (CUDA tensors: one fused tile kernel, kernels/pairwise.py), "cpu" (the C++
extension: register-tiled sums of minima and dot products (AVX-512 or AVX2, chosen at run time)
in one pass over cache tiles, OpenMP over tiles),
"ref" (plain PyTorch, float64, O(N^2) memory: small inputs and tests), "auto" (triton for CUDA
tensors, cpu otherwise).

Defined results for degenerate input: a zero feature row has cos 0 with everything (distance 1
before the Jaccard term); a zero score row has J = 0 with everything (J(0, 0) = 0, where the
reference code yields NaN); N = 1 gives an empty condensed output / a 1 x 1 zero square.
Rejected before any work (ValueError / TypeError naming the fix): negative or non-finite
scores, non-finite features, mismatched lengths, dtypes other than float32/float16/bfloat16,
non-integer camera ids, unknown modes/backends/layouts, a wrong `out` buffer, a row range
outside 0..N or with the square layout. The finiteness and sign checks are one linear pass
(`aminmax`) over each input.
"""
from __future__ import annotations

import math
import operator
import os

import numpy as np
import torch

from . import distributed as D
from .condensed import row_offset as condensed_row_offset, row_splits

MODES = ("eq5", "feature", "jaccard")
LAYOUTS = ("condensed", "square")
BACKENDS = ("auto", "triton", "cpu", "ref")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32, without overflow or underflow: each row is
    divided by its largest magnitude before the norm is taken (float32 squares overflow above
    ~1.8e19 and vanish below ~1e-23). A zero row stays zero."""
    x = x.to(torch.float32)
    top = x.abs().amax(1, keepdim=True) if x.shape[0] else x[:, :1]
    x = x / torch.where(top > 0, top, torch.ones_like(top))
    return torch.nn.functional.normalize(x, dim=1)


def _as_tensor(x, name):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_matrix(x, name, n=None, nonnegative=False):
    x = _as_tensor(x, name)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}; convert with .float()")
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (N, dims) with dims >= 1, got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows but camids has {n} entries; pass one row per sample")
    if x.numel():
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or Inf; clean the input (e.g. torch.nan_to_num)")
        if nonnegative and lo < 0:
            raise ValueError(f"{name} must be nonnegative (softmax scores), found minimum {lo:g}")
        if nonnegative and hi * x.shape[1] > torch.finfo(torch.float32).max:
            raise ValueError(f"{name} reach {hi:g}: their sums over {x.shape[1]} columns overflow "
                             f"float32; scale them down (softmax scores are at most 1)")
    return x


def _check_camids(camids):
    if isinstance(camids, (list, tuple)):
        camids = np.asarray(camids)
    cam = _as_tensor(camids, "camids")
    if cam.dtype.is_floating_point or cam.dtype.is_complex or cam.dtype == torch.bool:
        raise TypeError(f"camids must be integers, got {cam.dtype}; convert with .long()")
    if cam.ndim != 1 or cam.shape[0] == 0:
        raise ValueError(f"camids must be 1-D with at least one sample, got shape {tuple(cam.shape)}")
    return cam


def _check_inputs(features, scores, camids, mu, mode):
    """Validated (features, scores, camids, mu, device) of an inter-camera distance call; the
    input a mode does not read (features in "jaccard", scores in "feature") comes back None."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        mu = float(mu)
    except (TypeError, ValueError):
        raise TypeError(f"mu must be a real number, got {type(mu).__name__}") from None
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    cam = _check_camids(camids)
    n = cam.shape[0]
    feats = None if mode == "jaccard" else _check_matrix(features, "features", n)
    scr = None if mode == "feature" else _check_matrix(scores, "scores", n, nonnegative=True)
    device = (feats if feats is not None else scr).device
    for x in (feats, scr):
        if x is not None and x.device != device:
            raise ValueError(f"features and scores must be on one device, got {feats.device} and {scr.device}")
    return feats, scr, cam.to(device), mu, device


def _resolve_backend(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use backend='cpu'")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError("backend='cpu' needs CPU tensors; move them with .cpu() or use backend='auto'")
    return backend


def _check_rows(rows, n):
    """(r0, r1) as Python ints from `rows`, a pair of integers with 0 <= r0 <= r1 <= n."""
    try:
        r0, r1 = rows
    except (TypeError, ValueError):
        raise TypeError(f"rows must be a pair (r0, r1) of row indices or None, got {rows!r}") from None
    try:
        r0, r1 = operator.index(r0), operator.index(r1)
    except TypeError:
        raise TypeError(f"rows must hold integers, got ({type(r0).__name__}, {type(r1).__name__}); "
                        f"pass ints such as (0, {n})") from None
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"rows=(r0, r1) needs 0 <= r0 <= r1 <= N = {n}, got ({r0}, {r1}); "
                         f"pass a range of the N samples' rows")
    return r0, r1


def _check_out(out, n, device, rows=None):
    """Returns (layout, buffer or None) from `out` = layout name or a preallocated buffer; with
    `rows` = (r0, r1) the layout must be condensed and a buffer must hold exactly the block."""
    if isinstance(out, str):
        if out not in LAYOUTS:
            raise ValueError(f"out must be one of {LAYOUTS} or a float32 buffer, got {out!r}")
        if rows is not None and out != "condensed":
            raise ValueError(f"rows={rows} gives a block of the condensed layout; out={out!r} cannot "
                             "hold it: pass out='condensed' (or a 1-D buffer), or rows=None")
        return out, None
    buf = _as_tensor(out, "out")
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device != device:
        raise ValueError(f"out buffer must be a contiguous float32 array on {device}")
    if rows is not None:
        length = condensed_row_offset(n, rows[1]) - condensed_row_offset(n, rows[0])
        if buf.ndim != 1 or buf.shape[0] != length:
            raise ValueError(f"out buffer of shape {tuple(buf.shape)} does not fit rows={rows} of N={n}: "
                             f"the block needs ({length},) (condensed_row_offset(N, r1) - "
                             "condensed_row_offset(N, r0) entries)")
        return "condensed", buf
    if buf.ndim == 1 and buf.shape[0] == n * (n - 1) // 2:
        return "condensed", buf
    if buf.ndim == 2 and tuple(buf.shape) == (n, n):
        return "square", buf
    raise ValueError(
        f"out buffer of shape {tuple(buf.shape)} fits neither layout for N={n}: "
        f"condensed needs ({n * (n - 1) // 2},), square needs ({n}, {n})"
    )


def inter_camera_distance(features, scores, camids, mu=0.02, *, out="condensed", mode="eq5", backend="auto",
                          rows=None):
    """Pairwise inter-camera distance 1 - cos(f_m, f_n) - mu * J(s_m, s_n) * [cam_m != cam_n].

    features: (N, d) float32/float16/bfloat16, normalised here (None allowed in "jaccard" mode).
    scores:   (N, D) nonnegative (concatenated per-camera softmax), same dtypes (None allowed in
              "feature" mode). On the CPU path float16/bfloat16 scores are converted to float32
              up front (N*D*4 bytes extra).
    camids:   (N,) integers, any order; results are in the caller's order.
    mu:       weight of the Jaccard term (the paper's mu_r).
    out:      "condensed" (SciPy pdist order, N(N-1)/2), "square" (N x N, zero diagonal), or a
              preallocated contiguous float32 buffer of either shape (written and returned).
    mode:     "eq5" (default), "feature" (1 - cos), "jaccard" (1 - J over all pairs); the
              paper's Table 1 ablations, see kernels/pairwise.py.
    backend:  "auto" | "triton" | "cpu" | "ref".
    rows:     None (the whole matrix) or (r0, r1) with 0 <= r0 <= r1 <= N: only the condensed
              entries of rows [r0, r1), a 1-D vector of condensed_row_offset(N, r1) -
              condensed_row_offset(N, r0) entries equal to that slice of the whole condensed
              vector (bitwise on the CPU; on the GPU to float32 rounding, as the rows are not
              sorted by camera there). Condensed layout only; a preallocated `out` must then
              have exactly the block's length. Work memory stays O(block rows x N) + the block.

    Returns a float32 torch tensor on the inputs' device (on the CPU, `.numpy()` is zero-copy).
    """
    feats, scr, cam, mu, device = _check_inputs(features, scores, camids, mu, mode)
    n = cam.shape[0]
    if rows is not None:
        rows = _check_rows(rows, n)
    layout, buf = _check_out(out, n, device, rows)
    backend = _resolve_backend(backend, device)
    _check_memory(n, feats, scr, layout, buf, rows, backend, device)

    if backend == "ref":
        from iics_fast.kernels.pairwise import inter_camera_distance_ref

        res = inter_camera_distance_ref(feats, scr, cam, mu, layout, mode)
        if rows is not None:  # the reference builds the whole matrix and slices it
            res = res[condensed_row_offset(n, rows[0]):condensed_row_offset(n, rows[1])]
        if buf is None:
            return res
        buf.copy_(res)
        return buf
    if backend == "triton":
        from iics_fast.kernels.pairwise import inter_camera_distance as triton_distance

        return triton_distance(feats, scr, cam, mu, layout, mode, out_buf=buf, rows=rows)
    return _cpu_distance(feats, scr, cam, mu, layout, mode, buf, rows)


def _check_memory(n, feats, scr, layout, buf, rows, backend, device):
    """Refuse before allocating when the output and the work arrays do not fit in memory."""
    from . import memory

    r0, r1 = (0, n) if rows is None else rows
    entries = n * n if layout == "square" else (condensed_row_offset(n, r1) -
                                                condensed_row_offset(n, r0))
    need = 0 if buf is not None else 4 * entries
    if backend == "ref":  # float64 square matrices of the plain implementation
        need += 3 * 8 * n * n
    need += sum(4 * x.shape[0] * x.shape[1] for x in (feats, scr) if x is not None)  # copies
    what = f"the inter-camera distance of N = {n} images ({layout}"
    memory.require(need, what + (f", rows {r0}..{r1})" if rows else ")"), device=device)


def _cpu_distance(feats, scr, cam, mu, layout, mode, buf, rows):
    """C++ path: one pass over the cache tiles of rows [r0, r1) x later columns computes each
    tile's cosines (dot products of the unit rows) and sums of minima and writes its entries.
    A pair's value does not depend on the tile it falls in, so blocks of any split are bitwise
    the whole build's slices."""
    from iics_fast._native import native

    C = native()
    n = cam.shape[0]
    square = layout == "square"
    r0, r1 = (0, n) if rows is None else rows
    base = condensed_row_offset(n, r0)  # condensed position of the block's first entry
    if buf is None:
        shape = (n, n) if square else (condensed_row_offset(n, r1) - base,)
        buf = torch.empty(shape, dtype=torch.float32)
    if not square:
        r1 = min(r1, n - 1)  # the last row has no condensed entries
    if r0 >= r1:
        return buf
    s_np = rs_np = f_np = None
    if scr is not None:
        s = scr.to(torch.float32).contiguous()
        rs_np = s.sum(1, dtype=torch.float64).to(torch.float32).numpy()
        s_np = s.numpy()
    if feats is not None:
        f_np = normalize_rows(feats).contiguous().numpy()
    C.inter_camera_rows(s_np, rs_np, f_np, cam.to(torch.int64).contiguous().numpy(), r0, r1, mu,
                        MODES.index(mode), square, buf.numpy(), base)
    return buf


def pairwise_jaccard(a, b=None, *, backend="auto", out=None):
    """Generalised Jaccard sum(min)/sum(max) between the rows of a (M, D) and b (P, D) -> (M, P)
    float32; b defaults to a. Rows must be nonnegative and finite; J(0, 0) = 0. `out`: optional
    preallocated contiguous float32 (M, P) buffer on the inputs' device."""
    a = _check_matrix(a, "a", nonnegative=True)
    b = a if b is None else _check_matrix(b, "b", nonnegative=True)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of columns, got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    m, p = a.shape[0], b.shape[0]
    if out is not None:
        out = _as_tensor(out, "out")
        if (out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (m, p)
                or out.device != a.device):
            raise ValueError(f"out must be a contiguous float32 ({m}, {p}) array on {a.device}")
    backend = _resolve_backend(backend, a.device)
    if backend in ("ref", "triton"):
        from iics_fast.kernels import pairwise as K

        res = K.pairwise_jaccard_ref(a, b) if backend == "ref" else K.pairwise_jaccard(a, b)
        if out is None:
            return res
        out.copy_(res)
        return out
    from iics_fast._native import native

    a32 = a.to(torch.float32).contiguous()
    b32 = a32 if b is a else b.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(m, p, dtype=torch.float32)
    native().pairwise_jaccard(
        a32.numpy(), a32.sum(1, dtype=torch.float64).to(torch.float32).numpy(),
        b32.numpy(), b32.sum(1, dtype=torch.float64).to(torch.float32).numpy(), out.numpy(),
    )
    return out


def sharded_inter_camera_distance(features, scores, camids, mu=0.02, *, mode="eq5", dst=0, backend="auto"):
    """The condensed inter-camera distance (SciPy pdist order, float32) built by all ranks: rank
    r computes the rows [p_r, p_{r+1}) of `condensed.row_splits(N, world)` (equal numbers of
    entries) with `similarity.inter_camera_distance(..., rows=(p_r, p_{r+1}))`, and rank `dst`
    receives every block point-to-point straight into its preallocated result. Returns the full
    vector on `dst`, None elsewhere; without a process group it is the single-process build.

    Every rank passes the same full inputs (features (N, d), scores (N, D), camids (N,), e.g.
    from `all_gather_rows`), on its communication device (CUDA under NCCL, CPU under gloo).
    Memory: one block (~N(N-1)/(2 world) float32) per rank plus its work memory, and the
    N(N-1)/2 result at dst (which writes its own block into it directly). On the CPU the result
    is bitwise the single-process `inter_camera_distance` for every world size; on the GPU
    (row ranges keep the caller's order, the whole build sorts by camera) it is bitwise
    `inter_camera_distance(..., rows=(0, N))` and equal to the whole build to float32 rounding."""
    world, me = D.world_size(), D.rank()
    if not 0 <= dst < world:
        raise ValueError(f"dst must be a rank in 0..{world - 1}, got {dst}")
    n = int(camids.shape[0]) if hasattr(camids, "shape") else len(camids)
    if n < 1:
        raise ValueError("camids must hold at least one sample")
    if D.world_size() > 1:
        ref = features if mode != "jaccard" else scores
        D.check_comm_tensor(ref, "features" if mode != "jaccard" else "scores")
        seen = D.all_gather_object(n)
        if len(set(seen)) != 1:
            raise ValueError(f"every rank must pass the same N samples, got N per rank = {seen}")
    splits = row_splits(n, world)
    r0, r1 = splits[me], splits[me + 1]
    if me != dst:
        block = inter_camera_distance(features, scores, camids, mu, mode=mode, backend=backend, rows=(r0, r1))
        if block.numel():
            torch.distributed.send(block, dst=dst)
        return None
    device = (features if mode != "jaccard" else scores).device
    out = torch.empty(n * (n - 1) // 2, dtype=torch.float32, device=device)
    offs = [condensed_row_offset(n, p) for p in splits]
    inter_camera_distance(features, scores, camids, mu, mode=mode, backend=backend, rows=(r0, r1),
                          out=out[offs[me]:offs[me + 1]])
    for r in range(world):
        if r != me and offs[r + 1] > offs[r]:
            torch.distributed.recv(out[offs[r]:offs[r + 1]], src=r)
    return out
