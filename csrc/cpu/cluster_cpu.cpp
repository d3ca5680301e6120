// Nearest-neighbour-chain linkage on the condensed triangle, in place; linkage-matrix labelling,
// flat cuts, finiteness check and exact rank selection. See cluster_cpu.h.
#include "cpu/cluster_cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "condensed.h"
#include "parallel.h"

// The Lance-Williams updates are evaluated as SciPy evaluates them, without fused multiply-adds
// (which -march=native would otherwise contract them into), so float64 heights match bit for bit.
#pragma GCC optimize("fp-contract=off")

#include "cluster_rnn.h"  // after the pragma: its Lance-Williams steps must not be contracted either


namespace iics {
namespace {

// [begin, end) of part `part` of `parts` equal slices of [0, len).
inline void slice(int64_t len, int part, int parts, int64_t& begin, int64_t& end) {
  begin = len * part / parts;
  end = len * (part + 1) / parts;
}

// Lance-Williams updates, one line each: the distance from the union of clusters a (size sa) and
// b (size sb) to a third cluster, from its distances da to a and db to b. Evaluated in double
// exactly as SciPy writes them; the caller rounds to the storage type. Each maps (inf, inf) to
// inf, which keeps the +inf marks of dropped clusters intact (see NNChain).
struct SingleUpdate {
  static inline double apply(double da, double db, double, double) { return da < db ? da : db; }
};
struct CompleteUpdate {
  static inline double apply(double da, double db, double, double) { return da > db ? da : db; }
};
struct AverageUpdate {
  static inline double apply(double da, double db, double sa, double sb) {
    return (sa * da + sb * db) / (sa + sb);
  }
};
struct WeightedUpdate {
  static inline double apply(double da, double db, double, double) { return 0.5 * (da + db); }
};

// Below this much work (in contiguous-element units, a strided read counting kGather) a scan or
// an update runs on one thread: an OpenMP fork/join costs a few microseconds.
constexpr int64_t kGather = 8;
constexpr int64_t kParallelWork = 1 << 15;
// Contiguous scans go in blocks: a vectorised min per block, then one pass over the winning block.
constexpr int64_t kBlock = 256;
// Strided loops (one cache line per entry) request the line kAhead entries ahead, which keeps
// more misses in flight than the out-of-order window finds alone (about 20% of the merge's time
// at N = 16,000).
constexpr int64_t kAhead = 16;
template <typename T>
inline void prefetch_read(const T* p) { __builtin_prefetch(p, 0, 0); }
template <typename T>
inline void prefetch_write(T* p) { __builtin_prefetch(p, 1, 0); }

// First index of the minimum of p[0..len) if that minimum is < best (then best and at are
// updated); nothing otherwise. Ties keep the lowest index.
template <typename T>
inline void contiguous_argmin(const T* p, int64_t len, T& best, int64_t& at) {
  int64_t win = -1;
  T bv = best;
  for (int64_t s = 0; s < len; s += kBlock) {
    const int64_t e = std::min(len, s + kBlock);
    T mv = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : mv)
    for (int64_t q = s; q < e; ++q) mv = p[q] < mv ? p[q] : mv;
    if (mv < bv) {
      bv = mv;
      win = s;
    }
  }
  if (win < 0) return;
  int64_t q = win;
  while (p[q] != bv) ++q;
  best = bv;
  at = q;
}

// The nearest-neighbour chain (Murtagh 1983; Müllner 2011, arXiv:1109.2378), on the condensed
// triangle.
//
// Layout and bookkeeping, all O(n):
//  * slots 0..m-1 index the current triangle; a merge of slots i < j keeps the union in j and
//    drops i (SciPy's convention, so float64 runs make SciPy's exact choices, ties included);
//  * act_ lists the live slots in increasing order, base_[t] = offset of row act_[t] minus
//    act_[t] + 1, so the strided column entry D(act_[t], x), x > act_[t], is D[base_[t] + x];
//  * a dropped slot's column entries D(k, i), k < i live, are set to +inf, so the contiguous row
//    scans and the row updates run branch-free over dead entries (the Lance-Williams updates map
//    (inf, inf) to inf) while the strided column accesses visit live slots only;
//  * when half the slots are dead the triangle is compacted in place to the live slots
//    (order-preserving, so no tie-breaking changes), which bounds the dead fraction at one half
//    and costs O(n^2) in all (a geometric series);
//  * every live slot caches its nearest neighbour in two halves, the lower slots (its column,
//    strided: a cache line per entry) and the higher ones (its row, contiguous), each as the
//    least distance and the lowest slot at it. One streaming pass over the triangle fills them
//    all; a merge keeps them exact as it writes each updated entry (Half::enter), computes both
//    halves of the union from the entries it writes, and marks stale only a half whose cached
//    neighbour was one of the merged pair and could not be decided from the new entry. A scan
//    then reads only stale halves, so most strided column scans are never made. The cache is
//    exact, not a bound: the answers, ties included, are those of a full scan.
//
// Nearest neighbour of x: the previous chain element wins ties (which guarantees progress),
// otherwise the lowest slot among the nearest.
template <typename T, typename U>
class NNChain {
 public:
  NNChain(T* D, int64_t n, bool force_threads)
      : D_(D), n_(n), m_(n), forced_(force_threads), parallel_(force_threads) {
    act_.resize(n);
    base_.resize(n);
    size_.assign(n, 1.0);
    rep_.resize(n);
    std::iota(act_.begin(), act_.end(), 0);
    std::iota(rep_.begin(), rep_.end(), 0);
    rebase();
    chain_.reserve(n);
    fill_halves();
    threads_ = max_threads();
    if (threads_ > 1 && n * kGather >= kParallelWork) {
#pragma omp parallel num_threads(threads_)
      {  // start the thread team now, so the first timed operation does not pay for it
      }
    }
  }

