// Condensed upper-triangle layout shared by every op of the extension (SciPy's `pdist` order):
// entry (i, j), i < j, of an n x n symmetric matrix lives at
//     n*i - i*(i+1)/2 + (j - i - 1)
// Row i's entries (i, i+1..n-1) are contiguous, which the merge and the distance builds rely on.
#pragma once
#include <cmath>
#include <cstdint>

namespace iics {

// Number of entries of the condensed triangle of n points.
inline int64_t condensed_size(int64_t n) { return n * (n - 1) / 2; }

// Number of points n with condensed_size(n) == m, or -1 when m is no such number.
inline int64_t condensed_points(int64_t m) {
  int64_t n = static_cast<int64_t>((1.0 + std::sqrt(1.0 + 8.0 * static_cast<double>(m))) / 2.0);
  while (n > 0 && condensed_size(n) > m) --n;
  while (condensed_size(n + 1) <= m) ++n;
  return condensed_size(n) == m ? n : -1;
}

// Offset of row i's first entry (i, i+1). Precondition: 0 <= i < n.
inline int64_t condensed_row(int64_t n, int64_t i) { return n * i - i * (i + 1) / 2; }

// Offset of (i, j). Precondition: 0 <= i < j < n (callers order the pair).
inline int64_t condensed_index(int64_t n, int64_t i, int64_t j) {
  return condensed_row(n, i) + (j - i - 1);
}

// Compacts the upper triangle of a row-major n x n matrix into its first condensed_size(n)
// entries, in place. Safe because entry (i, j) moves to a position <= its square position
// n*i + j, and rows are handled in increasing order.
template <typename T>
void square_to_condensed(T* buf, int64_t n) {
  int64_t dst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* src = buf + n * i + i + 1;
    for (int64_t j = i + 1; j < n; ++j) buf[dst++] = *src++;
  }
}

}  // namespace iics
