import numpy as np
import pytest
from scipy.spatial.distance import squareform

from iics_fast._native import native


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_condensed_index_matches_scipy(n, rng):
    C = native()
    x = rng.random((n, n))
    x = x + x.T
    np.fill_diagonal(x, 0)
    cond = squareform(x, checks=False)
    assert C.condensed_size(n) == len(cond)
    for i in range(n):
        for j in range(n):
            if i != j:
                assert cond[C.condensed_index(n, i, j)] == x[i, j]


def test_condensed_index_rejects_bad_pairs():
    C = native()
    for i, j in [(0, 0), (-1, 2), (0, 5)]:
        with pytest.raises(IndexError):
            C.condensed_index(5, i, j)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_square_to_condensed_in_place(n, dtype, rng):
    C = native()
    x = rng.random((n, n)).astype(dtype)
    expect = x[np.triu_indices(n, 1)].copy()
    C.square_to_condensed(x)
    np.testing.assert_array_equal(x.reshape(-1)[: n * (n - 1) // 2], expect)


def test_square_to_condensed_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        native().square_to_condensed(np.zeros((3, 4), np.float32))


# ----------------------------------------------------------------------------- Python side


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_python_condensed_helpers_match_scipy(n, rng):
    from iics_fast import condensed

    x = rng.random((n, n)).astype(np.float32)
    x = x + x.T
    np.fill_diagonal(x, 0)
    cond = squareform(x, checks=False)
    assert condensed.size(n) == len(cond) and condensed.points(len(cond)) == n
    np.testing.assert_array_equal(condensed.upper(x), cond)
    np.testing.assert_array_equal(condensed.to_square(cond), x)
    for offset in range(len(cond)):
        i, j = condensed.pair(n, offset)
        assert i < j and cond[offset] == x[i, j]
        assert condensed.row_offset(n, i) + (j - i - 1) == offset == native().condensed_index(n, i, j)
    assert condensed.row_offset(n, n) == len(cond)


def test_python_condensed_rejects_bad_input():
    from iics_fast import condensed

    assert condensed.points(4) == -1 and condensed.points(0) == 1
    with pytest.raises(ValueError, match="outside"):
        condensed.row_offset(5, 6)
    with pytest.raises(ValueError, match="outside"):
        condensed.pair(5, 10)
    with pytest.raises(ValueError, match="n\\(n-1\\)/2"):
        condensed.to_square(np.zeros(4))