  void run(int32_t* merge_a, int32_t* merge_b, double* merge_h) {
    for (int64_t r = 0; r < n_ - 1; ++r) {
      if (chain_.empty()) chain_.push_back(act_[0]);
      for (;;) {
        const int64_t x = chain_.back();
        const int64_t p = chain_.size() > 1 ? chain_[chain_.size() - 2] : -1;
        T d;
        const int64_t y = nearest(x, p, d);
        if (y == p) break;
        chain_.push_back(static_cast<int32_t>(y));
      }
      const int64_t x = chain_.back();
      const int64_t y = chain_[chain_.size() - 2];
      chain_.resize(chain_.size() - 2);
      const int64_t i = std::min(x, y), j = std::max(x, y);
      merge_a[r] = rep_[i];
      merge_b[r] = rep_[j];
      merge_h[r] = static_cast<double>(at(i, j));
      merge(i, j);
      if (threads_ > 1 && !forced_) steer(r);
      if (m_ >= 64 && 2 * static_cast<int64_t>(act_.size()) <= m_) compact();
    }
  }

 private:
  static constexpr T kInf = std::numeric_limits<T>::infinity();
  using Clock = std::chrono::steady_clock;
  static constexpr int32_t kNone = -1, kStale = -2;  // Half::at of an empty / a stale half

  // One half of a slot's cached nearest neighbour: the least distance d over the half's live
  // slots and the lowest slot `at` at it; at = kNone for an empty half. A stale half (at =
  // kStale) keeps in d a lower bound of its least distance.
  struct Half {
    T d;
    int32_t at;
    // After merge (i, j): the half's entry for slot j became v and i's entry, if it was in the
    // half, left; the other entries are unchanged, so they are still >= d. Hence j is the new
    // neighbour if v < d (or v == d and j was the neighbour or is below it), the cache is
    // unchanged if its neighbour is neither i nor j, and otherwise d stays a lower bound.
    void enter(T v, int32_t i, int32_t j) {
      if (v < d || (v == d && at != kStale && (at == j || j < at))) {
        d = v, at = j;
      } else if (at == i || at == j) {
        at = kStale;
      }
    }
  };

  // Threads pay only when the machine has idle cores: on a shared, oversubscribed machine a
  // fork/join waits for a descheduled thread and costs milliseconds instead of microseconds.
  // So the run steers itself: from time to time (steer) kSerial merges on one thread are timed
  // per unit of work; then every threaded operation is timed the same way (done), accumulated
  // over windows of kWindow operations. As soon as the current window is slower than one thread,
  // threads go off and the gap to the next probe doubles (up to kMaxGap merges); a probe whose
  // first window wins schedules the next one kMinGap merges on. So a busy machine pays for about
  // one slow operation a probe, also when it becomes busy while threads are on.
  static constexpr int64_t kSerial = 16, kWindow = 32, kMinGap = 512, kMaxGap = 16384;

