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
