"""Pairwise generalised Jaccard and the fused IICS inter-camera distance (Triton, plus references).

    J(a, b)  = sum_k min(a_k, b_k) / sum_k max(a_k, b_k)          nonnegative rows; J(0, 0) := 0
    d(m, n)  = 1 - cos(f_m, f_n) - mu * J(s_m, s_n) * [cam_m != cam_n]        (paper Eq. 5)

One accumulator per pair: with row sums Sa, Sb and L1 = sum_k |a_k - b_k|, min + max = a + b and
max - min = |a - b| give J = (Sa + Sb - L1) / (Sa + Sb + L1); the inner loop is one FADD (a - b)
and one FADD with the |.| operand modifier per element and pair.

J(0, 0) is 0/0; the reference code (`intersection / union` in torch) yields NaN there, which
then poisons the clustering. Here J(0, 0) = 0: two score rows without mass give no evidence
that the images share an identity, so the Eq. 5 bonus is zero and "jaccard" mode puts them at
distance 1.

Modes (the paper's Table 1 ablations):
  "eq5"     (default)  1 - cos - mu * J * [different cameras]
  "feature"            1 - cos                       ("Stage 2*": CNN feature similarity)
  "jaccard"            1 - J over *all* pairs        (Table 1 "Eq. (9)": the Jaccard similarity
                       of Eq. 9 used as the inter-camera similarity; Eq. 9 carries no camera
                       mask, and without the cosine term a mask would leave every same-camera
                       pair at distance 1, i.e. forbid same-camera clusters)

Layouts: "condensed" = SciPy pdist order (i < j), N(N-1)/2 float32; "square" = N x N float32,
symmetric, diagonal exactly 0. A row range (r0, r1) of the condensed layout writes only the
entries of rows [r0, r1), into a block whose first entry is row r0's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = {"eq5": 0, "feature": 1, "jaccard": 2}


# ----------------------------------------------------------------------------- references


def pairwise_jaccard_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised Jaccard between the rows of a (M, D) and b (P, D) in plain PyTorch (float32,
    computed in float64 in row chunks). J(0, 0) = 0."""
    a64, b64 = a.double(), b.double()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    step = max(1, 2**22 // max(1, b.shape[0] * max(1, a.shape[1])))
    for r in range(0, a.shape[0], step):
        x = a64[r : r + step, None, :]
        smin = torch.minimum(x, b64[None]).sum(-1)
        smax = torch.maximum(x, b64[None]).sum(-1)
        out[r : r + step] = torch.where(smax > 0, smin / smax.clamp_min(1e-300), 0.0)
    return out.float()


def inter_camera_distance_ref(features, scores, camids, mu=0.02, out="condensed", mode="eq5"):
    """Eq. 5 distance in plain PyTorch (float64 arithmetic, float32 result), any order of camids.

    features (N, d) (normalised here; zero rows give cos 0), scores (N, D) nonnegative, camids (N,)
    integers. Returns the condensed (N(N-1)/2,) or square (N, N) float32 tensor."""
    n = int(camids.shape[0])
    dist = torch.zeros(n, n, dtype=torch.float64, device=camids.device)
    if mode != "jaccard":
        f = torch.nn.functional.normalize(features.double(), dim=1)
        dist = 1.0 - f @ f.T
    if mode != "feature":
        j = pairwise_jaccard_ref(scores, scores).double()
        if mode == "jaccard":
            dist = 1.0 - j
        else:
            cross = camids[:, None] != camids[None, :]
            dist = dist - mu * j * cross
    dist.fill_diagonal_(0.0)
    dist = dist.float()
    if out == "square":
        return dist
    iu = torch.triu_indices(n, n, offset=1, device=dist.device)
    return dist[iu[0], iu[1]].contiguous()


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _l1_quad(acc, a4, b4, BM: tl.constexpr, BN: tl.constexpr):
    """acc += sum over the 4 k of |a_k - b_k|; a4 (BM, 4), b4 (BN, 4) hold 4 consecutive k."""
    a01, a23 = tl.split(tl.reshape(a4.to(tl.float32), (BM, 2, 2)))
    b01, b23 = tl.split(tl.reshape(b4.to(tl.float32), (BN, 2, 2)))
    a0, a1 = tl.split(a01)
    a2, a3 = tl.split(a23)
    b0, b1 = tl.split(b01)
    b2, b3 = tl.split(b23)
    acc += tl.abs(a0[:, None] - b0[None, :])
    acc += tl.abs(a1[:, None] - b1[None, :])
    acc += tl.abs(a2[:, None] - b2[None, :])
    acc += tl.abs(a3[:, None] - b3[None, :])
    return acc


@triton.jit
def _l1_tile(a_base, rows, stride_a, b_base, cols, stride_b, k_end,
             BM: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr):
    """sum_k |a_k - b_k| for a BM x BN tile of pairs from "quad-major" layouts (D_pad/4,
    rows_pad, 4): element k of row r at base + (k // 4) * stride + 4 r + k % 4, stride =
    4 rows_pad. Each step loads 16 contiguous bytes a row (fully coalesced, one vector load for
    4 k). The k offset lives in one scalar pointer (uniform registers). k_end % (4 UNROLL) == 0;
    the layouts are zero padded (|0 - 0| = 0)."""
    q = tl.arange(0, 4)
    ra = rows[:, None] * 4 + q[None, :]
    cb = cols[:, None] * 4 + q[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in range(0, k_end, 4 * UNROLL):
        for u in tl.static_range(UNROLL):
            acc = _l1_quad(acc, tl.load(a_base + u * stride_a + ra), tl.load(b_base + u * stride_b + cb), BM, BN)
        a_base += UNROLL * stride_a
        b_base += UNROLL * stride_b
    return acc


@triton.jit
def _jaccard_from_l1(l1, sa, sb):
    """J = (S - L1) / (S + L1), S = Sa + Sb; J(0, 0) = 0; clamped to [0, 1] against rounding."""
    s = sa[:, None] + sb[None, :]
    den = s + l1
    j = (s - l1) / tl.where(den > 0, den, 1.0)
    return tl.minimum(tl.maximum(tl.where(den > 0, j, 0.0), 0.0), 1.0)


@triton.jit
def _pairwise_jaccard_kernel(
    at_ptr,  # (D_pad/4, M_pad, 4) a in quad-major layout (see _l1_tile), zero padded
    bt_ptr,  # (D_pad/4, P_pad, 4) b likewise
    sa_ptr,  # (M_pad,) float32 row sums of a
    sb_ptr,  # (P_pad,) float32 row sums of b
    out_ptr,  # (M, P) float32, row-major
    M, P, M_pad, P_pad, D_pad,
    BM: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    # (x // B) * B: the compiler then knows the strides are multiples of the block, so the
    # k-steps keep 16-byte alignment and the row loads vectorise
    stride_a = (M_pad // BM) * BM * 4
    stride_b = (P_pad // BN) * BN * 4
    l1 = _l1_tile(at_ptr, rows, stride_a, bt_ptr, cols, stride_b, (D_pad // (4 * UNROLL)) * (4 * UNROLL), BM, BN, UNROLL)
    j = _jaccard_from_l1(l1, tl.load(sa_ptr + rows), tl.load(sb_ptr + cols))
    mask = (rows[:, None] < M) & (cols[None, :] < P)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * P + cols[None, :], j, mask=mask)


@triton.jit(do_not_specialize=["r0", "r1"])  # plain i32 always: no recompile per row range
def _inter_camera_kernel(
    # kernel order: sorted by camera for the whole matrix, the caller's order for a row range
    feat_ptr,  # (N_pad, d_pad) L2-normalised features in kernel order, zero padded, row-major
    st_ptr,  # (D_pad/4, N_pad, 4) scores in kernel order, quad-major layout (see _l1_tile)
    rowsum_ptr,  # (N_pad,) float32 score row sums, kernel order
    cam_ptr,  # (N_pad,) int32 camera ids in kernel order (padding repeats the last camera)
    perm_ptr,  # (N_pad,) int32 caller's index of each kernel-order position
    tiles_ptr,  # (T, 3) int32 (row tile, column tile, one camera) with row tile <= column tile;
    #             one camera = 1 when every row and column of the tile has one and the same camera
    out_ptr,  # float32 output, caller's order: square (N, N), or the condensed entries of rows
    #           [r0, r1), entry (i, j) at its condensed position minus that of (r0, r0 + 1)
    N, N_pad, d_pad, D_pad, mu,
    r0, r1,  # condensed rows [r0, r1) of the kernel order: (0, N) for the whole matrix
    MODE: tl.constexpr,  # 0 eq5, 1 feature, 2 jaccard
    SQUARE: tl.constexpr,  # write the square layout (else condensed)
    BLOCK: tl.constexpr,  # rows = columns of a tile
    BK: tl.constexpr,  # feature dims a tl.dot step
    UNROLL: tl.constexpr,  # quads (4 score dims) a step of the L1 loop
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 features, "tf32" ignored for fp16
):
    pid = tl.program_id(0)
    tm = tl.load(tiles_ptr + 3 * pid)
    tn = tl.load(tiles_ptr + 3 * pid + 1)
    rows = tm * BLOCK + tl.arange(0, BLOCK)
    cols = tn * BLOCK + tl.arange(0, BLOCK)
    # (x // B) * B tells the compiler the strides are multiples of the block (aligned,
    # vectorised loads); the launcher pads to those multiples
    N_pad = (N_pad // BLOCK) * BLOCK
    d_pad = (d_pad // BK) * BK
    D_pad = (D_pad // (4 * UNROLL)) * (4 * UNROLL)

    if MODE != 2:  # cosine through tl.dot on normalised features
        offs_k = tl.arange(0, BK)
        fa_ptrs = feat_ptr + rows[:, None].to(tl.int64) * d_pad + offs_k[None, :]
        fb_ptrs = feat_ptr + cols[None, :].to(tl.int64) * d_pad + offs_k[:, None]
        cos = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for _ in range(0, d_pad, BK):
            cos = tl.dot(tl.load(fa_ptrs), tl.load(fb_ptrs), cos, input_precision=DOT_PRECISION)
            fa_ptrs += BK
            fb_ptrs += BK
        dist = 1.0 - cos
    else:
        dist = tl.full([BLOCK, BLOCK], 1.0, dtype=tl.float32)

    if MODE != 1:
        k_end = D_pad
        if MODE == 0:
            # a tile whose pairs all share one camera (J is masked there) skips the L1 loop
            k_end = tl.where(tl.load(tiles_ptr + 3 * pid + 2) != 0, 0, D_pad)
        l1 = _l1_tile(st_ptr, rows, 4 * N_pad, st_ptr, cols, 4 * N_pad, k_end, BLOCK, BLOCK, UNROLL)
        jac = _jaccard_from_l1(l1, tl.load(rowsum_ptr + rows), tl.load(rowsum_ptr + cols))
        if MODE == 0:
            cam_r = tl.load(cam_ptr + rows)
            cam_c = tl.load(cam_ptr + cols)
            dist = dist - mu * tl.where(cam_r[:, None] != cam_c[None, :], jac, 0.0)
        else:
            dist = 1.0 - jac

    i = tl.load(perm_ptr + rows).to(tl.int64)[:, None]  # caller's indices
    j = tl.load(perm_ptr + cols).to(tl.int64)[None, :]
    r2 = rows[:, None]
    c2 = cols[None, :]
    if SQUARE:
        valid = (r2 <= c2) & (c2 < N)
        dist = tl.where(r2 == c2, 0.0, dist)
        tl.store(out_ptr + i * N + j, dist, mask=valid)
        tl.store(out_ptr + j * N + i, dist, mask=valid)
    else:
        valid = (r2 < c2) & (c2 < N) & (r2 >= r0) & (r2 < r1)
        lo = tl.minimum(i, j)
        hi = tl.maximum(i, j)
        base = r0.to(tl.int64) * N - r0.to(tl.int64) * (r0 + 1) // 2  # condensed offset of row r0
        tl.store(out_ptr + (lo * N - lo * (lo + 1) // 2 + hi - lo - 1 - base), dist, mask=valid)


# ----------------------------------------------------------------------------- launchers

#: launch configuration (GPU and interpreter alike); benchmarks/gpu_specs/pairwise.py compiles exactly these
JACCARD_BLOCK = (64, 64)
DIST_BLOCK, DIST_BK, UNROLL, NUM_WARPS, NUM_STAGES = 64, 32, 2, 4, 2


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _quad_major(x: torch.Tensor, rows_pad: int, d_pad: int) -> torch.Tensor:
    """(rows, D) -> zero-padded (d_pad/4, rows_pad, 4) copy, same dtype: 4 consecutive k of a row
    are 16 contiguous bytes, consecutive rows are adjacent (coalesced vector loads)."""
    t = torch.zeros(d_pad // 4, rows_pad, 4, dtype=x.dtype, device=x.device)
    full = x.shape[1] // 4 * 4
    t[: full // 4, : x.shape[0]] = x[:, :full].reshape(x.shape[0], full // 4, 4).transpose(0, 1)
    if full < x.shape[1]:
        t[full // 4, : x.shape[0], : x.shape[1] - full] = x[:, full:]
    return t


def _padded_rowsum(x: torch.Tensor, rows_pad: int) -> torch.Tensor:
    s = torch.zeros(rows_pad, dtype=torch.float32, device=x.device)
    s[: x.shape[0]] = x.float().sum(1)
    return s


def pairwise_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised Jaccard (M, D) x (P, D) -> (M, P) float32 on the GPU (or the interpreter).

    Inputs: nonnegative float32/float16/bfloat16 rows on one device; validated by
    `iics_fast.similarity.pairwise_jaccard`, which is the public entry point."""
    m, p, dim = a.shape[0], b.shape[0], a.shape[1]
    bm, bn = JACCARD_BLOCK
    m_pad, p_pad, d_pad = _round_up(max(m, 1), bm), _round_up(max(p, 1), bn), _round_up(max(dim, 1), 4 * UNROLL)
    out = torch.empty(m, p, dtype=torch.float32, device=a.device)
    if m == 0 or p == 0:
        return out
    at, bt = _quad_major(a, m_pad, d_pad), _quad_major(b, p_pad, d_pad)
    grid = (m_pad // bm, p_pad // bn)
    _pairwise_jaccard_kernel[grid](
        at, bt, _padded_rowsum(a, m_pad), _padded_rowsum(b, p_pad), out, m, p, m_pad, p_pad, d_pad,
        BM=bm, BN=bn, UNROLL=UNROLL, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def _tiles(cam_pad: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """(T, 3) int32 work list: (row tile, column tile, one camera) for row tiles [t0, t1) and
    column tiles from the row tile on; "one camera" is 1 where every row and column of the
    tile has the same camera (the eq5 kernel then skips the Jaccard term). cam_pad: (N_pad,)
    camera ids in kernel order."""
    n_tiles = cam_pad.shape[0] // DIST_BLOCK
    blocks = cam_pad.view(n_tiles, DIST_BLOCK)
    lo, hi = blocks.amin(1), blocks.amax(1)
    iu = torch.triu_indices(n_tiles, n_tiles, device=cam_pad.device)
    iu = iu[:, (iu[0] >= t0) & (iu[0] < t1)]
    tm, tn = iu[0], iu[1]
    one = (lo[tm] == hi[tm]) & (lo[tn] == hi[tn]) & (lo[tm] == lo[tn])
    return torch.stack([tm, tn, one.long()], 1).to(torch.int32).contiguous()


def inter_camera_distance(features, scores, camids, mu=0.02, out="condensed", mode="eq5", out_buf=None, rows=None):
    """Fused Eq. 5 distance on the GPU (or the interpreter); see the module docstring.

    Inputs are validated by `iics_fast.similarity.inter_camera_distance` (the public entry point):
    features (N, d) / scores (N, D) float32, float16 or bfloat16 on one CUDA device (either may be
    None when `mode` does not use it), camids (N,) integer tensor in any order. The whole build
    sorts the samples by camera (tiles inside one camera skip the Jaccard term in eq5 mode);
    results are written at the caller's indices. rows = (r0, r1) (condensed only): the entries of
    rows [r0, r1) alone, in the caller's order with no sort, so that those rows are the tile rows
    [r0 // BLOCK, ceil(r1 / BLOCK)); only the tiles of those rows run. `out_buf`, if given, is a
    contiguous float32 tensor of the output's shape (the block's, with rows) on the same device
    and is returned."""
    n = int(camids.shape[0])
    device = camids.device
    square = out == "square"
    r0, r1 = (0, n) if rows is None else rows
    base = r0 * (2 * n - r0 - 1) // 2
    shape = (n, n) if square else (r1 * (2 * n - r1 - 1) // 2 - base,)
    result = out_buf if out_buf is not None else torch.empty(shape, dtype=torch.float32, device=device)
    if n < 2 or result.numel() == 0:
        result.zero_()
        return result
    code = MODES[mode]
    n_pad = _round_up(n, DIST_BLOCK)
    pad = n_pad - n
    ranks = torch.unique(camids, return_inverse=True)[1]  # camera ranks 0..C-1: int32-safe ids
    if rows is None:
        order = torch.sort(ranks, stable=True)
        perm, cam_k = order.indices, order.values
    else:
        perm, cam_k = None, ranks
    cam_pad = torch.cat([cam_k, cam_k[-1:].expand(pad)]).to(torch.int32).contiguous()
    idx = torch.arange(n, device=device) if perm is None else perm
    perm_pad = torch.cat([idx, idx[-1:].expand(pad)]).to(torch.int32).contiguous()

    if code != 2:
        f = torch.nn.functional.normalize(features.float(), dim=1)
        if perm is not None:
            f = f[perm]
        dot_dtype = torch.float32 if features.dtype == torch.float32 else torch.float16
        d_pad = _round_up(f.shape[1], DIST_BK)
        feat = torch.zeros(n_pad, d_pad, dtype=dot_dtype, device=device)
        feat[:n, : f.shape[1]] = f
        del f
        precision = "ieee" if dot_dtype == torch.float32 else "tf32"
    else:
        feat, d_pad, precision = torch.zeros(1, dtype=torch.float32, device=device), 0, "ieee"
    if code != 1:
        s_k = scores if perm is None else scores[perm]
        big_d = _round_up(scores.shape[1], 4 * UNROLL)
        st = _quad_major(s_k, n_pad, big_d)
        rowsum = _padded_rowsum(s_k, n_pad)
        del s_k
    else:
        st, rowsum, big_d = torch.zeros(1, dtype=torch.float32, device=device), torch.zeros(n_pad, device=device), 0

    tiles = _tiles(cam_pad, r0 // DIST_BLOCK, -(-r1 // DIST_BLOCK))
    _inter_camera_kernel[(tiles.shape[0],)](
        feat, st, rowsum, cam_pad, perm_pad, tiles, result, n, n_pad, d_pad, big_d, float(mu), r0, r1,
        MODE=code, SQUARE=square, BLOCK=DIST_BLOCK, BK=DIST_BK, UNROLL=UNROLL,
        DOT_PRECISION=precision, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return result