  // Threads for a scan or update of `work` units (a strided read counts kGather).
  int team(int64_t work) {
    work_ += work;
    if (!parallel_ || (work < kParallelWork && !forced_)) return 1;
    if (!forced_) op_start_ = Clock::now();
    return threads_;
  }

  void done(int nt, int64_t work) {
    if (nt == 1 || forced_) return;
    win_time_ += std::chrono::duration<double>(Clock::now() - op_start_).count();
    win_work_ += work;
    if (win_time_ / static_cast<double>(win_work_) > serial_rate_) {
      parallel_ = false;
      gap_ = std::min(2 * gap_, kMaxGap);
      probe_at_ = merges_ + gap_;
    } else if (++win_ops_ >= kWindow) {
      if (first_window_) {
        gap_ = kMinGap;
        probe_at_ = merges_ + gap_;
        first_window_ = false;
      }
      win_time_ = 0.0, win_work_ = 0, win_ops_ = 0;
    }
  }

  // Called after merge r: starts a probe's serial timing, then its threaded part.
  void steer(int64_t r) {
    merges_ = r;
    if (r == probe_at_) {
      parallel_ = false;
      since_ = Clock::now();
      work_since_ = work_;
    } else if (r == probe_at_ + kSerial) {
      serial_rate_ = std::chrono::duration<double>(Clock::now() - since_).count() /
                     static_cast<double>(std::max<int64_t>(work_ - work_since_, 1));
      parallel_ = true;
      first_window_ = true;
      win_time_ = 0.0, win_work_ = 0, win_ops_ = 0;
      probe_at_ = r + kMaxGap;  // replaced when the first window ends
    }
  }

  // D(i, j) for slots i < j.
  T at(int64_t i, int64_t j) const { return D_[condensed_index(m_, i, j)]; }
  // Pointer r with r[k] = D(x, k) for k > x (row x, shifted so it is indexed by slot).
  T* row(int64_t x) const { return D_ + condensed_row(m_, x) - x - 1; }
  int64_t pos(int64_t x) const {
    return std::lower_bound(act_.begin(), act_.end(), static_cast<int32_t>(x)) - act_.begin();
  }
  void rebase() {
    for (size_t t = 0; t < act_.size(); ++t)
      base_[t] = condensed_row(m_, act_[t]) - act_[t] - 1;
  }

  // Nearest live slot to x and its distance d; p (or -1) is preferred on ties. Rescans a stale
  // half of x's cache only if its lower bound does not rule it out: the column half (lower
  // slots) wins ties, so the row half is skipped if the column's least distance is <= its bound,
  // the column half if the row's least distance is < its bound.
  int64_t nearest(int64_t x, int64_t p, T& d) {
    Half& c = col_[x];
    Half& r = row_[x];
    if (r.at == kStale && !(c.at != kStale && c.d <= r.d)) r = scan_row(x);
    if (c.at == kStale && !(r.at != kStale && r.d < c.d)) c = scan_column(x);
    T best;
    int64_t arg;
    if (c.at != kStale && (r.at == kStale || c.d <= r.d)) {
      best = c.d, arg = c.at;
    } else {
      best = r.d, arg = r.at;
    }
    if (p >= 0) {
      const T dp = x < p ? at(x, p) : at(p, x);
      if (dp <= best) {
        d = dp;
        return p;
      }
    }
    d = best;
    return arg;
  }

  // The column half of x: its entries against the live slots below it, one row each.
  Half scan_column(int64_t x) {
    const int64_t px = pos(x);
    const int64_t work = px * kGather;
    const int nt = team(work);
    T best = kInf;
    int64_t arg = kNone;
    if (nt == 1) {
      column_argmin(x, 0, px, best, arg);
    } else {
      // Per-thread results, combined in index order so ties resolve as in the serial scan.
      T tb[64];
      int64_t ta[64];
      int used = 1;
#pragma omp parallel num_threads(nt)
      {
        const int tid = thread_index(), nth = num_threads();
        if (tid == 0) used = nth;
        int64_t b, e;
        tb[tid] = kInf, ta[tid] = kNone;
        slice(px, tid, nth, b, e);
        column_argmin(x, b, e, tb[tid], ta[tid]);
      }
      for (int t = 0; t < used; ++t)
        if (tb[t] < best) best = tb[t], arg = ta[t];
    }
    done(nt, work);
    return {best, static_cast<int32_t>(arg)};
  }

