// Sparse k-reciprocal re-ranking of an all-vs-all distance matrix (no Python here).
#pragma once
#include <cstdint>
#include <vector>

namespace iics {

// How a matrix of n samples is stored. Square: row-major n x n, row i = sample i's distances.
// Condensed: the upper triangle i < j in SciPy pdist order (condensed.h) of a symmetric matrix
// whose diagonal is taken as 0.
enum class Layout { Square, Condensed };

struct KReciprocalParams {
  int64_t n;             // samples, >= 2
  int k1;                // neighbours a row (the first k1 + 1 are kept; cut at n)
  int k_half;            // round(k1 / 2) + 1, the expansion rule's neighbour count (cut at n)
  int k2;                // query-expansion width, 1 <= k2 <= k1 + 1
  float jaccard_weight;  // 1 - lambda rounded to float16, as the reference multiplies it
  float dist_weight;     // lambda in float32
};

// Each row's min(k1 + 1, n) nearest samples by normalised distance (ties: smaller index first),
// row-major n x kk int32, nearest first. Throws std::invalid_argument on NaN/inf input.
std::vector<int32_t> k_reciprocal_neighbours_cpu(const float* in, Layout in_layout, int64_t n,
                                                 int k1);

// Writes the re-ranked distance into `out` (square: every entry; condensed: i < j). `out` may
// be `in` itself when the layouts match (in place); otherwise the buffers must not overlap.
// Checks the input for NaN/inf before writing anything (std::invalid_argument).
void k_reciprocal_cpu(const float* in, Layout in_layout, float* out, Layout out_layout,
                      const KReciprocalParams& p);

}  // namespace iics
