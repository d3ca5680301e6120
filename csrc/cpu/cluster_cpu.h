// Hierarchical agglomerative clustering on a condensed distance matrix, in place (no Python).
//
// The merge core is the nearest-neighbour chain (Murtagh 1983; Müllner 2011, "Modern hierarchical,
// agglomerative clustering algorithms"): exact for the reducible linkages (single, complete,
// average, weighted), O(n^2) time, and here O(n) memory beyond the caller's triangle.
#pragma once
#include <cstdint>
#include <vector>

namespace iics {

// One-pass operations (finiteness check, copy, selection) use threads only above this many
// entries: below it the pass takes milliseconds, no more than a fork/join can cost on a busy
// machine.
constexpr int64_t kParallelPass = int64_t(1) << 25;

enum class LinkageMethod : int { Single = 0, Complete = 1, Average = 2, Weighted = 3 };

// Runs the nearest-neighbour chain on the condensed upper triangle `D` of n points (SciPy `pdist`
// order, see condensed.h) and destroys it. Writes the n-1 merges in the order they are found
// (not sorted by height): the two merged clusters, each named by one of its points, and the
// height. Preconditions: n >= 1, n < 2^31, every entry finite. Uses OpenMP threads (when built
// with them) for large scans and updates while timing shows they pay; force_threads runs every
// operation threaded (for tests of that path). The caller releases the GIL.
template <typename T>
void nn_chain_linkage(T* D, int64_t n, LinkageMethod method, int32_t* merge_a, int32_t* merge_b,
                      double* merge_h, bool force_threads = false);

// Work of one pass of rnn_linkage, in the units of the device's memory traffic: entries read
// one per row (a column of the triangle: a separate memory sector each on a GPU) and entries read
// along a row (contiguous).
struct RnnPass {
  int64_t live;      // live clusters at the start of the pass
  int64_t merges;    // reciprocal pairs merged
  int64_t rescans;   // nearest-neighbour rescans
  int64_t strided;   // triangle entries read or written across rows
  int64_t contiguous;  // triangle entries read or written along rows
};

// The same merges as nn_chain_linkage by parallel reciprocal-nearest-neighbour passes
// (cluster_rnn.h, shared with the CUDA launcher): merge r joins slots merge_a[r] < merge_b[r] in
// pass merge_pass[r]; the merges of a pass are written in increasing order of merge_a, passes in
// order. Equal to SciPy's dendrogram when no candidate merges tie; with ties nearest neighbours
// break by the lowest slot (a valid dendrogram that can differ from the chain's). `passes`, when
// given, receives each pass's work.
template <typename T>
void rnn_linkage(T* D, int64_t n, LinkageMethod method, int32_t* merge_a, int32_t* merge_b,
                 double* merge_h, int32_t* merge_pass, std::vector<RnnPass>* passes = nullptr);

// SciPy's linkage matrix of reciprocal-nearest-neighbour merges given in any order within their
// passes (the device appends them concurrently): puts them in the host's order (pass, then
// merge_a), then labels them as merges_to_linkage does.
void rnn_merges_to_linkage(int64_t n, const int32_t* merge_a, const int32_t* merge_b,
                           const double* merge_h, const int32_t* merge_pass, double* Z);

// Turns merges from nn_chain_linkage into SciPy's linkage matrix Z ((n-1) x 4, row-major): rows
// sorted stably by height; Z[r,0] < Z[r,1] are the ids of the merged clusters (points 0..n-1,
// the cluster made by row r is n+r); Z[r,2] the height; Z[r,3] the size. O(n) extra memory.
void merges_to_linkage(int64_t n, const int32_t* merge_a, const int32_t* merge_b,
                       const double* merge_h, double* Z);

// Flat labels after the first `n_merges` rows of a linkage matrix Z of n points: clusters are
// numbered 0, 1, ... in the order of their smallest point (the cluster of point 0 is 0).
void cut_linkage(int64_t n, const double* Z, int64_t n_merges, int64_t* labels);

// Index of the first entry of x[0..m) that is NaN or infinite, or -1 if all are finite.
template <typename T>
int64_t first_nonfinite(const T* x, int64_t m);

// Index of the first non-finite entry of the upper triangle (i < j) of a row-major n x n array,
// reported as a condensed offset (condensed.h), or -1.
template <typename T>
int64_t first_nonfinite_upper(const T* x, int64_t n);

// The value of rank `rank` (0-based) of x[0..m) in ascending order, i.e. sort(x)[rank], exactly,
// without sorting or copying: an MSD radix selection on the order-preserving integer image of the
// floats, 16 bits a pass (2 passes for float, 4 for double), O(1) extra memory a thread.
// Precondition: 0 <= rank < m, no NaN.
template <typename T>
T select_rank(const T* x, int64_t m, int64_t rank);

}  // namespace iics