  // The row half of x: its contiguous entries against the slots above it (dead ones are +inf).
  Half scan_row(int64_t x) {
    const T* rx = row(x);
    const int64_t len = m_ - x - 1;
    const int nt = team(len);
    T best = kInf;
    int64_t arg = kNone;
    if (nt == 1) {
      contiguous_argmin(rx + x + 1, len, best, arg, x + 1);
    } else {
      T tb[64];
      int64_t ta[64];
      int used = 1;
#pragma omp parallel num_threads(nt)
      {
        const int tid = thread_index(), nth = num_threads();
        if (tid == 0) used = nth;
        int64_t b, e;
        tb[tid] = kInf, ta[tid] = kNone;
        slice(len, tid, nth, b, e);
        contiguous_argmin(rx + x + 1 + b, e - b, tb[tid], ta[tid], x + 1 + b);
      }
      for (int t = 0; t < used; ++t)
        if (tb[t] < best) best = tb[t], arg = ta[t];
    }
    done(nt, len);
    return {best, static_cast<int32_t>(arg)};
  }

  // Both halves of every slot's cache, in one pass over the triangle: row x's entries are its
  // row half and, in turn, the entries of the column halves of the slots after it.
  void fill_halves() {
    col_.assign(m_, Half{kInf, kNone});
    row_.assign(m_, Half{kInf, kNone});
    for (int64_t x = 0; x + 1 < m_; ++x) {
      const T* rx = row(x);
      T best = kInf;
      int64_t arg = kNone;
      contiguous_argmin(rx + x + 1, m_ - x - 1, best, arg, x + 1);
      row_[x] = {best, static_cast<int32_t>(arg)};
      Half* col = col_.data();
      const int32_t x32 = static_cast<int32_t>(x);
#pragma omp simd
      for (int64_t k = x + 1; k < m_; ++k) {
        const T v = rx[k];
        if (v < col[k].d) col[k] = {v, x32};  // strict: the lowest slot keeps a tie
      }
    }
  }

  // Strided part: live slots act_[b..e) (all < x).
  void column_argmin(int64_t x, int64_t b, int64_t e, T& best, int64_t& arg) const {
    for (int64_t t = b; t < e; ++t) {
      if (t + kAhead < e) prefetch_read(D_ + base_[t + kAhead] + x);
      const T v = D_[base_[t] + x];
      if (v < best) best = v, arg = act_[t];
    }
  }
  static void contiguous_argmin(const T* p, int64_t len, T& best, int64_t& arg, int64_t first) {
    int64_t q = -1;
    iics::contiguous_argmin(p, len, best, q);
    if (q >= 0) arg = first + q;
  }

