// Reciprocal-nearest-neighbour (RNN) merge on the condensed triangle: the per-pass work, written
// once and compiled for the host (cpu/cluster_cpu.cpp, OpenMP loops) and the device
// (cuda/cluster_cuda.cu, one thread or block per item), so both run the same arithmetic.
//
// A pass over the m live slots (a slot is a point; it holds a cluster named by that point):
//   1. rescan: the nearest live slot of every slot whose cached neighbour is stale (all at the
//      start; then the slots that received a union and those whose neighbour merged);
//   2. pairs: every reciprocal pair x < y (nn[x] == y, nn[y] == x) merges at height D(x, y);
//      y keeps the union, x is dropped (SciPy's convention);
//   3. update: Lance-Williams for every (merge, live slot) item of the pass; a slot whose cached
//      neighbour merged is marked stale, the others keep their cache or take a better updated
//      entry (the lexicographic minimum over the items, which does not depend on their order);
//   4. finish (serial on the host, one block on the device): sizes, the live list, the stale
//      list of the next pass.
// Exact for the reducible linkages (single, complete, average, weighted): merging a reciprocal
// pair never changes another cluster's nearest-neighbour order, so the merges of a pass are the
// merges any exact algorithm makes, and the dendrogram is the one SciPy computes when no two
// candidate merges tie. Nearest neighbours break ties by the lowest slot, which makes every
// nearest-neighbour cycle a reciprocal pair, so each pass merges at least one pair.
//
// Two merges p, q of one pass (i_p < i_q) meet at D(j_p, j_q); it is computed as if p were
// applied first, then q, each result rounded to the storage type as a sequential merge would
// store it. Every other updated entry needs one Lance-Williams step.
#pragma once
#include <cstdint>

#include "condensed.h"

namespace iics {
namespace rnn {

// Rounded double arithmetic that nvcc must not contract into fused multiply-adds (the host file
// turns contraction off), so host and device round every step alike.
IICS_HD inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
IICS_HD inline double add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
IICS_HD inline double div(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// The distance from the union of clusters a (size sa) and b (size sb) to a third cluster, from its
// distances da to a and db to b; method codes as LinkageMethod (0 single, 1 complete, 2 average,
// 3 weighted). Evaluated in double as SciPy writes it.
IICS_HD inline double lance_williams(int method, double da, double db, double sa, double sb) {
  switch (method) {
    case 0: return da < db ? da : db;
    case 1: return da > db ? da : db;
    case 2: return div(add(mul(sa, da), mul(sb, db)), add(sa, sb));
    default: return mul(0.5, add(da, db));
  }
}

// (v, k) before (best, arg): smaller distance, then lower slot.
template <typename T>
IICS_HD inline bool better(T v, int32_t k, T best, int32_t arg) {
  return v < best || (v == best && k < arg);
}

// Device-visible pointers of one merge (plain data, passed by value to kernels).
template <typename T>
struct State {
  T* D;                 // condensed triangle of the n points, destroyed
  const int64_t* roff;  // roff[k] = condensed_row(n, k) - k - 1, so D(k, x) = D[roff[k] + x], k < x
  int32_t* act;         // the live slots, increasing
  int32_t* nn;          // cached nearest live slot of each live slot
  T* dnn;               // and its distance
  int32_t* partner;     // the other slot of this pass's merge, -1 if none (reset every pass)
  uint8_t* stale;       // 1: rescan this slot in the next pass
  double* size;         // points in the cluster of each slot
  int32_t* pi;          // this pass's merges: dropped slot i ...
  int32_t* pj;          // ... and the slot j > i that keeps the union
  int method;

  // D(a, b) of two distinct slots, by reference.
  IICS_HD T& at(int32_t a, int32_t b) const {
    return a < b ? D[roff[a] + b] : D[roff[b] + a];
  }
};

// Folds D(x, act[t]) for t = t0, t0 + step, ... < m (skipping x itself) into (best, arg).
template <typename T>
IICS_HD inline void scan_row(const State<T>& s, int32_t x, int32_t m, int32_t t0, int32_t step,
                             T& best, int32_t& arg) {
  const T* rx = s.D + s.roff[x];
  for (int32_t t = t0; t < m; t += step) {
    const int32_t k = s.act[t];
    if (k == x) continue;
    const T v = k < x ? s.D[s.roff[k] + x] : rx[k];
    if (better(v, k, best, arg)) best = v, arg = k;
  }
}

// Whether live slot act[t] starts a reciprocal pair (x < y); sets x and y.
template <typename T>
IICS_HD inline bool pair_at(const State<T>& s, int32_t t, int32_t& x, int32_t& y) {
  x = s.act[t];
  y = s.nn[x];
  return x < y && s.nn[y] == x;
}

// Whether the cached nearest neighbour of slot k merges in this pass (then k is rescanned).
template <typename T>
IICS_HD inline bool lost(const State<T>& s, int32_t k) {
  return s.partner[s.nn[k]] >= 0;
}

// The work of merge q against live slot k = act[t]:
//  * k in no merge: D(j_q, k) <- LW(D(i_q, k), D(j_q, k)). Returns true (and the new value in v)
//    when that entry is better than k's cache and the cache stays valid (its neighbour did not
//    merge): the caller folds such entries into the cache, lexicographically, after the pass.
//  * k = j_r with i_q < i_r: D(j_q, j_r), merge q applied before merge r.
//  * otherwise (k = i_r, or k = j_r with i_r <= i_q): nothing.
// Items of one pass write disjoint entries and read no written entry of another item, so they run
// in any order, concurrently.
template <typename T>
IICS_HD inline bool update_item(const State<T>& s, int32_t q, int32_t t, T& v) {
  const int32_t k = s.act[t], mate = s.partner[k];
  const int32_t iq = s.pi[q], jq = s.pj[q];
  const double siq = s.size[iq], sjq = s.size[jq];
  if (mate < 0) {
    T& d = s.at(jq, k);
    v = static_cast<T>(lance_williams(s.method, s.at(iq, k), d, siq, sjq));
    d = v;
    return !lost(s, k) && better(v, jq, s.dnn[k], s.nn[k]);
  }
  if (mate < k && iq < mate) {
    const int32_t ir = mate, jr = k;
    const T to_i = static_cast<T>(lance_williams(s.method, s.at(iq, ir), s.at(jq, ir), siq, sjq));
    T& d = s.at(jq, jr);
    const T to_j = static_cast<T>(lance_williams(s.method, s.at(iq, jr), d, siq, sjq));
    d = static_cast<T>(lance_williams(s.method, to_i, to_j, s.size[ir], s.size[jr]));
  }
  return false;
}

}  // namespace rnn
}  // namespace iics
