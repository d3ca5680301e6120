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
// Threads a scan or update uses at most (their partial results live in fixed arrays).
constexpr int kMaxTeam = 64;
// Strided loops (one cache line per entry) request the line kAhead entries ahead, which keeps
// more misses in flight than the out-of-order window finds alone (about 20% of the merge's time
// at N = 16,000).
constexpr int64_t kAhead = 16;
template <typename T>
inline void prefetch_read(const T* p) { __builtin_prefetch(p, 0, 0); }
template <typename T>
inline void prefetch_write(T* p) { __builtin_prefetch(p, 1, 0); }

// (d, a) before (e, b) in the order nearest neighbours are chosen in: least distance, then lowest
// slot.
template <typename T>
inline bool lex_less(T d, int32_t a, T e, int32_t b) {
  return d < e || (d == e && a < b);
}

// How many nearest neighbours each half of a slot keeps (NNChain): enough that a half seldom
// runs out between scans, few enough that keeping them stays cheap.
constexpr int kKeep = 8;

// Inserts (v, a) into the n <= kKeep pairs d/at, kept in lexicographic order and at most kKeep
// of them (a full list drops its last, or refuses a pair not below it); returns the new count.
template <typename T>
inline int insert_least(T* d, int32_t* at, int n, T v, int32_t a) {
  int q = n;
  if (n == kKeep) {
    if (!lex_less(v, a, d[kKeep - 1], at[kKeep - 1])) return n;
    q = kKeep - 1;
  } else {
    ++n;
  }
  for (; q > 0 && lex_less(v, a, d[q - 1], at[q - 1]); --q) d[q] = d[q - 1], at[q] = at[q - 1];
  d[q] = v, at[q] = a;
  return n;
}

// The kKeep lexicographically least (distance, slot) pairs offered so far, in order.
template <typename T>
struct Least {
  T d[kKeep];
  int32_t at[kKeep];
  int n = 0;
  // What an entry must beat to be kept when entries come in increasing slot order (an equal
  // distance from a higher slot loses).
  T bar() const { return n < kKeep ? std::numeric_limits<T>::infinity() : d[kKeep - 1]; }
  void offer(T v, int32_t a) { n = insert_least(d, at, n, v, a); }
  void offer(const Least& o) {
    for (int q = 0; q < o.n; ++q) offer(o.d[q], o.at[q]);
  }
};

// Offers p[q] as slot first + q, q = 0..len-1, in order, to `acc`; +inf entries (dead slots) are
// never kept. A block whose vectorised minimum cannot be kept is skipped.
template <typename T>
inline void contiguous_least(const T* p, int64_t len, int64_t first, Least<T>& acc) {
  constexpr int64_t kStep = 64;
  T bar = acc.bar();
  for (int64_t s = 0; s < len; s += kStep) {
    const int64_t e = std::min(len, s + kStep);
    T mv = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : mv)
    for (int64_t q = s; q < e; ++q) mv = p[q] < mv ? p[q] : mv;
    if (!(mv < bar)) continue;
    for (int64_t q = s; q < e; ++q) {
      if (p[q] < bar) {
        acc.offer(p[q], static_cast<int32_t>(first + q));
        bar = acc.bar();
      }
    }
  }
}

// The cached nearest neighbours of one half, the lower or the higher slots, of every slot s:
// its live entries lexicographically <= a threshold (tau_d[s], tau_at[s]), at most kKeep of
// them, in order (d, at). With entries listed, the first is the half's nearest; with none and
// tau_d = +inf the half is empty; with none and a finite tau the half is stale, and its entries
// are all above tau (so tau_d bounds its least distance from below). Every change of an entry
// keeps this exact, from the entry's old and new values alone.
template <typename T>
struct Halves {
  static constexpr T kInf = std::numeric_limits<T>::infinity();
  static constexpr int32_t kTop = std::numeric_limits<int32_t>::max();
  std::vector<T> tau_d, d;
  std::vector<int32_t> tau_at, at;
  std::vector<uint8_t> cnt;