  // Merges slots i < j into j; i is dropped (its column set to +inf, its slot unlisted). Every
  // written entry refreshes the cache half it belongs to; j's halves are the minima of its new
  // column and row.
  void merge(int64_t i, int64_t j) {
    const int64_t pi = pos(i), pj = pos(j);
    const double si = size_[i], sj = size_[j];
    const int32_t i32 = static_cast<int32_t>(i), j32 = static_cast<int32_t>(j);
    T* ri = row(i);
    T* rj = row(j);
    T* D = D_;
    const int64_t* base = base_.data();
    const int32_t* act = act_.data();
    Half* col = col_.data();
    Half* rowh = row_.data();
    const int64_t tail = m_ - j - 1;
    const int64_t work = (pj - 1) * kGather + tail;
    const int nt = team(work);
    // Per-thread minima of j's new column over k < i and over i < k < j: static schedules hand
    // out contiguous chunks in thread order, so combining them in that order keeps the lowest
    // slot on ties.
    T lo_d[64], mid_d[64];
    int32_t lo_at[64], mid_at[64];
    int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      const int tid = thread_index();
      if (tid == 0) used = num_threads();
      T best = kInf;
      int32_t arg = kNone;
      // k < i: D(k, j) <- U(D(k, i), D(k, j)); D(k, i) <- inf. Both strided, same row k.
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < pi; ++t) {
        if (t + kAhead < pi) {
          prefetch_write(D + base[t + kAhead] + i);
          prefetch_write(D + base[t + kAhead] + j);
        }
        T* rk = D + base[t];
        const T v = static_cast<T>(U::apply(rk[i], rk[j], si, sj));
        rk[j] = v;
        rk[i] = kInf;
        rowh[act[t]].enter(v, i32, j32);
        if (v < best) best = v, arg = act[t];
      }
      lo_d[tid] = best, lo_at[tid] = arg;
      best = kInf, arg = kNone;
      // i < k < j: D(k, j) <- U(D(i, k), D(k, j)). Row i contiguous-ish, column j strided.
#pragma omp for schedule(static) nowait
      for (int64_t t = pi + 1; t < pj; ++t) {
        if (t + kAhead < pj) prefetch_write(D + base[t + kAhead] + j);
        const int32_t k = act[t];
        T* rk = D + base[t];
        const T v = static_cast<T>(U::apply(ri[k], rk[j], si, sj));
        rk[j] = v;
        if (col[k].at == i32) col[k].at = kStale;
        rowh[k].enter(v, i32, j32);
        if (v < best) best = v, arg = k;
      }
      mid_d[tid] = best, mid_at[tid] = arg;
      // k > j: D(j, k) <- U(D(i, k), D(j, k)). Both rows contiguous; dead k stay +inf.
#pragma omp for simd schedule(static) nowait
      for (int64_t k = j + 1; k < m_; ++k) {
        const T v = static_cast<T>(U::apply(ri[k], rj[k], si, sj));
        rj[k] = v;
        col[k].enter(v, i32, j32);
      }
    }
    done(nt, work);
    Half cj{kInf, kNone};
    for (int t = 0; t < used; ++t)
      if (lo_d[t] < cj.d) cj = {lo_d[t], lo_at[t]};
    for (int t = 0; t < used; ++t)
      if (mid_d[t] < cj.d) cj = {mid_d[t], mid_at[t]};
    col[j] = cj;
    T rbest = kInf;
    int64_t rarg = kNone;
    contiguous_argmin(rj + j + 1, tail, rbest, rarg, j + 1);
    rowh[j] = {rbest, static_cast<int32_t>(rarg)};
    size_[j] = si + sj;
    act_.erase(act_.begin() + pi);
    base_.erase(base_.begin() + pi);
  }

  // Rewrites the triangle over the live slots only, in place, renumbering slots by rank.
  // Safe front to back: pair (t, u) of the new triangle is written at an offset no larger than
  // the old offset of its pair, and pairs keep their lexicographic order.
  void compact() {
    const int64_t a = static_cast<int64_t>(act_.size());
    int64_t dst = 0;
    for (int64_t t = 0; t < a; ++t) {
      const T* rx = row(act_[t]);
      for (int64_t u = t + 1; u < a; ++u) D_[dst++] = rx[act_[u]];
    }
    for (auto& c : chain_) c = static_cast<int32_t>(pos(c));
    const auto renumber = [this](Half h) {
      if (h.at >= 0) h.at = static_cast<int32_t>(pos(h.at));
      return h;
    };
    for (int64_t t = 0; t < a; ++t) {  // act_[t] >= t: the entries read are not yet rewritten
      col_[t] = renumber(col_[act_[t]]);
      row_[t] = renumber(row_[act_[t]]);
    }
    for (int64_t t = 0; t < a; ++t) {
      size_[t] = size_[act_[t]];
      rep_[t] = rep_[act_[t]];
      act_[t] = static_cast<int32_t>(t);
    }
    m_ = a;
    rebase();
  }

  T* D_;
  int64_t n_, m_;
  std::vector<int32_t> act_;
  std::vector<int64_t> base_;
  std::vector<double> size_;
  std::vector<int32_t> rep_;
  std::vector<int32_t> chain_;
  std::vector<Half> col_, row_;  // cached nearest neighbours: lower slots, higher slots
  int threads_ = 1;
  bool forced_, parallel_, first_window_ = false;
  int64_t work_ = 0, work_since_ = 0, merges_ = 0;
  int64_t probe_at_ = 0, gap_ = kMinGap / 2, win_work_ = 0, win_ops_ = 0;
  double serial_rate_ = 0.0, win_time_ = 0.0;
  Clock::time_point since_, op_start_;
};

template <typename T, typename U>
void run_chain(T* D, int64_t n, bool force_threads, int32_t* a, int32_t* b, double* h) {
  NNChain<T, U>(D, n, force_threads).run(a, b, h);
}

// Union-find over 0..size-1 with path halving.
struct UnionFind {
  std::vector<int64_t> parent;
  explicit UnionFind(int64_t size) : parent(size) { std::iota(parent.begin(), parent.end(), 0); }
  int64_t find(int64_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  }
};

