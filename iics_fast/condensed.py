"""The condensed layout of a pairwise matrix (SciPy `pdist` order), the one place its arithmetic
lives on the Python side (csrc/condensed.h is its C++ twin).

Entry (i, j), i < j, of an n x n matrix sits at `row_offset(n, i) + (j - i - 1)`; row i's
n - 1 - i entries are contiguous, so a range of rows is a contiguous slice.
"""
from __future__ import annotations

import math

import numpy as np


def size(n: int) -> int:
    """Entries n(n-1)/2 of the condensed triangle of n points."""
    return n * (n - 1) // 2


def points(length: int) -> int:
    """n with n(n-1)/2 == length, or -1 when `length` is no such number."""
    n = (1 + math.isqrt(1 + 8 * int(length))) // 2
    return n if size(n) == length else -1


def row_offset(n: int, i: int) -> int:
    """Position of entry (i, i+1): the entries of rows 0..i-1; i = n gives n(n-1)/2."""
    if not 0 <= i <= n:
        raise ValueError(f"row {i} is outside 0..{n}")
    return i * (2 * n - i - 1) // 2


def pair(n: int, offset: int) -> tuple[int, int]:
    """(i, j), i < j, of the entry at condensed position `offset`."""
    if not 0 <= offset < size(n):
        raise ValueError(f"offset {offset} is outside 0..{size(n) - 1}")
    # row_offset(n, i) <= offset: solve the quadratic, then fix the float estimate by stepping
    i = max(0, min(n - 2, int(((2 * n - 1) - math.sqrt((2 * n - 1) ** 2 - 8 * offset)) / 2)))
    while i > 0 and row_offset(n, i) > offset:
        i -= 1
    while row_offset(n, i + 1) <= offset:
        i += 1
    return i, i + 1 + offset - row_offset(n, i)


def upper(square) -> np.ndarray:
    """The strict upper triangle (i < j) of a square NumPy matrix as a condensed copy."""
    square = np.asarray(square)
    return square[np.triu_indices(square.shape[0], 1)]


def to_square(cond, diagonal=0.0) -> np.ndarray:
    """The symmetric n x n matrix (cond's dtype) of a condensed vector, `diagonal` on the diagonal."""
    cond = np.asarray(cond)
    n = points(cond.shape[0])
    if n < 0:
        raise ValueError(f"length {cond.shape[0]} is not n(n-1)/2 for any n")
    square = np.full((n, n), diagonal, dtype=cond.dtype)
    iu = np.triu_indices(n, 1)
    square[iu] = cond
    square[iu[1], iu[0]] = cond
    return square


def row_splits(n: int, parts: int) -> list[int]:
    """Row split points 0 = p_0 <= ... <= p_parts = n such that every part's rows hold about the
    same number of condensed entries (row i holds n-1-i): p_k is the first row whose offset
    reaches ceil(k * total / parts). Parts may be empty (n < parts)."""
    n, parts = int(n), int(parts)
    if n < 0 or parts < 1:
        raise ValueError(f"need n >= 0 and parts >= 1, got n={n}, parts={parts}")
    total = size(n)
    splits = [0]
    for k in range(1, parts):
        target = -(-k * total // parts)
        disc = max(0.0, (2 * n - 1) ** 2 - 8.0 * target)
        i = max(splits[-1], min(n, int(((2 * n - 1) - disc ** 0.5) / 2)))
        while i > splits[-1] and row_offset(n, i - 1) >= target:
            i -= 1
        while i < n and row_offset(n, i) < target:
            i += 1
        splits.append(i)
    splits.append(n)
    return splits
