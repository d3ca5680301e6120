// The sparse inter-camera round's native steps (no Python here): sums of minima of sparse score
// rows on an edge list, the k-reciprocal Jaccard from neighbour lists (no distance matrix), and
// average linkage over a sparse graph of cluster-pair sums with the rest from cluster sums.
#pragma once
#include <algorithm>
#include <cstdint>
#include <queue>
#include <string>
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

// J_w of every pair of each tile: rows[rows_ptr[t] .. rows_ptr[t + 1]) x cols[cols_ptr[t] ..
// cols_ptr[t + 1]), tile after tile, row-major, float32 as sparse_min_sums then
// m / (total_i + total_j - m) (0 for a zero denominator), and 0 for two rows of one camera when
// `cams` is given. Same sums as sparse_min_sums (tail terms with `tail`), arranged for a tile: a
// row's kept values are spread once into a dense vector and each column-side row's entries are
// looked up in it, block by block (no branch on the columns' order); a block's tail terms come
// from the kept counts when every kept value on each side reaches the other side's tail (most
// blocks), else entry by entry. Columns must lie below offsets[blocks]. `isa`: "auto" (AVX-512
// gathers where the CPU has them), "avx512" or "plain" (the same sums in another order).
void sparse_tile_jaccard_cpu(const int64_t* ptr, const int32_t* col, const float* val,
                             const float* total, const int32_t* rows, const int64_t* rows_ptr,
                             const int32_t* cols, const int64_t* cols_ptr, int64_t tiles,
                             const int64_t* offsets, int blocks, const float* tail,
                             double tail_weight, const int64_t* cams, float* out,
                             const std::string& isa = "auto");

// Running top-k lists of the rows of a product computed block by block: p (r x c, row-major)
// holds the cosines of global rows gr0.. with global columns gc0..; near (largest kn) and far
// (smallest kf) are heaps, one row of each a list, for the global rows r0 .. r0 + lists, their
// roots the worst entry kept (start them at -inf / +inf and id -1). rows_side: p's rows update
// their lists with the columns (ids gc0 + j); cols_side: p's columns update theirs with the rows
// (ids gr0 + i): one block of a symmetric product serves both sides. The lists rank by value,
// ties by the smaller id (a total order: what they keep does not depend on the blocks' order).
void top_update_cpu(const float* p, int64_t r, int64_t c, int64_t gr0, int64_t gc0, int64_t r0,
                    float* near_c, int32_t* near_i, int kn, float* far_c, int32_t* far_i, int kf,
                    bool rows_side, bool cols_side);

// out[e] = the position p of qj[e] among col[ptr[qi[e]] .. ptr[qi[e] + 1]) (ascending within a
// row; the first of equal ones), or -1 when the row does not hold it: pairs looked up by row, a
// binary search in the row's few entries instead of one over every pair's key.
void pair_find_cpu(const int64_t* ptr, const int32_t* col, const int32_t* qi, const int32_t* qj, int64_t q,
                   int64_t* out);