// Order-preserving bijection between floats and unsigned integers of the same width.
template <typename T>
struct FloatKey {
  using K = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static constexpr int kBits = 8 * sizeof(T);
  static constexpr K kSign = K(1) << (kBits - 1);
  static K of(T v) {
    K k;
    std::memcpy(&k, &v, sizeof k);
    return (k & kSign) ? ~k : (k | kSign);
  }
  static T value(K k) {
    k = (k & kSign) ? (k & ~kSign) : ~k;
    T v;
    std::memcpy(&v, &k, sizeof v);
    return v;
  }
};

}  // namespace

template <typename T>
void nn_chain_linkage(T* D, int64_t n, LinkageMethod method, int32_t* merge_a, int32_t* merge_b,
                      double* merge_h, bool force_threads) {
  if (n < 2) return;
  switch (method) {
    case LinkageMethod::Single: return run_chain<T, SingleUpdate>(D, n, force_threads, merge_a, merge_b, merge_h);
    case LinkageMethod::Complete:
      return run_chain<T, CompleteUpdate>(D, n, force_threads, merge_a, merge_b, merge_h);
    case LinkageMethod::Average:
      return run_chain<T, AverageUpdate>(D, n, force_threads, merge_a, merge_b, merge_h);
    case LinkageMethod::Weighted:
      return run_chain<T, WeightedUpdate>(D, n, force_threads, merge_a, merge_b, merge_h);
  }
}

namespace {

// The host loops of the RNN passes around the shared per-item work (cluster_rnn.h).
template <typename T>
class RnnHost {
 public:
  RnnHost(T* D, int64_t n, int method)
      : n_(n), roff_(n), act_(n), nn_(n), partner_(n, -1), pi_(n / 2 + 1), pj_(n / 2 + 1),
        dnn_(n), stale_(n, 0), size_(n, 1.0) {
    for (int64_t k = 0; k < n; ++k) roff_[k] = condensed_row(n, k) - k - 1;
    std::iota(act_.begin(), act_.end(), 0);
    rows_.assign(act_.begin(), act_.end());
    s_ = {D, roff_.data(), act_.data(), nn_.data(), dnn_.data(), partner_.data(),
          stale_.data(), size_.data(), pi_.data(), pj_.data(), method};
  }

  void run(int32_t* merge_a, int32_t* merge_b, double* merge_h, int32_t* merge_pass,
           std::vector<RnnPass>* passes) {
    int64_t m = n_, done = 0;
    for (int32_t pass = 0; m > 1; ++pass) {
      RnnPass stats{m, 0, static_cast<int64_t>(rows_.size()), 0, 0};
      // 1. rescans
      const int64_t r = static_cast<int64_t>(rows_.size());
#pragma omp parallel for schedule(dynamic, 1) if (r * m >= kParallelWork)
      for (int64_t u = 0; u < r; ++u) {
        const int32_t x = rows_[u];
        T best = std::numeric_limits<T>::infinity();
        int32_t arg = std::numeric_limits<int32_t>::max();
        rnn::scan_row(s_, x, static_cast<int32_t>(m), 0, 1, best, arg);
        nn_[x] = arg;
        dnn_[x] = best;
      }
      // 2. reciprocal pairs, in increasing order of the dropped slot
      int32_t p = 0;
      for (int64_t t = 0; t < m; ++t) {
        int32_t x, y;
        if (!rnn::pair_at(s_, static_cast<int32_t>(t), x, y)) continue;
        pi_[p] = x, pj_[p] = y, ++p;
        partner_[x] = y, partner_[y] = x;
        merge_a[done] = x, merge_b[done] = y, merge_h[done] = static_cast<double>(dnn_[x]);
        merge_pass[done++] = pass;
      }
      if (passes) {
        for (const int32_t x : rows_) count(x, m, 1, stats);
        for (int32_t q = 0; q < p; ++q) count(pi_[q], m, 1, stats), count(pj_[q], m, 2, stats);
        stats.merges = p;
        passes->push_back(stats);
      }
      // 3. Lance-Williams updates
#pragma omp parallel for schedule(static) if (m * p >= kParallelWork)
      for (int64_t t = 0; t < m; ++t) {
        const int32_t k = act_[t];
        T best = dnn_[k], v;
        int32_t arg = nn_[k];
        for (int32_t q = 0; q < p; ++q)
          if (rnn::update_item(s_, q, static_cast<int32_t>(t), v) && rnn::better(v, pj_[q], best, arg))
            best = v, arg = pj_[q];
        if (partner_[k] < 0 && rnn::lost(s_, k)) stale_[k] = 1;
        nn_[k] = arg, dnn_[k] = best;
      }
      // 4. sizes, live list (dropped slots out), rescans of the next pass
      for (int32_t q = 0; q < p; ++q) size_[pj_[q]] += size_[pi_[q]];
      rows_.clear();
      int64_t live = 0;
      for (int64_t t = 0; t < m; ++t) {
        const int32_t k = act_[t], mate = partner_[k];
        if (mate > k) continue;  // dropped
        act_[live++] = k;
        if (stale_[k] || mate >= 0) rows_.push_back(k);
        stale_[k] = 0;
      }
      for (int32_t q = 0; q < p; ++q) partner_[pi_[q]] = partner_[pj_[q]] = -1;
      m = live;
    }
  }

