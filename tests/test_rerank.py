"""Sparse k-reciprocal re-ranking held to the dense transcription of the reference."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from benchmarks.probes import can_reset_peak, run_python
from iics_fast._native import native
from iics_fast.condensed import upper
from iics_fast.rerank import k_reciprocal, k_reciprocal_ref


def all_vs_all(rng, n, dim=16, clusters=None):
    """Symmetric IICS-like distance 1 - cos - 0.02 * J: tie-free, some entries negative (so a
    row's minimum is not always its zero diagonal)."""
    if clusters:
        centres = rng.standard_normal((clusters, dim))
        x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    else:
        x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    j = rng.random((n, n))
    d = 1 - x @ x.T - 0.02 * (j + j.T) / 2
    d = ((d + d.T) / 2).astype(np.float32)
    np.fill_diagonal(d, 0)
    return d


def condensed(d):
    return upper(d).copy()


def stable_rank(d, width):
    """Each row's `width` nearest by row-normalised distance, ties to the smaller index."""
    shifted = d - d.min(axis=1, keepdims=True)
    top = shifted.max(axis=1, keepdims=True)
    top[top == 0] = 1
    return np.argsort(shifted / top, axis=1, kind="stable")[:, :width]


@pytest.mark.parametrize("n", [2, 3, 5, 20, 21, 22, 64, 257, 1100])
def test_every_layout_matches_reference_bit_for_bit(n, rng):
    d = all_vs_all(rng, n, clusters=max(1, n // 8))
    ref = k_reciprocal_ref(d, exact_exp=True)
    upper = ref[np.triu_indices(n, 1)]
    c = condensed(d)

    np.testing.assert_array_equal(k_reciprocal(d), ref)
    np.testing.assert_array_equal(k_reciprocal(d, out="condensed"), upper)
    np.testing.assert_array_equal(k_reciprocal(c), upper)
    np.testing.assert_array_equal(k_reciprocal(c, out="square"), ref)
    buf = np.full(len(c), np.nan, np.float32)
    assert k_reciprocal(d, out=buf) is buf
    np.testing.assert_array_equal(buf, upper)

    square = d.copy()
    assert k_reciprocal(square, out=square) is square  # in place, square
    np.testing.assert_array_equal(square, ref)
    assert k_reciprocal(c, out=c) is c  # in place, condensed
    np.testing.assert_array_equal(c, upper)


@pytest.mark.parametrize("k1, k2, lam", [(7, 3, 0.3), (5, 1, 0.5), (9, 10, 0.0), (20, 21, 1.0),
                                         (1, 2, 0.3), (4, 5, 0.7)])
def test_parameters_match_reference(k1, k2, lam, rng):
    d = all_vs_all(rng, 150, clusters=20)
    ref = k_reciprocal_ref(d, k1, k2, lam, exact_exp=True)
    np.testing.assert_array_equal(k_reciprocal(d, k1, k2, lam), ref)
    np.testing.assert_array_equal(k_reciprocal(condensed(d), k1, k2, lam),
                                  ref[np.triu_indices(150, 1)])


THREADS_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from iics_fast.rerank import k_reciprocal
    d = np.load(sys.argv[1])
    np.save(sys.argv[2], k_reciprocal(d, out="condensed"))
""")


@pytest.mark.parametrize("threads", [1, 3])
def test_result_does_not_depend_on_thread_count(threads, rng, tmp_path):
    d = all_vs_all(rng, 1500, clusters=100)
    np.save(tmp_path / "d.npy", d)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", THREADS_PROBE, tmp_path / "d.npy", tmp_path / "o.npy"],
                   env=env, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), k_reciprocal(condensed(d)))


def test_k1_beyond_n_matches_reference(rng):
    """k1 >= N: every neighbour list is the whole row, as the reference's slices make it."""
    d = all_vs_all(rng, 30, clusters=4)
    ref = k_reciprocal_ref(d, 10**6, 6, exact_exp=True)
    np.testing.assert_array_equal(k_reciprocal(d, 10**6, 6), ref)


def test_close_to_reference_with_numpy_exp(rng):
    """The reference's own float32 exp may be an ulp off: a rare float16 rounding of V flips,
    moving the few entries that share it by a float16 step of the Jaccard sum (<= ~2e-3)."""
    d = all_vs_all(rng, 300, clusters=30)
    ref = k_reciprocal_ref(d)
    fast = k_reciprocal(d)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=3e-3)
    assert np.mean(fast != ref) < 1e-3


def test_condensed_output_is_upper_triangle_normalised_by_row_i(rng):
    """The result is not symmetric; the condensed output is the reference's (i < j) entries."""
    d = all_vs_all(rng, 80, clusters=10)
    ref = k_reciprocal_ref(d, exact_exp=True)
    assert not np.array_equal(ref, ref.T)
    iu = np.triu_indices(80, 1)
    np.testing.assert_array_equal(k_reciprocal(condensed(d)), ref[iu])
    assert not np.array_equal(k_reciprocal(condensed(d)), ref.T[iu])


def test_asymmetric_square_is_reference_of_transpose(rng):
    """Square input: row i is sample i's distance list (the reference normalises columns)."""
    d = rng.random((90, 90)).astype(np.float32)
    np.testing.assert_array_equal(k_reciprocal(d), k_reciprocal_ref(d.T, exact_exp=True))


@pytest.mark.parametrize("n", [30, 500])
def test_neighbour_selection_is_stable_argsort(n, rng):
    d = all_vs_all(rng, n, clusters=max(1, n // 10))
    expect = stable_rank(d, min(21, n))
    np.testing.assert_array_equal(native().k_reciprocal_neighbours(d, 20), expect)
    np.testing.assert_array_equal(native().k_reciprocal_neighbours(condensed(d), 20), expect)


def test_ties_break_to_smaller_index(rng):
    """Documented tie rule: equal normalised distances rank by index, as a stable argsort does;
    with it the result equals the reference run with a stable sort."""
    n = 120
    d = rng.integers(0, 4, (n, n)).astype(np.float32)
    d = np.maximum(d, d.T)
    np.fill_diagonal(d, 0)
    expect = stable_rank(d, 21)
    got = native().k_reciprocal_neighbours(condensed(d), 20)
    np.testing.assert_array_equal(got, expect)
    norm_at = np.take_along_axis(d, got, axis=1)
    tied = norm_at[:, 1:] == norm_at[:, :-1]
    assert tied.any() and np.all(got[:, 1:][tied] > got[:, :-1][tied])
    ref = k_reciprocal_ref(d, exact_exp=True)
    np.testing.assert_array_equal(k_reciprocal(d), ref)
    np.testing.assert_array_equal(k_reciprocal(condensed(d)), ref[np.triu_indices(n, 1)])


def row_sweep_variants():
    """The instruction sets of the row sweeps this CPU runs: "plain" always, "avx512" where
    present (the public path picks the widest)."""
    names = ["plain"]
    try:
        native().k_reciprocal_neighbours(np.zeros((2, 2), np.float32), 1, isa="avx512")
        names.append("avx512")
    except ValueError:
        pass
    return names


def native_rerank(d, isa, k1=20, k2=6, lam=0.3):
    """The extension's re-ranking with the row sweeps of `isa`, arguments as k_reciprocal
    passes them; a new buffer in d's layout."""
    n = d.shape[0] if d.ndim == 2 else int(round((1 + np.sqrt(1 + 8 * len(d))) / 2))
    out = np.full_like(d, np.nan)
    native().k_reciprocal(d, out, k1=min(k1, n), k_half=min(int(np.around(k1 / 2)) + 1, n),
                          k2=min(k2, n), jaccard_weight=float(np.float16(1 - lam)),
                          dist_weight=float(np.float32(lam)), isa=isa)
    return out


@pytest.mark.parametrize("isa", row_sweep_variants())
@pytest.mark.parametrize("n", [2, 3, 15, 16, 17, 63, 64, 65, 130])
def test_row_sweep_variants_match_reference(isa, n, rng):
    """Each instruction set's min / max and prefilter sweeps, on rows shorter than a vector,
    exactly a vector or a 64-value block, and one past it (long rows on threads: below)."""
    d = all_vs_all(rng, n, clusters=max(1, n // 8))
    ref = k_reciprocal_ref(d, exact_exp=True)
    np.testing.assert_array_equal(native_rerank(d, isa), ref)
    np.testing.assert_array_equal(native_rerank(condensed(d), isa), ref[np.triu_indices(n, 1)])
    width = min(21, n)
    np.testing.assert_array_equal(native().k_reciprocal_neighbours(d, 20, isa=isa),
                                  stable_rank(d, width))


@pytest.mark.parametrize("isa", row_sweep_variants())
@pytest.mark.parametrize("n, k1", [(300, 3), (700, 9), (1100, 15)])
def test_row_sweep_variants_with_a_block_bound(isa, n, k1, rng):
    """Rows of at least k1 + 1 blocks of 64 values: the AVX-512 sweep first bounds the
    neighbours by the blocks' minima (the key rounds, so the bound is widened to every raw
    value sharing the key), then offers the heap only what passes it; N = 1,100 on threads."""
    d = all_vs_all(rng, n, clusters=max(1, n // 8))
    k2 = 6 if k1 >= 5 else 2
    ref = k_reciprocal_ref(d, k1, k2, exact_exp=True)
    np.testing.assert_array_equal(native_rerank(d, isa, k1, k2), ref)
    np.testing.assert_array_equal(native_rerank(condensed(d), isa, k1, k2),
                                  ref[np.triu_indices(n, 1)])
    np.testing.assert_array_equal(native().k_reciprocal_neighbours(d, k1, isa=isa),
                                  stable_rank(d, k1 + 1))


@pytest.mark.parametrize("isa", row_sweep_variants())
@pytest.mark.parametrize("n, k1, values", [(70, 20, "integers"), (1100, 20, "integers"),
                                           (400, 4, "integers"), (400, 4, "adjacent floats")])
def test_row_sweep_variants_break_ties_by_index(isa, n, k1, values, rng):
    """Many entries equal to the heap's bound inside one 64-value block: the prefilter lets
    them through in index order, so the smaller index wins, as a stable argsort has it. With
    n = 400, k1 = 4 the block bound is on. "adjacent floats": eight neighbouring float32 values
    near 1.9 in a row of range 3.7, so that distinct raw values share a normalised key, the ties
    the block bound must widen to."""
    if values == "integers":
        d = rng.integers(-2, 3, (n, n)).astype(np.float32)
    else:
        steps = rng.integers(0, 8, (n, n)).astype(np.int32)
        d = (np.full((n, n), np.float32(1.9)).view(np.int32) + steps).view(np.float32)
        d[:, ::50] = np.float32(3.7)
    d = np.maximum(d, d.T)
    np.fill_diagonal(d, 0)
    if values != "integers":  # the keys do collapse
        lo, top = d[5].min(), d[5].max() - d[5].min()
        assert len(np.unique((np.unique(d[5]) - lo) / top)) < len(np.unique(d[5]))
    np.testing.assert_array_equal(native().k_reciprocal_neighbours(d, k1, isa=isa),
                                  stable_rank(d, k1 + 1))
    ref = k_reciprocal_ref(d, k1, 2, exact_exp=True)
    np.testing.assert_array_equal(native_rerank(d, isa, k1, 2), ref)


@pytest.mark.parametrize("isa", row_sweep_variants())
def test_row_sweep_variants_refuse_nonfinite(isa, rng):
    d = all_vs_all(rng, 40)
    for value, at in ((np.nan, 39), (np.inf, 17), (-np.inf, 0)):
        x = d.copy()
        x[5, at] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            native_rerank(x, isa)


def test_unknown_row_sweep_variant_is_refused():
    with pytest.raises(ValueError, match="isa must be"):
        native().k_reciprocal_neighbours(np.zeros((2, 2), np.float32), 1, isa="sse9")


def test_constant_rows_normalise_to_zero():
    """All distances equal: max == min, each row normalises to 0 instead of 0 / 0."""
    d = np.zeros((6, 6), np.float32)
    out = k_reciprocal(d)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, k_reciprocal_ref(d, exact_exp=True))


def test_torch_tensors_in_and_out(rng):
    d = all_vs_all(rng, 50, clusters=5)
    ref = k_reciprocal_ref(d, exact_exp=True)
    t = torch.from_numpy(condensed(d))
    res = k_reciprocal(t)
    assert isinstance(res, torch.Tensor)
    np.testing.assert_array_equal(res.numpy(), ref[np.triu_indices(50, 1)])
    sq = torch.from_numpy(d.copy())
    assert k_reciprocal(sq, out=sq) is sq
    np.testing.assert_array_equal(sq.numpy(), ref)


def _bad(match, *args, exc=ValueError, **kwargs):
    with pytest.raises(exc, match=match):
        k_reciprocal(*args, **kwargs)


def test_bad_input_is_refused_before_writing(rng):
    d = all_vs_all(rng, 30)
    c = condensed(d)
    _bad("square", np.zeros((3, 4), np.float32))
    _bad("N\\*\\(N-1\\)/2", np.zeros(5, np.float32))
    _bad("dimensions", np.zeros((2, 2, 2), np.float32))
    _bad("at least 2", np.zeros(0, np.float32))
    _bad("at least 2", np.zeros((1, 1), np.float32))
    _bad("float32", d.astype(np.float64), exc=TypeError)
    _bad("NumPy array or a torch", d.tolist(), exc=TypeError)
    _bad("C-contiguous", np.asfortranarray(d + np.eye(30, dtype=np.float32)))
    _bad("k1", d, k1=0)
    _bad("k2", d, k2=0)
    _bad("k2 = 22 exceeds", d, k2=22)
    _bad("lambda_value", d, lambda_value=1.5)
    _bad("lambda_value", d, lambda_value=float("nan"))
    _bad("N = 31", d, out=np.zeros((31, 31), np.float32))
    _bad("float32", d, out=np.zeros(len(c), np.float64), exc=TypeError)
    _bad("out must be", d, out="dense")
    ro = np.zeros(len(c), np.float32)
    ro.flags.writeable = False
    _bad("read-only", d, out=ro)
    _bad("overlaps", d, out=d.reshape(-1)[: len(c)])
    _bad("CPU", torch.zeros((4, 4), device="meta"))
    for value in (np.nan, np.inf):
        for x in (d.copy(), c.copy()):
            x[..., 7] = value
            before = x.copy()
            _bad("NaN or inf", x, out=x)
            np.testing.assert_array_equal(x, before)


MEMORY_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from benchmarks.probes import PeakMemory
    from iics_fast.rerank import k_reciprocal

    n, layout = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if layout == "square":
        d = 1 - x @ x.T
        np.fill_diagonal(d, 0)
    else:
        d = np.empty(n * (n - 1) // 2, np.float32)
        pos = 0
        for i in range(n - 1):
            d[pos:pos + n - 1 - i] = 1 - x[i + 1:] @ x[i]
            pos += n - 1 - i
    k_reciprocal(np.eye(30, dtype=np.float32))  # load the extension, start the threads
    with PeakMemory() as mem:
        k_reciprocal(d, out=d)
    print(mem.grew_mib * 1024)
""")


@pytest.mark.skipif(not can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
@pytest.mark.parametrize("layout", ["square", "condensed"])
def test_memory_stays_far_below_one_matrix(layout):
    n = 3000
    extra_kib = float(run_python(MEMORY_PROBE, n, layout).split()[-1])
    matrix_kib = n * n * 4 // 1024
    assert extra_kib < 0.3 * matrix_kib, (extra_kib, matrix_kib)