// Each of the m lists of k (value, id) sorted by value, descending or ascending, ties by id.
void top_sort_cpu(float* val, int32_t* ids, int64_t m, int k, bool descending);

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
// Exact re-checks (`check_pairs(margin)`): an edge's sum has an exact part (the given pair values,
// sums returned by `set_sums`, and their Lance-Williams sums) and a model part, with the
// rectangles of A x B the model part covers: ranges of positions in the two clusters' member
// lists. A merge appends the absorbed cluster's list to the survivor's, so the absorbed side of
// a sum is a contiguous range of the merged list, and a neighbour of one side only adds one
// rectangle (the other side's range x the neighbour's whole list). An edge with model parts
// enters the queue at height - margin and a bound counts as bound - margin; `run` stops when such
// an edge is the closest, `pending` hands the closest ones out with their rectangles, the caller
// computes the exact sums over the rectangles only and returns them with `set_sums`. A merge is
// then taken only at an exact height no farther than every non-exact edge and every bound minus
// the margin: the greedy merge on the exact pair values whenever the model errs by less than the
// margin. Each sample pair is evaluated at most once: once exact, a pair's part stays exact,
// except that an edge past `max_rects` rectangles counts whole as model (re-checked whole; this
// bounds the memory; `collapsed` counts them).
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
  // Turns the exact re-checks on with the given margin (>= 0) and rectangle limit an edge (>= 1).
  void check_pairs(double margin, int64_t max_rects);
  int64_t collapsed() const { return collapsed_; }
  // A rectangle of a pair's model part: positions [lo_a, hi_a) of one cluster's member list x
  // [lo_b, hi_b) of the other's.
  struct Rect {
    int32_t lo_a, hi_a, lo_b, hi_b;
  };
  // Up to `count` of the closest non-exact edges (height - margin no farther than the smallest
  // bound - margin), removed from the queue until `set_sums` returns their exact sums: their
  // slots a < b, model heights, exact parts' sums, and model rectangles (a's positions x b's),
  // rects[rect_ptr[e] .. rect_ptr[e + 1]) for edge e.
  void pending(int64_t count, std::vector<int32_t>& a, std::vector<int32_t>& b,
               std::vector<double>& model, std::vector<double>& exact,
               std::vector<int64_t>& rect_ptr, std::vector<Rect>& rects);
  // The exact sums over the model rectangles `pending` handed out for the pairs (a[e], b[e]):
  // they replace the model parts.
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
  // A pair of clusters' sum: the exact part here, the model part (if any) in parts_. 16 bytes:
  // the graph holds one a pair (44 million at N = 100,000 with re-ranking).
  struct Link {
    double exact = 0.0;    // sum over A x B of the exact pair values (all of it when not checking)
    int32_t parts = -1;    // its model part in parts_, -1: none (the sum is exact)
    bool pending = false;  // handed out by `pending`: out of the queue until `set_sums`
  };
  struct Parts {
    double model = 0.0;               // the model's sum over the rectangles
    int32_t end_a = -1, end_b = -1;   // the slots the rectangles' ranges refer to
    std::vector<Rect> rects;          // where the model part lies
  };
  // A queue entry: the pair's key when pushed. It is valid while both slots live, are adjacent,
  // the link is not pending and its key is still `dist` (a merge changes the sizes, so a
  // superseded entry no longer matches; a matching one holds the pair's current key).
  struct Entry {
    double dist;  // height, or height - margin for a non-exact sum
    int32_t a, b;
    bool operator>(const Entry& o) const {
      if (dist != o.dist) return dist > o.dist;
      if (a != o.a) return a > o.a;
      return b > o.b;
    }
  };
  // The queue of edges. A merge re-pushes its survivor's edges and leaves their old entries in
  // place (skipped when popped); `drop` removes entries no longer valid, so that the queue's
  // memory follows the live edges, not the merges taken.
  struct EdgeQueue : std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> {
    void reserve(size_t n) { c.reserve(n); }
    template <class Valid>
    void drop_invalid(Valid valid) {
      c.erase(std::remove_if(c.begin(), c.end(), [&](const Entry& e) { return !valid(e); }), c.end());
      c.shrink_to_fit();
      std::make_heap(c.begin(), c.end(), comp);
    }
  };
  // A slot's neighbours: neighbour slot -> link id, open addressing with linear probing over any
  // number of buckets (load up to 3/4: about 11 bytes an entry where a node-based map takes
  // about 40; the graph holds two a pair).
  class Neighbours {
   public:
    size_t size() const { return size_; }
    const int32_t* find(int32_t key) const;
    bool contains(int32_t key) const { return find(key) != nullptr; }
    int32_t at(int32_t key) const;
    void set(int32_t key, int32_t value);  // inserts or overwrites
    void erase(int32_t key);
    void reserve(size_t count);  // room for `count` entries without growing
    void clear() { std::vector<int32_t>().swap(slots_); size_ = 0; }
    // Calls f(key, value) for every entry; f must not change this map.
    template <class F>
    void each(F f) const {
      for (size_t i = 0; i < slots_.size(); i += 2)
        if (slots_[i] >= 0) f(slots_[i], slots_[i + 1]);
    }

   private:
    size_t buckets() const { return slots_.size() / 2; }
    size_t home(int32_t key) const;
    void rehash(size_t buckets);
    std::vector<int32_t> slots_;  // (key, value) pairs, key -1 for an empty slot
    size_t size_ = 0;
  };
  double sep(int32_t a, int32_t b) const;
  // The queue key of the pair (a, b) holding `link`.
  double key(int32_t a, int32_t b, const Link& link) const;
  void push(int32_t a, int32_t b, Link& link);
  int32_t new_link(int32_t a, int32_t b);
  // Adds a model sum over the rectangle r (of end_a's positions x end_b's; the link oriented so)
  // to a link: into the exact part when nothing is re-checked.
  void add_model(Link& link, int32_t end_a, int32_t end_b, double sum, Rect r);
  // Makes a link exact again (its model part's sums replaced or dropped).
  void drop_parts(Link& link);
  // Re-orients a link's rectangles so that end_a == slot.
  void orient(Link& link, int32_t slot);
  // The link id of a queue entry's pair when the entry is valid, else -1.
  int32_t entry_link(const Entry& e) const;
  bool valid(const Entry& e) const { return entry_link(e) >= 0; }
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
  std::vector<uint8_t> alive_;
  bool checking_ = false;
  double margin_ = 0.0;
  size_t max_rects_ = 16;
  int64_t collapsed_ = 0;
  std::vector<Link> links_;
  std::vector<int32_t> free_links_;
  std::vector<Parts> parts_;
  std::vector<int32_t> free_parts_;
  std::vector<Neighbours> adj_;
  std::vector<int32_t> next_, tail_;  // members: a list from the slot itself, next_ = -1 ends it
  EdgeQueue heap_;
  std::vector<double> bound_;
  std::vector<uint32_t> bound_stamp_;
  std::priority_queue<Bound, std::vector<Bound>, std::greater<Bound>> bounds_;
  int64_t live_;
  std::vector<int32_t> kept_, absorbed_;
  std::vector<double> heights_;
};

}  // namespace iics