 private:
  // Adds `times` device accesses of the row/column of live slot x (m live) to `stats`: the
  // entries against lower slots lie in other rows, the rest along x's row.
  void count(int32_t x, int64_t m, int64_t times, RnnPass& stats) const {
    const int64_t below = std::lower_bound(act_.begin(), act_.begin() + m, x) - act_.begin();
    stats.strided += times * below;
    stats.contiguous += times * (m - 1 - below);
  }

  int64_t n_;
  std::vector<int64_t> roff_;
  std::vector<int32_t> act_, nn_, partner_, pi_, pj_, rows_;
  std::vector<T> dnn_;
  std::vector<uint8_t> stale_;
  std::vector<double> size_;
  rnn::State<T> s_;
};

}  // namespace

template <typename T>
void rnn_linkage(T* D, int64_t n, LinkageMethod method, int32_t* merge_a, int32_t* merge_b,
                 double* merge_h, int32_t* merge_pass, std::vector<RnnPass>* passes) {
  if (n < 2) return;
  RnnHost<T>(D, n, static_cast<int>(method)).run(merge_a, merge_b, merge_h, merge_pass, passes);
}

void rnn_merges_to_linkage(int64_t n, const int32_t* merge_a, const int32_t* merge_b,
                           const double* merge_h, const int32_t* merge_pass, double* Z) {
  if (n < 2) return;
  std::vector<int64_t> order(n - 1);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t u, int64_t v) {
    return merge_pass[u] != merge_pass[v] ? merge_pass[u] < merge_pass[v] : merge_a[u] < merge_a[v];
  });
  std::vector<int32_t> a(n - 1), b(n - 1);
  std::vector<double> h(n - 1);
  for (int64_t r = 0; r < n - 1; ++r) a[r] = merge_a[order[r]], b[r] = merge_b[order[r]], h[r] = merge_h[order[r]];
  merges_to_linkage(n, a.data(), b.data(), h.data(), Z);
}

// SciPy's order and naming (scipy.cluster.hierarchy: stable sort by height, then union-find
// labelling): the merges of one height keep the order they were found in, which already puts
// every merge after the merges that built its two clusters.
void merges_to_linkage(int64_t n, const int32_t* merge_a, const int32_t* merge_b,
                       const double* merge_h, double* Z) {
  if (n < 2) return;
  std::vector<int64_t> order(n - 1);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t u, int64_t v) { return merge_h[u] < merge_h[v]; });
  UnionFind uf(2 * n - 1);
  std::vector<double> size(2 * n - 1, 1.0);
  for (int64_t r = 0; r < n - 1; ++r) {
    const int64_t s = order[r];
    int64_t x = uf.find(merge_a[s]), y = uf.find(merge_b[s]);
    if (x > y) std::swap(x, y);
    const int64_t c = n + r;
    uf.parent[x] = uf.parent[y] = c;
    size[c] = size[x] + size[y];
    double* z = Z + 4 * r;
    z[0] = static_cast<double>(x);
    z[1] = static_cast<double>(y);
    z[2] = merge_h[s];
    z[3] = size[c];
  }
}

