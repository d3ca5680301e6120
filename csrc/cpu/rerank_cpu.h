// Sparse k-reciprocal re-ranking of an all-vs-all distance matrix (no Python here).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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
  std::string isa = "auto";  // row sweeps: "auto" (the widest this CPU runs), "avx512", "plain"
};

// Each row's min(k1 + 1, n) nearest samples by normalised distance (ties: smaller index first),
// row-major n x kk int32, nearest first. Throws std::invalid_argument on NaN/inf input.
// isa: as KReciprocalParams::isa.
std::vector<int32_t> k_reciprocal_neighbours_cpu(const float* in, Layout in_layout, int64_t n,
                                                 int k1, const std::string& isa = "auto");

// Writes the re-ranked distance into `out` (square: every entry; condensed: i < j). `out` may
// be `in` itself when the layouts match (in place); otherwise the buffers must not overlap.
// Checks the input for NaN/inf before writing anything (std::invalid_argument).
void k_reciprocal_cpu(const float* in, Layout in_layout, float* out, Layout out_layout,
                      const KReciprocalParams& p);

// The steps of the re-ranking that do not read the distance matrix, shared with the sparse
// inter-camera round (cpu/sparse_cpu.cpp), which feeds them neighbour lists and keys instead.
namespace rerank_parts {

// Compressed sparse rows: row i is col/val[ptr[i] .. ptr[i+1]), columns ascending.
struct Sparse {
  std::vector<int64_t> ptr;
  std::vector<int32_t> col;
  std::vector<float> val;
};

// Nearest float16 value of x (ties to even), as a float: NumPy's float16 arithmetic is the
// float32 operation followed by this rounding. Precondition: |x| < 65504 (values here are < 4).
inline float round_half(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int exponent = static_cast<int>((bits >> 23) & 0xffu) - 127;
  if (exponent < -14) exponent = -14;  // float16 subnormals share the spacing 2^-24
  const uint32_t ulp_bits = static_cast<uint32_t>(exponent - 10 + 127) << 23;
  float ulp;
  std::memcpy(&ulp, &ulp_bits, sizeof ulp);
  return std::nearbyint(x / ulp) * ulp;  // x / ulp and the product are exact (powers of two)
}

// Row i's expanded k-reciprocal set (columns ascending, no values) from the n x kk nearest
// lists `nbr` (nearest first): its k-reciprocal neighbours among the kk, plus each candidate's
// set at k_half neighbours that overlaps them by more than 2/3.
Sparse expansion_sets(int64_t n, int kk, int k_half, const std::vector<int32_t>& nbr);

// Fills v.val from keys[e] (the normalised distance of entry e of v.col): exp(-key) normalised
// to sum 1 a row (NumPy's summation order), rounded to float16.
void weigh_rows(Sparse& v, const float* keys);

// Query expansion: row i becomes the float32 mean of rows nbr[i][0..k2) (rank order), rounded
// to float16.
Sparse expand_v(const Sparse& v, int64_t n, int kk, int k2, const std::vector<int32_t>& nbr);

// Column view (the inverted index): rows of column c ascending.
Sparse transpose(const Sparse& v, int64_t n);

}  // namespace rerank_parts

}  // namespace iics