  void reset(int64_t m) {
    tau_d.assign(m, kInf), tau_at.assign(m, kTop), cnt.assign(m, 0);
    d.resize(m * kKeep), at.resize(m * kKeep);
  }
  bool known(int64_t s) const { return cnt[s] > 0 || tau_d[s] == kInf; }
  T least(int64_t s) const { return cnt[s] ? d[s * kKeep] : kInf; }
  int32_t least_at(int64_t s) const { return cnt[s] ? at[s * kKeep] : -1; }
  // After a full scan of the half.
  void set(int64_t s, const Least<T>& acc) {
    cnt[s] = static_cast<uint8_t>(acc.n);
    for (int q = 0; q < acc.n; ++q) d[s * kKeep + q] = acc.d[q], at[s * kKeep + q] = acc.at[q];
    if (acc.n == kKeep) {
      tau_d[s] = acc.d[kKeep - 1], tau_at[s] = acc.at[kKeep - 1];
    } else {
      tau_d[s] = kInf, tau_at[s] = kTop;
    }
  }
  // Entry (v, a) is listed (or would be).
  bool within(int64_t s, T v, int32_t a) const {
    return v < tau_d[s] || (v == tau_d[s] && a <= tau_at[s]);
  }
  // Slot a, whose entry was v, left the half.
  void drop(int64_t s, int32_t a, T v) {
    if (!within(s, v, a)) return;
    T* ds = &d[s * kKeep];
    int32_t* as = &at[s * kKeep];
    const int c = cnt[s];
    int q = 0;
    while (q < c && as[q] != a) ++q;
    if (q == c) return;
    for (; q + 1 < c; ++q) ds[q] = ds[q + 1], as[q] = as[q + 1];
    cnt[s] = static_cast<uint8_t>(c - 1);
  }
  // Slot a's entry changed from old to v.
  void change(int64_t s, int32_t a, T old, T v) {
    drop(s, a, old);
    if (!within(s, v, a)) return;
    T* ds = &d[s * kKeep];
    int32_t* as = &at[s * kKeep];
    const int c = cnt[s];
    cnt[s] = static_cast<uint8_t>(insert_least(ds, as, c, v, a));
    // full before: one of the kKeep + 1 dropped out, and tau comes down to the last kept
    if (c == kKeep) tau_d[s] = ds[kKeep - 1], tau_at[s] = as[kKeep - 1];
  }
  // Slot s's cache moved to slot t <= s, slots renumbered by `rank` (live slots) and `below`
  // (any slot a: the new number of the last live slot <= a, or -1).
  template <typename Rank, typename Below>
  void move(int64_t t, int64_t s, Rank rank, Below below) {
    cnt[t] = cnt[s];
    for (int q = 0; q < cnt[s]; ++q) d[t * kKeep + q] = d[s * kKeep + q], at[t * kKeep + q] = rank(at[s * kKeep + q]);
    tau_d[t] = tau_d[s];
    tau_at[t] = tau_at[s] == kTop ? kTop : below(tau_at[s]);
  }
};

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
//  * every live slot caches its nearest neighbours in two halves, the lower slots (its column,
//    strided: a cache line per entry) and the higher ones (its row, contiguous): the kKeep
//    nearest of each half (Halves). One streaming pass over the triangle fills them all; a merge
//    keeps them exact as it writes each updated entry, from the entry's old and new values
//    (after a vectorised test that the entry can matter at all), and computes both halves of the
//    union from the entries it writes. A half is rescanned only when merges have taken all its
//    listed neighbours, and not even then when its lower bound rules it out, so most strided
//    column scans are never made. The cache is exact, not a heuristic: the answers, ties
//    included, are those of a full scan.
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
    threads_ = std::min(max_threads(), kMaxTeam);
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
    if (!row_.known(x) && !(col_.known(x) && col_.least(x) <= row_.tau_d[x])) scan_row(x);
    if (!col_.known(x) && !(row_.known(x) && row_.least(x) < col_.tau_d[x])) scan_column(x);
    T best;
    int64_t arg;
    if (col_.known(x) && (!row_.known(x) || col_.least(x) <= row_.least(x))) {
      best = col_.least(x), arg = col_.least_at(x);
    } else {
      best = row_.least(x), arg = row_.least_at(x);
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
  void scan_column(int64_t x) {
    const int64_t px = pos(x);
    const int64_t work = px * kGather;
    const int nt = team(work);
    Least<T> acc;
    least_on_team(nt, px, acc, [&](int64_t b, int64_t e, Least<T>& a) { column_least(x, b, e, a); });
    done(nt, work);
    col_.set(x, acc);
  }

  // The row half of x: its contiguous entries against the slots above it (dead ones are +inf).
  void scan_row(int64_t x) {
    const T* rx = row(x) + x + 1;
    const int64_t len = m_ - x - 1;
    const int nt = team(len);
    Least<T> acc;
    least_on_team(nt, len, acc, [&](int64_t b, int64_t e, Least<T>& a) {
      contiguous_least(rx + b, e - b, x + 1 + b, a);
    });
    done(nt, len);
    row_.set(x, acc);
  }

  // Runs scan(b, e, least) over [0, len) on nt threads, a slice each with its own Least, and
  // offers their results to acc (the order of offers does not matter).
  template <typename Scan>
  static void least_on_team(int nt, int64_t len, Least<T>& acc, Scan scan) {
    if (nt == 1) {
      scan(0, len, acc);
      return;
    }
    Least<T> part[kMaxTeam];
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_index(), nth = num_threads();
      if (tid == 0) used = nth;
      int64_t b, e;
      slice(len, tid, nth, b, e);
      scan(b, e, part[tid]);
    }
    for (int t = 0; t < used; ++t) acc.offer(part[t]);
  }

  // Both halves of every slot's cache, in one pass over the triangle: row x's entries are its
  // row half and, in turn, entries of the column halves of the slots after it (x is above every
  // slot those list, so an entry enters only below tau's distance).
  void fill_halves() {
    col_.reset(m_);
    row_.reset(m_);
    constexpr int64_t kStep = 64;
    for (int64_t x = 0; x + 1 < m_; ++x) {
      const T* rx = row(x);
      Least<T> acc;
      contiguous_least(rx + x + 1, m_ - x - 1, x + 1, acc);
      row_.set(x, acc);
      const T* tau = col_.tau_d.data();
      for (int64_t s = x + 1; s < m_; s += kStep) {
        const int64_t e = std::min(m_, s + kStep);
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t k = s; k < e; ++k) hit |= rx[k] < tau[k];
        if (!hit) continue;
        for (int64_t k = s; k < e; ++k)
          if (rx[k] < tau[k]) col_.change(k, static_cast<int32_t>(x), kInf, rx[k]);
      }
    }
  }

  // Strided part: live slots act_[b..e) (all < x), in increasing order.
  void column_least(int64_t x, int64_t b, int64_t e, Least<T>& acc) const {
    T bar = acc.bar();
    for (int64_t t = b; t < e; ++t) {
      if (t + kAhead < e) prefetch_read(D_ + base_[t + kAhead] + x);
      const T v = D_[base_[t] + x];
      if (v < bar) {
        acc.offer(v, act_[t]);
        bar = acc.bar();
      }
    }
  }

  // Merges slots i < j into j; i is dropped (its column set to +inf, its slot unlisted). Every
  // written entry updates the cache half it belongs to, after a test that it can matter (one of
  // its old or new values within the half's tau); j's halves are the least of its new column
  // and row.
  void merge(int64_t i, int64_t j) {
    const int64_t pi = pos(i), pj = pos(j);
    const double si = size_[i], sj = size_[j];
    const int32_t i32 = static_cast<int32_t>(i), j32 = static_cast<int32_t>(j);
    T* ri = row(i);
    T* rj = row(j);
    T* D = D_;
    const int64_t* base = base_.data();
    const int32_t* act = act_.data();
    const T* col_tau = col_.tau_d.data();
    const T* row_tau = row_.tau_d.data();
    const int64_t tail = m_ - j - 1;
    const int64_t work = (pj - 1) * kGather + tail;
    const int nt = team(work);
    Least<T> part[kMaxTeam];  // per thread: the least of j's new column
    int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      const int tid = thread_index();
      if (tid == 0) used = num_threads();
      Least<T>& acc = part[tid];
      // k < i: D(k, j) <- U(D(k, i), D(k, j)); D(k, i) <- inf. Both strided, same row k.
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < pi; ++t) {
        if (t + kAhead < pi) {
          prefetch_write(D + base[t + kAhead] + i);
          prefetch_write(D + base[t + kAhead] + j);
        }
        const int32_t k = act[t];
        T* rk = D + base[t];
        const T da = rk[i], db = rk[j];
        const T v = static_cast<T>(U::apply(da, db, si, sj));
        rk[j] = v;
        rk[i] = kInf;
        if (std::min(std::min(da, db), v) <= row_tau[k]) {
          row_.drop(k, i32, da);
          row_.change(k, j32, db, v);
        }
        if (v <= acc.bar()) acc.offer(v, k);
      }
      // i < k < j: D(k, j) <- U(D(i, k), D(k, j)). Row i contiguous-ish, column j strided.