void cut_linkage(int64_t n, const double* Z, int64_t n_merges, int64_t* labels) {
  // A point of every cluster id, then union-find over the points.
  std::vector<int64_t> point(n + std::max<int64_t>(n_merges, 0));
  std::iota(point.begin(), point.begin() + n, 0);
  UnionFind uf(n);
  for (int64_t r = 0; r < n_merges; ++r) {
    const int64_t a = point[static_cast<int64_t>(Z[4 * r])];
    const int64_t b = point[static_cast<int64_t>(Z[4 * r + 1])];
    point[n + r] = a;
    uf.parent[uf.find(b)] = uf.find(a);
  }
  std::vector<int64_t> label_of_root(n, -1);
  int64_t next = 0;
  for (int64_t x = 0; x < n; ++x) {
    const int64_t r = uf.find(x);
    if (label_of_root[r] < 0) label_of_root[r] = next++;
    labels[x] = label_of_root[r];
  }
}

template <typename T>
int64_t first_nonfinite(const T* x, int64_t m) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  int64_t first = -1;
#pragma omp parallel for schedule(static) if (m > kParallelPass)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kChunk, e = std::min(m, b + kChunk);
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t q = b; q < e; ++q) bad |= !std::isfinite(x[q]);
    if (bad) {
      int64_t q = b;
      while (std::isfinite(x[q])) ++q;
#pragma omp critical(iics_first_nonfinite)
      if (first < 0 || q < first) first = q;
    }
  }
  return first;
}

template <typename T>
int64_t first_nonfinite_upper(const T* x, int64_t n) {
  int64_t first = -1;
#pragma omp parallel for schedule(dynamic, 64) if (n * n > 2 * kParallelPass)
  for (int64_t i = 0; i < n - 1; ++i) {
    const int64_t q = first_nonfinite(x + n * i + i + 1, n - i - 1);
    if (q >= 0) {
      const int64_t off = condensed_index(n, i, i + 1 + q);
#pragma omp critical(iics_first_nonfinite_upper)
      if (first < 0 || off < first) first = off;
    }
  }
  return first;
}

template <typename T>
T select_rank(const T* x, int64_t m, int64_t rank) {
  using FK = FloatKey<T>;
  using K = typename FK::K;
  constexpr int kDigit = 16;
  constexpr int64_t kBins = int64_t(1) << kDigit;
  const int nt = m > kParallelPass ? max_threads() : 1;
  std::vector<int64_t> hist(static_cast<size_t>(nt) * kBins);
  K prefix = 0;  // the key bits above `shift` already fixed
  for (int shift = FK::kBits - kDigit; shift >= 0; shift -= kDigit) {
    std::fill(hist.begin(), hist.end(), 0);
    const bool first_pass = shift + kDigit >= FK::kBits;
#pragma omp parallel num_threads(nt)
    {
      int64_t* h = hist.data() + static_cast<int64_t>(thread_index()) * kBins;
#pragma omp for schedule(static)
      for (int64_t q = 0; q < m; ++q) {
        const K k = FK::of(x[q]);
        if (first_pass || (k >> (shift + kDigit)) == prefix) ++h[(k >> shift) & (kBins - 1)];
      }
    }
    for (int t = 1; t < nt; ++t)
      for (int64_t b = 0; b < kBins; ++b) hist[b] += hist[t * kBins + b];
    int64_t b = 0;
    while (rank >= hist[b]) rank -= hist[b++];
    prefix = (prefix << kDigit) | static_cast<K>(b);
  }
  return FK::value(prefix);
}

template void nn_chain_linkage<float>(float*, int64_t, LinkageMethod, int32_t*, int32_t*,
                                      double*, bool);
template void nn_chain_linkage<double>(double*, int64_t, LinkageMethod, int32_t*, int32_t*,
                                       double*, bool);
template void rnn_linkage<float>(float*, int64_t, LinkageMethod, int32_t*, int32_t*, double*,
                                 int32_t*, std::vector<RnnPass>*);
template void rnn_linkage<double>(double*, int64_t, LinkageMethod, int32_t*, int32_t*, double*,
                                  int32_t*, std::vector<RnnPass>*);
template int64_t first_nonfinite<float>(const float*, int64_t);
template int64_t first_nonfinite<double>(const double*, int64_t);
template int64_t first_nonfinite_upper<float>(const float*, int64_t);
template int64_t first_nonfinite_upper<double>(const double*, int64_t);
template float select_rank<float>(const float*, int64_t, int64_t);
template double select_rank<double>(const double*, int64_t, int64_t);

}  // namespace iics
