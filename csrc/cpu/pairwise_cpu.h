// Pairwise generalised Jaccard and the IICS inter-camera distance on the CPU (no Python here).
//
//   J(a, b) = sum_k min(a_k, b_k) / sum_k max(a_k, b_k)        (nonnegative rows; J(0, 0) := 0)
//   d(m, n) = 1 - cos(f_m, f_n) - mu * J(s_m, s_n) * [cam_m != cam_n]          (mode kEq5)
//
// One accumulator per pair: Smin = sum_k min(a_k, b_k); with row sums Sa, Sb,
// sum max = Sa + Sb - Smin (min + max = a + b), so J = Smin / (Sa + Sb - Smin). This is the
// same single-accumulator identity as the L1 form (L1 = Sa + Sb - 2 Smin) at two vector ops an
// element (min, add) instead of three (sub, and-not-sign, add): AVX2 has no free |.| modifier.
//
// `isa` selects the SIMD variant of the sum-of-minima loop: "auto" (the widest this CPU runs,
// chosen at run time), "avx512", "avx2" or "scalar"; an unknown or unsupported name throws
// std::invalid_argument.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace iics {

enum class InterCameraMode : int { kEq5 = 0, kFeature = 1, kJaccard = 2 };

// J for every pair of rows: a (m x d, row stride lda), b (p x d, row stride ldb), nonnegative
// finite float32, row sums sa (m), sb (p) -> out (m x p, row stride ldo).
void pairwise_jaccard_cpu(const float* a, int64_t m, int64_t lda, const float* sa,
                          const float* b, int64_t p, int64_t ldb, const float* sb, int64_t d,
                          float* out, int64_t ldo, const std::string& isa = "auto");

// Distances of rows [r0, r1) against every later row j > i of an n-sample set, written into
// the condensed (SciPy pdist order) or square (n x n, both halves, zero diagonal) output.
//   scores (n x dim, row stride lds) and rowsum (n): unused when mode == kFeature (may be null)
//   feats (n x fdim, row stride ldf): unit-norm feature rows, cos(f_i, f_j) = their dot product
//         (computed by the same tiles as the sums of minima, so each pair's value does not
//         depend on [r0, r1)); unused when mode == kJaccard (may be null).
//   cam (n): camera of each sample; used by kEq5 only.
//   out: square (n x n, out_base must be 0) or a condensed block whose first entry is the
//        condensed position out_base <= offset of row r0 (entry (i, j) goes to
//        out[condensed_index(n, i, j) - out_base]).
void inter_camera_rows_cpu(const float* scores, int64_t lds, const float* rowsum, int64_t dim,
                           const float* feats, int64_t ldf, int64_t fdim, const int64_t* cam,
                           int64_t n, int64_t r0, int64_t r1, float mu, InterCameraMode mode,
                           bool square, float* out, int64_t out_base,
                           const std::string& isa = "auto");

// The SIMD variants this CPU runs, widest first (always ends with "scalar").
std::vector<std::string> simd_variants();

// The variant `isa` resolves to ("auto": the widest this CPU runs).
std::string simd_variant(const std::string& isa);

// One core's ceiling for the sum-of-minima loop: the micro-kernel of variant `isa` alone on
// L1-resident rows (the same instructions as the tiles, no memory traffic), in bursts of about
// 0.5 ms for `seconds`; returns the fastest burst's pair-dims (one min + add) a second. The cores
// do not share execution units (no SMT on the machines measured), so a machine's ceiling is
// this times the cores used.
double min_sum_ceiling(const std::string& isa, double seconds);

}  // namespace iics