#pragma omp for schedule(static) nowait
      for (int64_t t = pi + 1; t < pj; ++t) {
        if (t + kAhead < pj) prefetch_write(D + base[t + kAhead] + j);
        const int32_t k = act[t];
        T* rk = D + base[t];
        const T da = ri[k], db = rk[j];
        const T v = static_cast<T>(U::apply(da, db, si, sj));
        rk[j] = v;
        if (da <= col_tau[k]) col_.drop(k, i32, da);
        if (std::min(db, v) <= row_tau[k]) row_.change(k, j32, db, v);
        if (v <= acc.bar()) acc.offer(v, k);
      }
      // k > j: D(j, k) <- U(D(i, k), D(j, k)). Both rows contiguous; dead k stay +inf. In blocks:
      // the new entries and the test are vectorised, the rare cache changes follow.
      constexpr int64_t kStep = 16;
#pragma omp for schedule(static) nowait
      for (int64_t b = j + 1; b < m_; b += kStep) {
        const int64_t e = std::min(m_, b + kStep);
        T vb[kStep];
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t k = b; k < e; ++k) {
          const T da = ri[k], db = rj[k];
          const T v = static_cast<T>(U::apply(da, db, si, sj));
          vb[k - b] = v;
          hit |= std::min(std::min(da, db), v) <= col_tau[k];
        }
        if (hit) {
          for (int64_t k = b; k < e; ++k) {
            const T da = ri[k], db = rj[k], v = vb[k - b];
            if (da < kInf && std::min(std::min(da, db), v) <= col_tau[k]) {  // live k only
              col_.drop(k, i32, da);
              col_.change(k, j32, db, v);
            }
          }
        }
#pragma omp simd
        for (int64_t k = b; k < e; ++k) rj[k] = vb[k - b];
      }
    }
    done(nt, work);
    Least<T> cj;
    for (int t = 0; t < used; ++t) cj.offer(part[t]);
    col_.set(j, cj);
    Least<T> rl;
    contiguous_least(rj + j + 1, tail, j + 1, rl);
    row_.set(j, rl);
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
    const auto rank = [this](int32_t x) { return static_cast<int32_t>(pos(x)); };
    const auto below = [this](int32_t x) {
      return static_cast<int32_t>(std::upper_bound(act_.begin(), act_.end(), x) - act_.begin() - 1);
    };
    for (int64_t t = 0; t < a; ++t) {  // act_[t] >= t: the caches read are not yet rewritten
      col_.move(t, act_[t], rank, below);
      row_.move(t, act_[t], rank, below);
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
  Halves<T> col_, row_;  // cached nearest neighbours: lower slots, higher slots
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
