// The sparse inter-camera round's native steps (no Python here): sums of minima of sparse score
// rows on an edge list, the k-reciprocal Jaccard from neighbour lists (no distance matrix), and
// average linkage over a sparse graph of cluster-pair sums with the rest from cluster sums.
#pragma once
#include <cstdint>
#include <queue>
#include <unordered_map>
#include <vector>

#include "cpu/rerank_cpu.h"

namespace iics {

// out[e] = sum over shared columns c of min(val_i[c], val_j[c]) for e = (ei[e], ej[e]), rows of
// the CSR (ptr, col ascending a row, val); float64 sums rounded to float32. With `tail`
// (n x blocks: each row's dropped mass of a block spread evenly over the block's dropped
// entries, block b = columns [offsets[b], offsets[b + 1])) an entry kept on one side only adds
// min(kept value, the other side's tail) and the entries dropped on both sides add
// min(tail_i, tail_j) each: an estimate of the full rows' sum, never above it by construction of
// the bound (see iics_fast/sparse.py). The terms holding a tail count tail_weight times (1: the
// even-tail estimate; the round fits it on rows kept whole). A column outside the blocks counts
// in the last block.
void sparse_min_sums_cpu(const int64_t* ptr, const int32_t* col, const float* val,
                         const int32_t* ei, const int32_t* ej, int64_t edges, float* out,
                         const int64_t* offsets = nullptr, int blocks = 0,
                         const float* tail = nullptr, double tail_weight = 1.0);

// out[e] = <f[ei[e]], f[ej[e]]> over rows of the n x d float32 `f`, float64 sums rounded.
void pair_dots_cpu(const float* f, int64_t d, const int32_t* ei, const int32_t* ej, int64_t edges,
                   float* out);

// The pairs i < j whose query-expanded k-reciprocal rows share a column, with the float16 sum
// of minima m the dense re-ranking accumulates for them (same order, same rounding).
struct JaccardPairs {
  std::vector<int32_t> i, j;
  std::vector<float> m;
};

// v: expansion sets (rerank_parts::expansion_sets) with keys[e] the normalised distance of
// entry e; weighs them, applies the query expansion over nbr's first k2 (n x kk) and returns the
// sharing pairs.
JaccardPairs k_reciprocal_pairs_cpu(rerank_parts::Sparse v, const float* keys, int64_t n, int kk,
                                    int k2, const std::vector<int32_t>& nbr);

// Average linkage on a sparse graph. A pair of clusters (A, B) is either an edge, holding the
// exact sum of its pair values, or not, and then its sum is the separable model
//   sep(A, B) = |A||B| c0 + (|B| U_A + |A| U_B) / 2 - (<G_A, X_B> + <X_A, G_B>) / 2
// from per-cluster sums X (features), G (weighted features; G = X when `symmetric`) and U.
// Merges the globally closest adjacent pair (height sum / (|A||B|), ties to the lower pair of
// slots) until `target` clusters remain or no edge is left; a merged cluster keeps the slot of
// the side with more neighbours, its sums to every neighbour of either side come from the two
// sides' edge sums or sep (Lance-Williams for average linkage, exact for the model).
//
// Each slot also carries a bound: a lower bound on sep(A, B) / (|A||B|) over every live B not
// adjacent to A (+inf by default: the graph alone decides). A merge of height h is taken only
// when h <= the smallest live bound, so every pair off the graph is at least as far and the
// merge is the globally closest pair's; otherwise `run` returns early and the caller searches
// the clusters whose bound is below `top()`, adds their nearest as edges and raises their
// bounds (`set_bounds`). A merged cluster's bound is the smaller of its two sides': for a B
// adjacent to neither, sep(A u A', B) / (|A u A'||B|) is a weighted mean of the two sides'.
//
// Exact re-checks (`check_pairs(margin)`): an edge's sum is *exact* when it was given (the
// graph's pair values) or set by `set_sums`, and a merged cluster's sum to a neighbour stays
// exact when both sides' were; a sum holding any model part is not. A non-exact edge enters the
// queue at height - margin and a bound counts as bound - margin; `run` stops when a non-exact
// edge is the closest, `pending` hands the closest non-exact edges out, the caller computes
// their exact sums over A x B and returns them with `set_sums`. A merge is then taken only at an
// exact height no farther than every non-exact edge and every bound minus the margin: the greedy
// merge on the exact pair values whenever the model errs by less than the margin.
class SparseLinkage {
 public:
  // x, g: n x d float32 sums, updated in place (g == x when symmetric); u: n float64.
  SparseLinkage(int64_t n, int64_t d, float* x, float* g, const double* u, double c0);
  // Adds edges (a[e], b[e]) between live slots with pair sums s[e] (or, with s == nullptr, the
  // model sums sep); pairs already adjacent are left as they are.
  void add_edges(const int32_t* a, const int32_t* b, const double* s, int64_t count);
  // Merges until `target` live clusters, an empty queue, or a closest adjacent pair above the
  // smallest bound; returns the live count.
  int64_t run(int64_t target);
  // The closest adjacent pair's height (+inf when no edge is left).
  double top();
  void set_bound(int32_t slot, double value);
  // Turns the exact re-checks on with the given margin (>= 0).
  void check_pairs(double margin);
  // Up to `count` of the closest non-exact edges (height - margin no farther than the smallest
  // bound - margin), removed from the queue until `set_sums` returns their exact sums; `model`
  // gets their model heights.
  void pending(int64_t count, std::vector<int32_t>& a, std::vector<int32_t>& b,
               std::vector<double>& model);
  // Exact pair sums of adjacent live pairs (a[e], b[e]).
  void set_sums(const int32_t* a, const int32_t* b, const double* s, int64_t count);
  // Members of a live slot's cluster, appended to `out`.
  void members(int32_t slot, std::vector<int32_t>& out) const;
  double bound(int64_t slot) const { return bound_[slot]; }
  double usum(int64_t slot) const { return u_[slot]; }
  int64_t live() const { return live_; }
  // Merge records: survivor slot, absorbed slot, height, in merge order.
  const std::vector<int32_t>& kept() const { return kept_; }
  const std::vector<int32_t>& absorbed() const { return absorbed_; }
  const std::vector<double>& heights() const { return heights_; }
  int64_t size(int64_t slot) const { return static_cast<int64_t>(size_[slot]); }
  bool alive(int64_t slot) const { return alive_[slot] != 0; }

