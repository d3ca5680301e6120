"""Inter-camera distance and generalised Jaccard: Triton kernels (interpreter), C++ path, references,
whole matrices and row ranges (rows=(r0, r1)).

Kernels and the C++ path are held to the plain references on fresh random inputs with awkward
shapes; the references to a direct float64 sum-min / sum-max; the kernels compile for sm_80 and
sm_90 without register spills.
"""
import numpy as np
import pytest
import torch

from iics_fast import similarity as S

triton = pytest.importorskip("triton")
from iics_fast.kernels import pairwise as K  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# cosines of fp16/bf16 inputs go through float16 tensor-core operands on the GPU path
KERNEL_TOL = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 2e-3}


def direct_jaccard(a, b):
    """sum min / sum max in float64 straight from the definition; J(0, 0) = 0. A few rows of a
    at a time, so the broadcast stays small."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.empty((a.shape[0], b.shape[0]))
    for r in range(0, a.shape[0], 16):
        smin = np.minimum(a[r : r + 16, None, :], b[None]).sum(-1)
        smax = np.maximum(a[r : r + 16, None, :], b[None]).sum(-1)
        out[r : r + 16] = np.where(smax > 0, smin / np.where(smax > 0, smax, 1), 0.0)
    return out


def make_inputs(rng, n, d, dim, cams, dtype=torch.float32, zero_rows=True, device="cpu"):
    """Features, softmax-like nonnegative scores (some sparse), camera ids in the given list, on
    the given device."""
    f = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    s = rng.random((n, dim)).astype(np.float32) ** 4
    s[rng.random((n, dim)) < 0.3] = 0.0
    s = torch.from_numpy(s)
    if zero_rows and n > 3:
        s[1] = 0.0
        s[2] = 0.0
    cam = torch.from_numpy(rng.choice(cams, size=n).astype(np.int64))
    return f.to(device, dtype), s.to(device, dtype), cam.to(device)


# ----------------------------------------------------------------------------- references


def test_pairwise_jaccard_ref_matches_direct(rng):
    a = torch.from_numpy(rng.random((31, 45)).astype(np.float32))
    b = torch.from_numpy(rng.random((17, 45)).astype(np.float32))
    a[0] = 0.0
    b[3] = 0.0
    b[4] = a[5]
    ref = K.pairwise_jaccard_ref(a, b).numpy()
    np.testing.assert_allclose(ref, direct_jaccard(a, b), atol=1e-6)
    assert ref[0, 3] == 0.0 and ref[0, 0] == 0.0
    assert abs(ref[5, 4] - 1.0) < 1e-6


def test_distance_ref_matches_definition(rng):
    f, s, cam = make_inputs(rng, 23, 8, 12, [0, 1, 2])
    ref = K.inter_camera_distance_ref(f, s, cam, 0.5, "square").double().numpy()
    fn = f.double().numpy()
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    want = 1 - fn @ fn.T - 0.5 * direct_jaccard(s, s) * (cam.numpy()[:, None] != cam.numpy()[None])
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(ref, want, atol=1e-6)


# ----------------------------------------------------------------------------- Triton (GPU or interpreter)


@pytest.mark.parametrize("tag", ["fp32", "fp16", "bf16"])
def test_pairwise_jaccard_kernel(device, rng, tag):
    a = torch.from_numpy(rng.random((70, 77)).astype(np.float32) ** 3).to(device, DTYPES[tag])
    b = torch.from_numpy(rng.random((130, 77)).astype(np.float32) ** 3).to(device, DTYPES[tag])
    a[3] = 0.0
    b[5] = 0.0
    got = K.pairwise_jaccard(a, b)
    assert got.dtype == torch.float32 and got.shape == (70, 130)
    # against the exactly rounded inputs: only float32 accumulation error remains
    np.testing.assert_allclose(got.cpu().numpy(), direct_jaccard(a.float().cpu(), b.float().cpu()), atol=2e-6)
    assert got[3, 5] == 0.0


KERNEL_CASES = [
    # n, cams (unsorted ids drawn from), tag, layout, mode
    (150, [3, 0, 7, 1], "fp32", "condensed", "eq5"),
    (150, [3, 0, 7, 1], "fp32", "square", "eq5"),
    (131, [5], "fp32", "condensed", "eq5"),  # one camera: every tile skips the L1 loop
    (97, [2, 9], "fp16", "square", "eq5"),
    (97, [2, 9], "bf16", "condensed", "eq5"),
    (150, [0, 1, 2], "fp32", "condensed", "feature"),
    (150, [0, 1, 2], "fp32", "square", "jaccard"),
]


@pytest.mark.parametrize("n,cams,tag,layout,mode", KERNEL_CASES)
def test_inter_camera_kernel(device, rng, n, cams, tag, layout, mode):
    f, s, cam = make_inputs(rng, n, 40, 203, cams, DTYPES[tag], device=device)
    if len(cams) > 1:
        cam[rng.integers(n)] = 11  # a camera with a single image
    got = K.inter_camera_distance(f, s, cam, 0.3, layout, mode)
    ref = K.inter_camera_distance_ref(f, s, cam, 0.3, layout, mode)
    assert got.shape == ref.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), ref.cpu().numpy(), atol=KERNEL_TOL[tag])
    if layout == "square":
        assert torch.equal(got, got.T) and torch.all(got.diagonal() == 0)


def test_inter_camera_kernel_fills_out_buffer(device, rng):
    f, s, cam = make_inputs(rng, 70, 16, 24, [0, 1], device=device)
    buf = torch.full((70 * 69 // 2,), -7.0, device=device)
    got = K.inter_camera_distance(f, s, cam, 0.1, "condensed", "eq5", out_buf=buf)
    assert got.data_ptr() == buf.data_ptr()
    np.testing.assert_allclose(buf.cpu().numpy(), K.inter_camera_distance_ref(f, s, cam, 0.1).cpu().numpy(), atol=2e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="NumPy out buffers are host memory: CPU inputs "
                    "run the Triton kernel only in the interpreter, which is off where CUDA is present")
def test_dispatch_to_triton_with_numpy_buffer(rng):
    f, s, cam = make_inputs(rng, 70, 16, 24, [5, 2])
    buf = np.full((70, 70), np.nan, dtype=np.float32)
    got = S.inter_camera_distance(f, s, cam.numpy(), 0.2, out=buf, backend="triton")
    assert np.shares_memory(got.numpy(), buf)
    ref = S.inter_camera_distance(f, s, cam, 0.2, out="square", backend="ref")
    np.testing.assert_allclose(buf, ref.numpy(), atol=2e-5)
    jac = S.pairwise_jaccard(s, backend="triton")
    np.testing.assert_allclose(jac.numpy(), direct_jaccard(s, s), atol=2e-6)


ROW_KERNEL_CASES = [
    # n, cams, tag, mode: N not a multiple of DIST_BLOCK, one camera, half inputs, every mode
    (150, [3, 0, 7, 1], "fp32", "eq5"),
    (131, [5], "fp32", "eq5"),
    (97, [2, 9], "fp16", "eq5"),
    (150, [0, 1, 2], "fp32", "feature"),
    (150, [0, 1, 2], "fp32", "jaccard"),
]


def test_inter_camera_kernel_blocks_of_different_single_cameras(device, rng):
    """A row block of camera 1 against a column block of camera 4 (each single-camera, as
    sorted ids give): their tile needs the Jaccard term; only a tile whose two blocks share one
    camera may skip it."""
    n = 300  # blocks 0 and 3 of the sorted ids are one camera each, not the same one
    f, s, cam = make_inputs(rng, n, 40, 203, [4, 1], device=device)
    cam = cam.sort().values
    assert cam[0] != cam[-1] and len(set(cam[:64].tolist())) == len(set(cam[-64:].tolist())) == 1
    for layout in ("condensed", "square"):
        got = K.inter_camera_distance(f, s, cam, 0.3, layout, "eq5")
        ref = K.inter_camera_distance_ref(f, s, cam, 0.3, layout, "eq5")
        np.testing.assert_allclose(got.cpu().numpy(), ref.cpu().numpy(), atol=KERNEL_TOL["fp32"])
    ref = K.inter_camera_distance_ref(f, s, cam, 0.3, "condensed", "eq5")
    for r0, r1 in ((0, 64), (0, n)):
        lo, hi = S.condensed_row_offset(n, r0), S.condensed_row_offset(n, r1)
        got = K.inter_camera_distance(f, s, cam, 0.3, "condensed", "eq5", rows=(r0, r1))
        np.testing.assert_allclose(got.cpu().numpy(), ref[lo:hi].cpu().numpy(),
                                   atol=KERNEL_TOL["fp32"])


def _row_ranges(n):
    """Off-tile and on-tile starts and ends, an empty range inside, the last rows, (N, N)."""
    return [(0, n), (1, 70), (63, 65), (64, min(128, n)), (40, 40), (n - 1, n), (n - 30, n), (n, n)]


@pytest.mark.parametrize("n,cams,tag,mode", ROW_KERNEL_CASES)
def test_inter_camera_kernel_rows(device, rng, n, cams, tag, mode):
    f, s, cam = make_inputs(rng, n, 40, 203, cams, DTYPES[tag], device=device)
    ref = K.inter_camera_distance_ref(f, s, cam, 0.3, "condensed", mode)
    blocks = {}
    for r0, r1 in _row_ranges(n):
        lo, hi = S.condensed_row_offset(n, r0), S.condensed_row_offset(n, r1)
        got = K.inter_camera_distance(f, s, cam, 0.3, "condensed", mode, rows=(r0, r1))
        assert got.shape == (hi - lo,) and got.dtype == torch.float32
        np.testing.assert_allclose(got.cpu().numpy(), ref[lo:hi].cpu().numpy(), atol=KERNEL_TOL[tag])
        blocks[r0, r1] = got
    # every entry comes from the same tile in any range (caller's order, fixed tile grid)
    whole = blocks[0, n]
    assert torch.equal(torch.cat([blocks[0, n][:S.condensed_row_offset(n, 1)], blocks[1, 70],
                                  whole[S.condensed_row_offset(n, 70):]]), whole)


def test_inter_camera_kernel_rows_into_buffer_slice(device, rng):
    n = 90
    f, s, cam = make_inputs(rng, n, 16, 24, [0, 1, 1, 2], device=device)
    buf = torch.full((n * (n - 1) // 2,), -7.0, device=device)
    lo, hi = S.condensed_row_offset(n, 30), S.condensed_row_offset(n, 70)
    got = S.inter_camera_distance(f, s, cam, 0.1, out=buf[lo:hi], backend="triton", rows=(30, 70))
    assert got.data_ptr() == buf[lo:].data_ptr()
    ref = S.inter_camera_distance(f, s, cam, 0.1, backend="ref")
    np.testing.assert_allclose(buf[lo:hi].cpu().numpy(), ref[lo:hi].cpu().numpy(), atol=2e-5)
    assert bool((buf[:lo] == -7).all() and (buf[hi:] == -7).all())  # nothing written outside


# ----------------------------------------------------------------------------- C++ path


@pytest.mark.parametrize("n", [1, 2, 5, 61, 250])
@pytest.mark.parametrize("mode", ["eq5", "feature", "jaccard"])
def test_cpu_matches_ref(rng, n, mode):
    f, s, cam = make_inputs(rng, n, 37, 45, [4, 1, 2, 8])
    if n > 4:
        f[4] = 0.0  # zero feature: cos 0
    for layout in ("condensed", "square"):
        got = S.inter_camera_distance(f, s, cam, 0.7, out=layout, mode=mode, backend="cpu")
        ref = S.inter_camera_distance(f, s, cam, 0.7, out=layout, mode=mode, backend="ref")
        assert got.shape == ref.shape and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=3e-6)
    if n == 1:
        assert got.shape == (1, 1) and got.item() == 0.0


@pytest.mark.parametrize("tag", ["fp16", "bf16"])
def test_cpu_half_inputs(rng, tag):
    f, s, cam = make_inputs(rng, 90, 33, 200, [0, 1, 2], DTYPES[tag])
    got = S.inter_camera_distance(f, s, cam, 0.3, backend="cpu")
    ref = S.inter_camera_distance(f, s, cam, 0.3, backend="ref")
    # half inputs are converted exactly to float32 on the CPU: float32 tolerance applies
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=3e-6)


def test_cpu_long_score_rows_and_one_camera(rng):
    # D = 4111 crosses four of the C++ kernel's 1,024-dim chunk boundaries into a ragged 15-wide
    # tail; one camera masks every pair
    f, s, cam = make_inputs(rng, 53, 20, 4111, [0, 1, 2])
    np.testing.assert_allclose(
        S.inter_camera_distance(f, s, cam, 0.5, backend="cpu").numpy(),
        S.inter_camera_distance(f, s, cam, 0.5, backend="ref").numpy(), atol=3e-6,
    )
    one = torch.zeros_like(cam)
    np.testing.assert_allclose(
        S.inter_camera_distance(f, s, one, 0.5, backend="cpu").numpy(),
        S.inter_camera_distance(f, s, one, 0.0, mode="feature", backend="ref").numpy(), atol=3e-6,
    )


def test_cpu_condensed_is_scipy_order_and_buffers_are_reused(rng):
    from scipy.spatial.distance import squareform

    f, s, cam = make_inputs(rng, 40, 12, 30, [0, 1, 2])
    sq = S.inter_camera_distance(f, s, cam, 0.4, out="square", backend="cpu")
    buf = np.full(40 * 39 // 2, np.nan, dtype=np.float32)
    got = S.inter_camera_distance(f, s, cam, 0.4, out=buf, backend="cpu")
    assert np.shares_memory(got.numpy(), buf)
    np.testing.assert_array_equal(buf, squareform(sq.numpy(), checks=False))
    assert np.array_equal(sq.numpy(), sq.numpy().T) and np.all(np.diag(sq.numpy()) == 0)
    sq_buf = torch.empty(40, 40)
    assert S.inter_camera_distance(f, s, cam, 0.4, out=sq_buf, backend="cpu").data_ptr() == sq_buf.data_ptr()
    np.testing.assert_array_equal(sq_buf.numpy(), sq.numpy())


# 300 > one 128-row tile of the C++ kernel, so blocks start and end inside tiles
@pytest.mark.parametrize("mode", ["eq5", "feature", "jaccard"])
@pytest.mark.parametrize("n,cams", [(1, [0]), (2, [0, 1]), (5, [0, 1]), (37, [4, 1, 2]), (300, [4, 1, 2]),
                                    (101, [3])])
def test_cpu_row_blocks_equal_whole_build(rng, mode, n, cams):
    f, s, cam = make_inputs(rng, n, 41, 37, cams)  # both dims: whole vectors and a tail
    whole = S.inter_camera_distance(f, s, cam, 0.25, mode=mode, backend="cpu")
    ref = S.inter_camera_distance(f, s, cam, 0.25, mode=mode, backend="ref")
    np.testing.assert_allclose(whole.numpy(), ref.numpy(), atol=3e-6)
    splits = [[0, n], [0, 0, n, n], [0, n - 1, n], [0, n // 2, n // 2, n]]
    splits += [sorted({0, n, *rng.integers(0, n + 1, world - 1).tolist()}) for world in (2, 3, 7)]
    for cuts in splits:
        blocks = [S.inter_camera_distance(f, s, cam, 0.25, mode=mode, backend="cpu", rows=(a, b))
                  for a, b in zip(cuts, cuts[1:])]
        assert [b.shape for b in blocks] == [(S.condensed_row_offset(n, b) - S.condensed_row_offset(n, a),)
                                            for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(blocks), whole), cuts
    for a, b in ((n, n), (n - 1, n), (n // 3, n // 3)):
        assert S.inter_camera_distance(f, s, cam, 0.25, mode=mode, backend="cpu", rows=(a, b)).shape == (0,)
    lo, hi = S.condensed_row_offset(n, n // 3), S.condensed_row_offset(n, n)
    got = S.inter_camera_distance(f, s, cam, 0.25, mode=mode, backend="ref", rows=(n // 3, n))
    assert torch.equal(got, ref[lo:hi])


def test_cpu_rows_into_buffer_slice(rng):
    n = 50
    f, s, cam = make_inputs(rng, n, 8, 20, [0, 1, 2])
    buf = torch.full((n * (n - 1) // 2,), -1.0)
    lo, hi = S.condensed_row_offset(n, 7), S.condensed_row_offset(n, 31)
    got = S.inter_camera_distance(f, s, cam, out=buf[lo:hi], backend="cpu", rows=(7, 31))
    assert got.data_ptr() == buf[lo:].data_ptr()
    whole = S.inter_camera_distance(f, s, cam, backend="cpu")
    assert torch.equal(buf[lo:hi], whole[lo:hi])
    assert bool((buf[:lo] == -1).all() and (buf[hi:] == -1).all())
    nbuf = np.full(hi - lo, np.nan, dtype=np.float32)  # numpy buffers and numpy row bounds
    S.inter_camera_distance(f, s, cam, out=nbuf, backend="cpu", rows=(np.int64(7), np.int64(31)))
    np.testing.assert_array_equal(nbuf, whole[lo:hi].numpy())
    ref_buf = torch.empty(hi - lo)
    S.inter_camera_distance(f, s, cam, out=ref_buf, backend="ref", rows=(7, 31))
    np.testing.assert_allclose(ref_buf.numpy(), whole[lo:hi].numpy(), atol=3e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_condensed_row_offset(n):
    offs = [S.condensed_row_offset(n, i) for i in range(n + 1)]
    assert offs[0] == 0 and offs[-1] == n * (n - 1) // 2
    assert all(b - a == n - 1 - i for i, (a, b) in enumerate(zip(offs, offs[1:])))  # row i: n-1-i
    for i in (-1, n + 1):
        with pytest.raises(ValueError, match=f"outside 0..{n}"):
            S.condensed_row_offset(n, i)


def test_cpu_pairwise_jaccard_matches_direct(rng):
    a = torch.from_numpy(rng.random((41, 1000)).astype(np.float32) ** 3)
    b = torch.from_numpy(rng.random((29, 1000)).astype(np.float32) ** 3)
    a[2] = 0.0
    b[7] = 0.0
    got = S.pairwise_jaccard(a, b, backend="cpu")
    np.testing.assert_allclose(got.numpy(), direct_jaccard(a, b), atol=2e-6)
    assert got[2, 7] == 0.0
    out = torch.empty(41, 41)
    assert S.pairwise_jaccard(a, out=out).data_ptr() == out.data_ptr()
    np.testing.assert_allclose(out.numpy(), direct_jaccard(a, a), atol=2e-6)


def test_defined_values_for_degenerate_rows():
    f = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    cam = torch.tensor([0, 1, 2])
    for backend in ("cpu", "ref"):
        d = S.inter_camera_distance(f, s, cam, 1.0, out="square", backend=backend)
        assert d[0, 1] == 1.0  # zero feature row: cos 0; both score rows zero: J(0, 0) = 0
        assert abs(d[0, 2].item()) < 1e-7  # cos 1, J(0, s) = 0
        j = S.inter_camera_distance(None, s, cam, out="square", mode="jaccard", backend=backend)
        assert j[0, 1] == 1.0 and j[0, 0] == 0.0


# ----------------------------------------------------------------------------- bad input


def _ok(n=6):
    g = np.random.default_rng(0)
    return torch.randn(n, 4), torch.from_numpy(g.random((n, 5)).astype(np.float32)), torch.arange(n) % 2


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda f, s, c: (f, -s, c), ValueError, "nonnegative"),
        (lambda f, s, c: (f, s.index_fill(0, torch.tensor([1]), float("nan")), c), ValueError, "NaN"),
        (lambda f, s, c: (f.index_fill(0, torch.tensor([1]), float("inf")), s, c), ValueError, "NaN or Inf"),
        (lambda f, s, c: (f[:5], s, c), ValueError, "rows but camids"),
        (lambda f, s, c: (f, s[:, :0], c), ValueError, "dims >= 1"),
        (lambda f, s, c: (f.double(), s, c), TypeError, "float32, float16 or bfloat16"),
        (lambda f, s, c: (f, s.to(torch.int32), c), TypeError, "float32"),
        (lambda f, s, c: (f, s, c.float()), TypeError, "integers"),
        (lambda f, s, c: (f, s, c.bool()), TypeError, "integers"),
        (lambda f, s, c: (f, s, c[:0]), ValueError, "at least one"),
        (lambda f, s, c: (f[0], s, c), ValueError, "2-D"),
        (lambda f, s, c: ("x", s, c), TypeError, "torch.Tensor or numpy"),
    ],
)
def test_bad_inputs_raise(change, exc, match):
    f, s, c = change(*_ok())
    with pytest.raises(exc, match=match):
        S.inter_camera_distance(f, s, c)
    with pytest.raises(exc, match=match):  # a row range checks its inputs the same way
        S.inter_camera_distance(f, s, c, rows=(0, 2))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"mode": "cosine"}, ValueError, "mode"),
        ({"out": "triangle"}, ValueError, "out must be"),
        ({"out": torch.empty(14)}, ValueError, "fits neither"),
        ({"out": torch.empty(15, dtype=torch.float64)}, ValueError, "float32"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"mu": float("nan")}, ValueError, "finite"),
        ({"mu": "a"}, TypeError, "real number"),
        ({"rows": (4, 3)}, ValueError, r"0 <= r0 <= r1 <= N = 6"),
        ({"rows": (0, 7)}, ValueError, r"0 <= r0 <= r1 <= N = 6"),
        ({"rows": (-1, 2)}, ValueError, r"0 <= r0 <= r1 <= N = 6"),
        ({"rows": (0.5, 2)}, TypeError, "integers"),
        ({"rows": 3}, TypeError, r"pair \(r0, r1\)"),
        ({"rows": (0, 1, 2)}, TypeError, r"pair \(r0, r1\)"),
        ({"rows": (0, 2), "out": "square"}, ValueError, "out='condensed'"),
        ({"rows": (1, 3), "out": torch.empty(15)}, ValueError, r"the block needs \(7,\)"),
        ({"rows": (0, 6), "out": torch.empty(6, 6)}, ValueError, r"the block needs \(15,\)"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    f, s, c = _ok()
    with pytest.raises(exc, match=match):
        S.inter_camera_distance(f, s, c, **kwargs)


def test_bad_jaccard_inputs_raise():
    a = torch.rand(4, 5)
    with pytest.raises(ValueError, match="same number of columns"):
        S.pairwise_jaccard(a, torch.rand(3, 6))
    with pytest.raises(ValueError, match="nonnegative"):
        S.pairwise_jaccard(a - 1)
    with pytest.raises(ValueError, match="contiguous float32"):
        S.pairwise_jaccard(a, out=torch.empty(4, 3))


# ----------------------------------------------------------------------------- GPU compile


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch):
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.gpu_report import compile_report
    from benchmarks.gpu_specs.pairwise import COMPILE_SPECS

    with ThreadPoolExecutor(max_workers=2) as pool:  # each compile is a child process
        reports = list(pool.map(lambda spec: compile_report(spec, arch), COMPILE_SPECS))
    for spec, r in zip(COMPILE_SPECS, reports):
        assert r.spill_bytes == 0, (spec.name, arch, r)
        assert 0 < r.registers <= 255
        assert r.inner_loop_len > 0


# ----------------------------------------------------------------------------- SIMD variants


def _native():
    from iics_fast._native import native

    return native()


# The C++ kernel's cache tiles are 128 rows x 240 columns and its score-dim chunks 1,024 wide:
# 130 crosses a row tile; 500 x 1030 has four row tiles of three column tiles each (the packed
# rows of a row tile are reused across its column tiles) and a chunk boundary with a 6-dim tail;
# 4111 and 8200 cross four and eight chunk boundaries.
@pytest.mark.parametrize("n,dim", [(1, 5), (7, 15), (61, 131), (130, 300), (500, 1030), (13, 4111),
                                   (9, 8200)])
def test_simd_variants_agree_with_scalar(n, dim):
    """Every SIMD variant this CPU runs gives the plain C++ loop's sums of minima (up to float32
    summation order) on shapes that are no multiple of any vector width, tile or score-dim chunk,
    and the C++ path stays within rounding of the float64 definition."""
    C = _native()
    variants = C.simd_variants()
    assert variants[-1] == "scalar" and C.simd_variant("auto") == variants[0]
    rng = np.random.default_rng(n * 1000 + dim)
    feats, s, cam = make_inputs(rng, n, dim // 2 + 3, dim, [0, 1, 2])  # feature dim: other tails
    a = s.numpy()
    b = np.ascontiguousarray(a[::-1][: max(1, n - 3)])
    ref = direct_jaccard(a, b)
    outs = {}
    for isa in variants:
        out = np.full((a.shape[0], b.shape[0]), -1.0, np.float32)
        C.pairwise_jaccard(a, a.sum(1), b, b.sum(1), out, isa=isa)
        outs[isa] = out
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5, err_msg=isa)
    for isa in variants[:-1]:
        np.testing.assert_allclose(outs[isa], outs["scalar"], rtol=0, atol=2e-6, err_msg=isa)
    # the fused distance (Eq. 5, condensed) through each variant, against its float64 definition
    f64 = feats.numpy().astype(np.float64)
    f64 /= np.linalg.norm(f64, axis=1, keepdims=True)
    cam_np = cam.numpy()
    iu = np.triu_indices(n, 1)
    want = (1 - f64 @ f64.T - 0.3 * direct_jaccard(a, a) * (cam_np[:, None] != cam_np[None]))[iu]
    f = np.ascontiguousarray(f64.astype(np.float32))
    conds = {}
    for isa in variants:
        cond = np.full(n * (n - 1) // 2, -9.0, np.float32)
        C.inter_camera_rows(a, a.sum(1), f, cam_np, 0, n, 0.3, 0, False, cond, 0, isa=isa)
        conds[isa] = cond
        np.testing.assert_allclose(cond, want, rtol=0, atol=3e-6, err_msg=isa)
    for isa in variants[:-1]:
        np.testing.assert_allclose(conds[isa], conds["scalar"], rtol=0, atol=2e-6, err_msg=isa)


def test_simd_variant_names_are_checked():
    C = _native()
    a = np.ones((2, 4), np.float32)
    out = np.empty((2, 2), np.float32)
    with pytest.raises(ValueError, match="isa must be 'auto' or one of"):
        C.pairwise_jaccard(a, a.sum(1), a, a.sum(1), out, isa="sse9")
    for isa in C.simd_variants():
        assert C.min_sum_ceiling(isa, 0.01) > 0
