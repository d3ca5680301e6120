"""A block of rows of the condensed inter-camera distance matrix, for a sharded build.

`iics_fast.similarity.inter_camera_distance` always writes the whole matrix. A rank of a sharded
build needs only the condensed entries of rows [r0, r1), i.e. `d[offset(r0):offset(r1)]` of the
SciPy `pdist` order, and must not hold more than that block. This module computes such a block
from the public pieces of the similarity API: cosines by a float32 GEMM of the L2-normalised
features (as the CPU path of `inter_camera_distance` does) and the Jaccard term by
`similarity.pairwise_jaccard`, combined with the same float32 formula

    d(m, n) = 1 - cos(f_m, f_n) - mu * J(s_m, s_n) * [cam_m != cam_n]

Every entry is computed the same way whatever block holds it, so blocks of any split put end to
end are bitwise equal to `inter_camera_rows(..., 0, N)`; against `inter_camera_distance` they agree
to float32 rounding (bitwise where the same operations are used, see tests/test_distributed.py).
"""
from __future__ import annotations


import torch

from iics_fast import similarity

_SLAB_ENTRIES = 2**24  # float32 entries of one (rows x N) cosine slab: 64 MiB
_CHUNK_ROWS = 768  # rows of one Jaccard / combination chunk


def _slab_rows(n: int) -> int:
    """Rows of a cosine slab. Slabs sit on a grid fixed by N alone (rows k*S .. (k+1)*S), the
    same grid as the CPU path of `inter_camera_distance`, because a GEMM's rounding may depend on
    its shape (few-row products take another kernel): with one grid every entry's cosine comes
    from the same product in every split and in the whole-matrix build."""
    return max(24, min(n, _SLAB_ENTRIES // max(n, 1)) // 24 * 24)


def condensed_row_offset(n: int, i: int) -> int:
    """Position of entry (i, i+1) in the condensed (pdist-order) vector of n points, i.e. the
    number of entries of rows 0..i-1 (row i holds n-1-i entries); i = n gives n(n-1)/2."""
    if not 0 <= i <= n:
        raise ValueError(f"row {i} is outside 0..{n}")
    return i * (2 * n - i - 1) // 2


def inter_camera_rows(features, scores, camids, mu=0.02, *, r0, r1, mode="eq5", backend="auto", out=None):
    """Condensed entries of rows [r0, r1) of the inter-camera distance matrix of all N samples:
    a float32 vector of `condensed_row_offset(N, r1) - condensed_row_offset(N, r0)` entries,
    equal to `inter_camera_distance(...)[off(r0):off(r1)]` up to float32 rounding.

    Arguments as in `similarity.inter_camera_distance` (features / scores of all N samples,
    camids in any order, `mode` "eq5" | "feature" | "jaccard", `backend` for the Jaccard term);
    `out`: optional contiguous float32 buffer of the block's length on the inputs' device
    (e.g. a slice of a preallocated condensed vector), written and returned. Work memory is
    a few (slab rows x N) float32 arrays (~2^24 entries each), never the whole matrix."""
    f, s, cam, mu, device = similarity._check_inputs(features, scores, camids, mu, mode)
    n = int(cam.shape[0])
    r0, r1 = int(r0), int(r1)
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"need 0 <= r0 <= r1 <= N = {n}, got r0={r0}, r1={r1}")
    if f is not None:
        f = torch.nn.functional.normalize(f.to(torch.float32), dim=1).contiguous()
    length = condensed_row_offset(n, r1) - condensed_row_offset(n, r0)
    if out is None:
        out = torch.empty(length, dtype=torch.float32, device=device)
    elif (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.ndim != 1
          or not out.is_contiguous() or out.shape[0] != length or out.device != device):
        raise ValueError(f"out must be a contiguous 1-D float32 tensor of {length} entries on {device}")

    pos = 0
    slab = _slab_rows(n)
    last = min(r1, n - 1)  # the last row has no entries
    for s0 in range(r0 // slab * slab, last, slab):
        s1 = min(n, s0 + slab)
        a, b = max(s0, r0), min(s1, last)
        if f is not None:
            # the whole slab's GEMM, whichever of its rows this block needs: an entry's cosine
            # then comes from the same GEMM call in every split
            g = torch.mm(f[s0:s1], f[s0:].T)
        # Jaccard and the combination in chunks of rows: a chunk [c0, c1) x [c0, N) rectangle
        # computes (c1 - c0)^2 / 2 entries below the diagonal for nothing, kept small this way
        for c0 in range(a, b, _CHUNK_ROWS):
            c1 = min(b, c0 + _CHUNK_ROWS)
            cols = n - c0
            if f is not None:
                val = torch.sub(1.0, g[c0 - s0:c1 - s0, c0 - s0:])
            if s is not None:
                j = similarity.pairwise_jaccard(s[c0:c1], s[c0:], backend=backend)
                if mode == "jaccard":
                    val = torch.sub(1.0, j, out=j)
                else:
                    cross = cam[c0:c1, None] != cam[None, c0:]
                    j.mul_(mu)
                    torch.sub(val, j, out=j)  # val - mu * J, rounded as written, in place
                    torch.where(cross, j, val, out=val)
                del j
            # row c0+k keeps its columns j > c0+k: the strict upper triangle, row-major = pdist order
            upper = torch.arange(cols, device=device)[None, :] > torch.arange(c1 - c0, device=device)[:, None]
            count = condensed_row_offset(n, c1) - condensed_row_offset(n, c0)
            torch.masked_select(val, upper, out=out[pos:pos + count])
            pos += count
        g = None
    return out