 private:
  struct Link {
    double sum;
    bool exact;
  };
  struct Entry {
    double dist;  // height, or height - margin for a non-exact sum
    int32_t a, b;
    uint32_t stamp_a, stamp_b;
    bool exact;
    bool operator>(const Entry& o) const {
      if (dist != o.dist) return dist > o.dist;
      if (a != o.a) return a > o.a;
      return b > o.b;
    }
  };
  double sep(int32_t a, int32_t b) const;
  void push(int32_t a, int32_t b, const Link& link);
  bool valid(const Entry& e) const {
    return alive_[e.a] && alive_[e.b] && stamp_[e.a] == e.stamp_a && stamp_[e.b] == e.stamp_b;
  }
  void merge(int32_t keep, int32_t gone, double height);

  // The smallest live bound (+inf when none), dropping superseded entries.
  double min_bound();
  struct Bound {
    double value;
    int32_t slot;
    uint32_t stamp;
    bool operator>(const Bound& o) const { return value > o.value; }
  };

  int64_t n_, d_;
  float* x_;
  float* g_;
  bool symmetric_;
  double c0_;
  std::vector<double> u_, size_;
  std::vector<uint32_t> stamp_;
  std::vector<uint8_t> alive_;
  bool checking_ = false;
  double margin_ = 0.0;
  std::vector<std::unordered_map<int32_t, Link>> adj_;
  std::vector<int32_t> next_, tail_;  // members: a list from the slot itself, next_ = -1 ends it
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap_;
  std::vector<double> bound_;
  std::vector<uint32_t> bound_stamp_;
  std::priority_queue<Bound, std::vector<Bound>, std::greater<Bound>> bounds_;
  int64_t live_;
  std::vector<int32_t> kept_, absorbed_;
  std::vector<double> heights_;
};

}  // namespace iics
