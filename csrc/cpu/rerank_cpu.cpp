// Sparse k-reciprocal re-ranking: Zhong et al., "Re-ranking Person Re-identification with
// k-reciprocal Encoding" (CVPR 2017), with the details of the IICS reference code: row-wise
// min-max normalisation, V and the Jaccard sums in float16, negative distances clamped to 0.
//   1-2. each row's min / max and its k1 + 1 nearest (bounded heaps behind a raw-value
//      prefilter). A square row is read from memory once: its min / max sweep brings it into
//      cache, where the prefilter sweep finds it. A condensed matrix takes one sequential
//      sweep for the min / max (per-thread partials for the columns); a condensed row gets the
//      entries left of its diagonal from a column-striped sweep and the rest from a row sweep,
//      two sorted lists merged;
//   3. V (k-reciprocal sets with the 2/3 expansion rule) and its query expansion, CSR rows;
//   4. an inverted index (CSC of V) and, row by row, the sparse Jaccard row and the dense output
//      row written straight out.
// Every product and sum is rounded on its own like NumPy's, hence no FMA contraction here.
// The two row sweeps (min / max, prefilter) have an AVX-512 variant compiled through a function
// target attribute and picked at run time (a portable build keeps it), and a plain C++ one.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "cpu/rerank_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "condensed.h"
#include "cpu/isa.h"
#include "parallel.h"


namespace iics {
using rerank_parts::round_half;
using rerank_parts::Sparse;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Below this many samples every stage runs on the calling thread: the work is microseconds,
// while starting a thread team costs far more on a loaded machine.
constexpr int64_t kParallelMin = 1024;

// np.sum of a contiguous float32 array: NumPy's pairwise summation, eight running sums a block.
float numpy_sum(const float* a, int64_t n) {
  if (n < 8) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += a[i];
    return s;
  }
  if (n <= 128) {
    float r[8];
    for (int u = 0; u < 8; ++u) r[u] = a[u];
    int64_t i = 8;
    for (; i < n - n % 8; i += 8)
      for (int u = 0; u < 8; ++u) r[u] += a[i + u];
    float s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) s += a[i];
    return s;
  }
  int64_t half = n / 2;
  half -= half % 8;
  return numpy_sum(a, half) + numpy_sum(a + half, n - half);
}

// Distance (i, j) in either layout; the condensed diagonal is 0.
inline float entry(const float* in, Layout layout, int64_t n, int64_t i, int64_t j) {
  if (layout == Layout::Square) return in[i * n + j];
  if (i == j) return 0.0f;
  return i < j ? in[condensed_index(n, i, j)] : in[condensed_index(n, j, i)];
}

// Row i's normalisation key(d) = (d - lo[i]) / range[i], range = max - min (1 for a constant
// row), computed in float32 exactly as the reference's column min-max.
struct RowScale {
  std::vector<float> lo, range;
  float key(int64_t i, float d) const { return (d - lo[i]) / range[i]; }
};

// The sweeps below are written lane-wise (kLanes independent running values) so the compiler
// turns them into vector instructions; a min or max does not depend on the order of its inputs.
constexpr int kLanes = 8;
constexpr int kBlock = 64;  // values tested against a heap bound at once

// Folds v[0..m) into the running *lo and *hi; returns false if some value is NaN or inf.
inline bool fold_range(const float* v, int64_t m, float* lo, float* hi) {
  float a[kLanes], b[kLanes], f[kLanes];
  for (int u = 0; u < kLanes; ++u) {
    a[u] = *lo;
    b[u] = *hi;
    f[u] = 0.0f;
  }
  int64_t t = 0;
  for (; t + kLanes <= m; t += kLanes)
    for (int u = 0; u < kLanes; ++u) {
      const float x = v[t + u];
      a[u] = x < a[u] ? x : a[u];
      b[u] = x > b[u] ? x : b[u];
      f[u] += x - x;  // stays 0 for finite x, turns NaN for NaN or inf
    }
  for (; t < m; ++t) {
    a[0] = v[t] < a[0] ? v[t] : a[0];
    b[0] = v[t] > b[0] ? v[t] : b[0];
    f[0] += v[t] - v[t];
  }
  bool finite = true;
  for (int u = 0; u < kLanes; ++u) {
    *lo = std::min(*lo, a[u]);
    *hi = std::max(*hi, b[u]);
    finite &= f[u] == 0.0f;
  }
  return finite;
}

// Whether some v[0..kBlock) is <= bound.
inline bool any_at_most(const float* v, float bound) {
  float m[kLanes];
  for (int u = 0; u < kLanes; ++u) m[u] = v[u];
  for (int t = kLanes; t < kBlock; t += kLanes)
    for (int u = 0; u < kLanes; ++u) m[u] = v[t + u] < m[u] ? v[t + u] : m[u];
  bool hit = false;
  for (int u = 0; u < kLanes; ++u) hit |= m[u] <= bound;
  return hit;
}

// Whether some v[t] <= bound[t], t < kBlock (v - bound <= 0 exactly then; bound may be inf).
inline bool any_at_most(const float* v, const float* bound) {
  float m[kLanes];
  for (int u = 0; u < kLanes; ++u) m[u] = v[u] - bound[u];
  for (int t = kLanes; t < kBlock; t += kLanes)
    for (int u = 0; u < kLanes; ++u) {
      const float d = v[t + u] - bound[t + u];
      m[u] = d < m[u] ? d : m[u];
    }
  bool hit = false;
  for (int u = 0; u < kLanes; ++u) hit |= m[u] <= 0.0f;
  return hit;
}

// A neighbour candidate: normalised key, raw distance, sample index.
struct Candidate {
  float key;
  float raw;
  int32_t idx;
};

// Rank order: nearer first, ties to the smaller index (a stable sort of the reference's row).
inline bool precedes(const Candidate& a, const Candidate& b) {
  return a.key < b.key || (a.key == b.key && a.idx < b.idx);
}

// Bounded max-heap (the worst kept candidate on top) in caller storage. Candidates arrive in
// increasing index order, so one tied with the worst comes later in rank and never enters.
struct NearestHeap {
  Candidate* slot;
  int cap;
  int* size;

  // Raw distances above this bound cannot enter: the normalisation is monotone in the raw value.
  float raw_bound() const { return *size < cap ? kInf : slot[0].raw; }

  void offer(float key, float raw, int32_t idx) {
    int pos;
    if (*size < cap) {
      pos = (*size)++;
      while (pos > 0) {  // sift up
        const int parent = (pos - 1) / 2;
        if (!(key > slot[parent].key || (key == slot[parent].key && idx > slot[parent].idx)))
          break;
        slot[pos] = slot[parent];
        pos = parent;
      }
    } else {
      if (!(key < slot[0].key)) return;
      pos = 0;
      for (;;) {  // sift down from the root
        int child = 2 * pos + 1;
        if (child >= cap) break;
        if (child + 1 < cap && precedes(slot[child], slot[child + 1])) ++child;
        if (!(key < slot[child].key || (key == slot[child].key && idx < slot[child].idx))) break;
        slot[pos] = slot[child];
        pos = child;
      }
    }
    slot[pos] = Candidate{key, raw, idx};
  }

  void sort() const { std::sort(slot, slot + *size, precedes); }
};

// Offers the contiguous distances v[0..m) of row `row`, indices first..first+m-1, to a heap.
// Blocks of raw values are tested against the bound at once; the division only runs on hits.
void scan_row_plain(const float* v, int64_t m, int64_t first, int64_t row, const RowScale& s,
                     NearestHeap& heap) {
  float bound = heap.raw_bound();
  for (int64_t t = 0; t < m; t += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, m - t);
    if (len == kBlock && !any_at_most(v + t, bound)) continue;
    for (int64_t u = t; u < t + len; ++u)
      if (v[u] <= bound) {
        heap.offer(s.key(row, v[u]), v[u], static_cast<int32_t>(first + u));
        bound = heap.raw_bound();
      }
  }
}

#ifdef IICS_X86_SIMD
// Floats in value order as signed integers (-0 just below +0), and back.
inline int32_t float_order(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i < 0 ? i ^ 0x7fffffff : i;
}
inline float order_float(int32_t i) {
  if (i < 0) i ^= 0x7fffffff;
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

// (AVX-512 sweeps) The largest raw value whose key in row `row` is <= the key of `raw` (the key rounds, so
// values a little above `raw` may share it), by galloping then bisecting over the floats above
// `raw`; +inf caps the search.
float last_with_same_key(float raw, int64_t row, const RowScale& s) {
  const float target = s.key(row, raw);
  const int32_t top = float_order(kInf);
  int32_t ok = float_order(raw), bad = top;
  for (int64_t step = 1; ok < top; step *= 2) {
    const int32_t probe = static_cast<int32_t>(std::min<int64_t>(ok + step, top));
    if (!(s.key(row, order_float(probe)) <= target)) {
      bad = probe;
      break;
    }
    ok = probe;
  }
  while (bad - ok > 1) {
    const int32_t mid = ok + (bad - ok) / 2;
    if (s.key(row, order_float(mid)) <= target)
      ok = mid;
    else
      bad = mid;
  }
  return order_float(ok);
}

// AVX-512 fold_range: 16 lanes, the tail through a masked load.
IICS_TARGET_AVX512 bool fold_range_avx512(const float* v, int64_t m, float* lo, float* hi) {
  __m512 a = _mm512_set1_ps(*lo), b = _mm512_set1_ps(*hi), f = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= m; t += 16) {
    const __m512 x = _mm512_loadu_ps(v + t);
    a = _mm512_mask_min_ps(a, 0xffff, a, x);  // the unmasked forms warn under GCC 12's -Wall
    b = _mm512_mask_max_ps(b, 0xffff, b, x);
    f = _mm512_add_ps(f, _mm512_sub_ps(x, x));  // stays 0 for finite x, turns NaN for NaN or inf
  }
  if (t < m) {
    const __mmask16 k = static_cast<__mmask16>((1u << (m - t)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, v + t);
    a = _mm512_mask_min_ps(a, k, a, x);
    b = _mm512_mask_max_ps(b, k, b, x);
    f = _mm512_mask_add_ps(f, k, f, _mm512_sub_ps(x, x));
  }
  float la[16], lb[16];  // lane-wise reduction (the reduce intrinsics warn like min / max)
  _mm512_storeu_ps(la, a);
  _mm512_storeu_ps(lb, b);
  for (int u = 0; u < 16; ++u) {
    *lo = la[u] < *lo ? la[u] : *lo;
    *hi = lb[u] > *hi ? lb[u] : *hi;
  }
  return _mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_EQ_OQ) == 0xffff;
}

// A raw bound that no entry of the row's final kk nearest exceeds, so that the heap is offered
// few candidates: with M the kk-th smallest of the 64-value blocks' minima, kk entries are <= M,
// so every final neighbour has key <= key(M), and the bound is the largest raw value with that
// key. +inf when the row has fewer than kk whole blocks.
IICS_TARGET_AVX512 float block_bound_avx512(const float* v, int64_t m, int64_t row,
                                            const RowScale& s, int kk) {
  const int64_t blocks = m / 64;
  if (blocks < kk) return kInf;
  thread_local std::vector<float> minima;
  minima.resize(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = v + 64 * b;
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const __m512 x2 = _mm512_loadu_ps(x + 32), x3 = _mm512_loadu_ps(x + 48);
    const __m512 a = _mm512_mask_min_ps(x0, 0xffff, x0, x1);
    const __m512 c = _mm512_mask_min_ps(x2, 0xffff, x2, x3);
    float lanes[16];
    _mm512_storeu_ps(lanes, _mm512_mask_min_ps(a, 0xffff, a, c));
    // Each lane holds one of the block's values; NaN lanes (a row refused later) are skipped,
    // so the minima stay ordered for nth_element.
    float least = kInf;
    for (int u = 0; u < 16; ++u) least = lanes[u] < least ? lanes[u] : least;
    minima[b] = least;
  }
  std::nth_element(minima.begin(), minima.begin() + (kk - 1), minima.end());
  return last_with_same_key(minima[kk - 1], row, s);
}

// AVX-512 scan_row: 64 values against the bound at once; only the values at or below it (a
// bit mask) are looked at one by one, against the bound as it tightens. The bound starts at
// block_bound_avx512's, so the heap sees a few candidates more than it keeps, not ~k ln(m / k).
IICS_TARGET_AVX512 void scan_row_avx512(const float* v, int64_t m, int64_t first, int64_t row,
                                        const RowScale& s, NearestHeap& heap) {
  const float start = block_bound_avx512(v, m, row, s, heap.cap);
  float bound = std::min(heap.raw_bound(), start);
  const auto take = [&](int64_t t, uint64_t hits) {
    for (; hits; hits &= hits - 1) {
      const int64_t u = t + __builtin_ctzll(hits);
      if (v[u] <= bound) {
        heap.offer(s.key(row, v[u]), v[u], static_cast<int32_t>(first + u));
        bound = std::min(heap.raw_bound(), start);
      }
    }
  };
  int64_t t = 0;
  for (; t + 64 <= m; t += 64) {
    const __m512 b = _mm512_set1_ps(bound);
    const uint64_t hits =
        static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + t), b, _CMP_LE_OQ)) |
        static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + t + 16), b, _CMP_LE_OQ))
            << 16 |
        static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + t + 32), b, _CMP_LE_OQ))
            << 32 |
        static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + t + 48), b, _CMP_LE_OQ))
            << 48;
    if (hits) take(t, hits);
  }
  for (; t < m; t += 16) {
    const __mmask16 k = static_cast<__mmask16>(m - t >= 16 ? 0xffffu : (1u << (m - t)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, v + t);
    take(t, _mm512_mask_cmp_ps_mask(k, x, _mm512_set1_ps(bound), _CMP_LE_OQ));
  }
}
#endif

// The row sweeps of one instruction set: same results, different speed.
struct RowSweeps {
  bool (*fold)(const float* v, int64_t m, float* lo, float* hi);
  void (*scan)(const float* v, int64_t m, int64_t first, int64_t row, const RowScale& s,
               NearestHeap& heap);
};

RowSweeps row_sweeps(const std::string& isa) {
  const RowSweeps plain{fold_range, scan_row_plain};
#ifdef IICS_X86_SIMD
  return pick_isa(isa, plain, RowSweeps{fold_range_avx512, scan_row_avx512}, true);
#else
  return pick_isa(isa, plain, plain, false);
#endif
}

[[noreturn]] void throw_nonfinite() {
  throw std::invalid_argument(
      "k_reciprocal: the distance matrix contains NaN or inf; re-ranking needs finite "
      "distances (check the features and the similarity build)");
}

// Sets range[i] from the row's max: max - min, 1 for a constant row.
void set_range(RowScale& s, int64_t i, float hi) {
  const float r = hi - s.lo[i];
  s.range[i] = r > 0.0f ? r : 1.0f;
}

// Min and max of every row of a condensed matrix, diagonal (0) included, in one sequential
// sweep: entry (i, j) is in row i (contiguous) and row j (the thread's own partial column
// arrays). Throws on NaN/inf.
RowScale condensed_row_scale(const float* in, int64_t n, const RowSweeps& sweeps) {
  std::vector<float> lo(n), hi(n);
  int nonfinite = 0;
  const int threads = max_threads();
  std::vector<float> col_lo(static_cast<size_t>(threads) * n, kInf);
  std::vector<float> col_hi(static_cast<size_t>(threads) * n, -kInf);
#pragma omp parallel reduction(| : nonfinite) if (n >= kParallelMin)
  {
    float* clo = col_lo.data() + static_cast<size_t>(thread_index()) * n;
    float* chi = col_hi.data() + static_cast<size_t>(thread_index()) * n;
#pragma omp for schedule(dynamic, 64)
    for (int64_t i = 0; i < n; ++i) {
      const float* seg = in + condensed_row(n, i);
      const int64_t m = n - 1 - i;
      float a = 0.0f, b = 0.0f;  // the diagonal
      nonfinite |= !sweeps.fold(seg, m, &a, &b);
      lo[i] = a;
      hi[i] = b;
      float* cl = clo + i + 1;
      float* ch = chi + i + 1;
      for (int64_t t = 0; t < m; ++t) {
        cl[t] = seg[t] < cl[t] ? seg[t] : cl[t];
        ch[t] = seg[t] > ch[t] ? seg[t] : ch[t];
      }
    }
  }
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    for (int t = 0; t < threads; ++t) {
      lo[i] = std::min(lo[i], col_lo[static_cast<size_t>(t) * n + i]);
      hi[i] = std::max(hi[i], col_hi[static_cast<size_t>(t) * n + i]);
    }
  if (nonfinite) throw_nonfinite();
  RowScale s;
  s.lo = std::move(lo);
  s.range.resize(n);
  for (int64_t i = 0; i < n; ++i) set_range(s, i, hi[i]);
  return s;
}

// Column stripes [b[s], b[s+1]) of about equal area of the upper triangle (column j holds j
// entries above the diagonal), several a thread for balance.
std::vector<int64_t> column_stripes(int64_t n) {
  const int64_t count = std::min<int64_t>(n, 4 * static_cast<int64_t>(max_threads()));
  std::vector<int64_t> b(count + 1);
  for (int64_t s = 0; s <= count; ++s)
    b[s] = static_cast<int64_t>(std::llround(n * std::sqrt(static_cast<double>(s) / count)));
  b[count] = n;
  return b;
}

// Each row's kk nearest samples, nearest first, row-major n x kk, and the rows' scale *s.
// Throws on NaN/inf before returning.
std::vector<int32_t> nearest(const float* in, Layout layout, int64_t n, int kk,
                             const RowSweeps& sweeps, RowScale* scale) {
  std::vector<int32_t> nbr(static_cast<size_t>(n) * kk);
  if (layout == Layout::Square) {
    RowScale& s = *scale;
    s.lo.assign(n, 0.0f);
    s.range.assign(n, 1.0f);
    int nonfinite = 0;
#pragma omp parallel reduction(| : nonfinite) if (n >= kParallelMin)
    {
      std::vector<Candidate> slots(kk);
#pragma omp for schedule(dynamic, 16)
      for (int64_t i = 0; i < n; ++i) {
        const float* row = in + i * n;
        float lo = kInf, hi = -kInf;
        nonfinite |= !sweeps.fold(row, n, &lo, &hi);  // brings the row into cache
        s.lo[i] = lo;
        set_range(s, i, hi);
        int size = 0;
        NearestHeap heap{slots.data(), kk, &size};
        sweeps.scan(row, n, 0, i, s, heap);
        heap.sort();
        for (int t = 0; t < kk; ++t) nbr[i * kk + t] = slots[t].idx;
      }
    }
    if (nonfinite) throw_nonfinite();
    return nbr;
  }
  RowScale& s = *scale;
  s = condensed_row_scale(in, n, sweeps);
  // Condensed: `upper` holds row i's nearest among indices >= i (diagonal, then row i's
  // segment), `lower` those among indices < i, fed column by column.
  std::vector<Candidate> upper(static_cast<size_t>(n) * kk), lower(static_cast<size_t>(n) * kk);
  std::vector<int> upper_size(n, 0), lower_size(n, 0);
#pragma omp parallel for schedule(dynamic, 16) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    NearestHeap heap{upper.data() + i * kk, kk, &upper_size[i]};
    heap.offer(s.key(i, 0.0f), 0.0f, static_cast<int32_t>(i));
    sweeps.scan(in + condensed_row(n, i), n - 1 - i, i + 1, i, s, heap);
    heap.sort();
  }
  const std::vector<int64_t> stripe = column_stripes(n);
  const int64_t stripes = static_cast<int64_t>(stripe.size()) - 1;
  std::vector<float> bound(n, kInf);
#pragma omp parallel for schedule(dynamic, 1) if (n >= kParallelMin)
  for (int64_t st = stripes - 1; st >= 0; --st) {  // widest-area stripes first
    const int64_t j0 = stripe[st], j1 = stripe[st + 1];
    for (int64_t i = 0; i + 1 < j1; ++i) {
      const int64_t a = std::max(j0, i + 1);
      const float* v = in + condensed_index(n, i, a);
      const float* bnd = bound.data() + a;
      const int64_t m = j1 - a;
      for (int64_t t = 0; t < m; t += kBlock) {
        const int64_t len = std::min<int64_t>(kBlock, m - t);
        if (len == kBlock && !any_at_most(v + t, bnd + t)) continue;
        for (int64_t u = t; u < t + len; ++u) {
          const int64_t j = a + u;
          if (v[u] <= bound[j]) {
            NearestHeap heap{lower.data() + j * kk, kk, &lower_size[j]};
            heap.offer(s.key(j, v[u]), v[u], static_cast<int32_t>(i));
            bound[j] = heap.raw_bound();
          }
        }
      }
    }
  }
#pragma omp parallel if (n >= kParallelMin)
  {
    std::vector<Candidate> merged(2 * static_cast<size_t>(kk));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      Candidate* lo = lower.data() + j * kk;
      std::sort(lo, lo + lower_size[j], precedes);
      const Candidate* up = upper.data() + j * kk;
      std::merge(lo, lo + lower_size[j], up, up + upper_size[j], merged.begin(), precedes);
      for (int t = 0; t < kk; ++t) nbr[j * kk + t] = merged[t].idx;
    }
  }
  return nbr;
}

// Builds a Sparse from fill(begin, end, cols, vals, ends), which appends rows begin..end-1 to
// cols/vals and sets ends[i - begin] to the buffers' length after row i. The rows are cut into
// one contiguous chunk a thread, each chunk with its own buffers, joined in row order.
template <class Fill>
Sparse build_rows(int64_t n, Fill fill) {
  const int chunks = max_threads();
  std::vector<std::vector<int32_t>> cols(chunks);
  std::vector<std::vector<float>> vals(chunks);
  Sparse out;
  out.ptr.assign(n + 1, 0);
#pragma omp parallel for schedule(static, 1) if (n >= kParallelMin)
  for (int t = 0; t < chunks; ++t) {
    const int64_t begin = n * t / chunks, end = n * (t + 1) / chunks;
    fill(begin, end, cols[t], vals[t], out.ptr.data() + begin + 1);
  }
  int64_t base = 0;
  for (int t = 0; t < chunks; ++t) {
    for (int64_t i = n * t / chunks; i < n * (t + 1) / chunks; ++i) out.ptr[i + 1] += base;
    base += static_cast<int64_t>(cols[t].size());
  }
  out.col.reserve(base);
  out.val.reserve(base);
  for (int t = 0; t < chunks; ++t) {
    out.col.insert(out.col.end(), cols[t].begin(), cols[t].end());
    out.val.insert(out.val.end(), vals[t].begin(), vals[t].end());
    std::vector<int32_t>().swap(cols[t]);
    std::vector<float>().swap(vals[t]);
  }
  return out;
}

// Row i's k-reciprocal neighbours among its first `width` nearest, in rank order.
void reciprocal_set(const int32_t* nbr, int kk, int64_t i, int width, std::vector<int32_t>& r) {
  r.clear();
  const int32_t* forward = nbr + i * kk;
  for (int t = 0; t < width; ++t) {
    const int32_t* back = nbr + static_cast<int64_t>(forward[t]) * kk;
    if (std::find(back, back + width, static_cast<int32_t>(i)) != back + width)
      r.push_back(forward[t]);
  }
}

}  // namespace

namespace rerank_parts {

Sparse expansion_sets(int64_t n, int kk, int k_half, const std::vector<int32_t>& nbr) {
  // Every sample's reciprocal set at k_half neighbours, consulted by the expansion rule.
  std::vector<int32_t> half_set(static_cast<size_t>(n) * k_half);
  std::vector<int> half_size(n);
#pragma omp parallel if (n >= kParallelMin)
  {
    std::vector<int32_t> r;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      reciprocal_set(nbr.data(), kk, i, k_half, r);
      half_size[i] = static_cast<int>(r.size());
      std::copy(r.begin(), r.end(), half_set.begin() + i * k_half);
    }
  }
  auto fill = [&](int64_t begin, int64_t end, std::vector<int32_t>& cols, std::vector<float>&,
                  int64_t* ends) {
    // flag[c]: bit 0 while c is in row i's reciprocal set, bit 1 while c is in its expansion;
    // cleared again after each row.
    std::vector<uint8_t> flag(n, 0);
    std::vector<int32_t> r, expansion;
    for (int64_t i = begin; i < end; ++i) {
      reciprocal_set(nbr.data(), kk, i, kk, r);
      expansion.assign(r.begin(), r.end());
      for (const int32_t c : r) flag[c] = 3;
      for (const int32_t c : r) {
        const int32_t* cand = half_set.data() + static_cast<int64_t>(c) * k_half;
        const int size = half_size[c];
        int overlap = 0;
        for (int t = 0; t < size; ++t) overlap += flag[cand[t]] & 1;
        // The reference's test in double precision: len(intersect) > 2/3 * len(candidate set).
        if (static_cast<double>(overlap) > 2.0 / 3.0 * static_cast<double>(size))
          for (int t = 0; t < size; ++t)
            if (!(flag[cand[t]] & 2)) {
              flag[cand[t]] |= 2;
              expansion.push_back(cand[t]);
            }
      }
      for (const int32_t c : expansion) flag[c] = 0;
      std::sort(expansion.begin(), expansion.end());
      cols.insert(cols.end(), expansion.begin(), expansion.end());
      ends[i - begin] = static_cast<int64_t>(cols.size());
    }
  };
  return build_rows(n, fill);
}

void weigh_rows(Sparse& v, const float* keys) {
  const int64_t n = static_cast<int64_t>(v.ptr.size()) - 1;
  v.val.resize(v.col.size());
#pragma omp parallel if (n >= kParallelMin)
  {
    std::vector<float> weight;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = v.ptr[i], m = v.ptr[i + 1] - b;
      weight.resize(m);
      for (int64_t t = 0; t < m; ++t)
        weight[t] = static_cast<float>(std::exp(-static_cast<double>(keys[b + t])));
      const float total = numpy_sum(weight.data(), m);
      for (int64_t t = 0; t < m; ++t) v.val[b + t] = round_half(weight[t] / total);
    }
  }
}

// Query expansion: row i of the result is the float32 mean of V over row i's k2 nearest
// (summed in rank order like NumPy's axis-0 mean), rounded to float16.
Sparse expand_v(const Sparse& v, int64_t n, int kk, int k2, const std::vector<int32_t>& nbr) {
  auto fill = [&](int64_t begin, int64_t end, std::vector<int32_t>& cols,
                  std::vector<float>& vals, int64_t* ends) {
    std::vector<float> acc(n, 0.0f);
    std::vector<uint8_t> seen(n, 0);
    std::vector<int32_t> touched;
    const float count = static_cast<float>(k2);
    for (int64_t i = begin; i < end; ++i) {
      for (int t = 0; t < k2; ++t) {
        const int64_t r = nbr[i * kk + t];
        for (int64_t e = v.ptr[r]; e < v.ptr[r + 1]; ++e) {
          const int32_t c = v.col[e];
          if (!seen[c]) {
            seen[c] = 1;
            touched.push_back(c);
          }
          acc[c] += v.val[e];
        }
      }
      std::sort(touched.begin(), touched.end());
      for (const int32_t c : touched) {
        const float mean = round_half(acc[c] / count);
        if (mean != 0.0f) {
          cols.push_back(c);
          vals.push_back(mean);
        }
        acc[c] = 0.0f;
        seen[c] = 0;
      }
      touched.clear();
      ends[i - begin] = static_cast<int64_t>(cols.size());
    }
  };
  return build_rows(n, fill);
}

// Column view of V (the inverted index): rows of column c ascending.
Sparse transpose(const Sparse& v, int64_t n) {
  Sparse t;
  t.ptr.assign(n + 1, 0);
  for (const int32_t c : v.col) ++t.ptr[c + 1];
  for (int64_t c = 0; c < n; ++c) t.ptr[c + 1] += t.ptr[c];
  t.col.resize(v.col.size());
  t.val.resize(v.val.size());
  std::vector<int64_t> next(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = v.ptr[i]; e < v.ptr[i + 1]; ++e) {
      const int64_t pos = next[v.col[e]]++;
      t.col[pos] = static_cast<int32_t>(i);
      t.val[pos] = v.val[e];
    }
  return t;
}

}  // namespace rerank_parts

namespace {

// V: row i weights its expanded k-reciprocal set by exp(-key), normalised, rounded to float16.
Sparse build_v(const float* in, Layout layout, int64_t n, int kk, int k_half, const RowScale& s,
               const std::vector<int32_t>& nbr) {
  Sparse v = rerank_parts::expansion_sets(n, kk, k_half, nbr);
  std::vector<float> keys(v.col.size());
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = v.ptr[i]; e < v.ptr[i + 1]; ++e)
      keys[e] = s.key(i, entry(in, layout, n, i, v.col[e]));
  rerank_parts::weigh_rows(v, keys.data());
  return v;
}

// out[t] = jac_term[t] + key(d[t]) * dist_weight over a contiguous run. Two versions so the
// compiler can vectorise both: in place (one pointer) and into a separate buffer.
inline void combine_in_place(float* o, const float* jac_term, int64_t m, float lo, float range,
                             float dist_weight) {
  for (int64_t t = 0; t < m; ++t) o[t] = jac_term[t] + ((o[t] - lo) / range) * dist_weight;
}

inline void combine(const float* __restrict d, const float* __restrict jac_term,
                    float* __restrict o, int64_t m, float lo, float range, float dist_weight) {
  for (int64_t t = 0; t < m; ++t) o[t] = jac_term[t] + ((d[t] - lo) / range) * dist_weight;
}

}  // namespace

std::vector<int32_t> k_reciprocal_neighbours_cpu(const float* in, Layout in_layout, int64_t n,
                                                 int k1, const std::string& isa) {
  RowScale s;
  return nearest(in, in_layout, n, static_cast<int>(std::min<int64_t>(k1 + 1, n)),
                 row_sweeps(isa), &s);
}

void k_reciprocal_cpu(const float* in, Layout in_layout, float* out, Layout out_layout,
                      const KReciprocalParams& p) {
  const int64_t n = p.n;
  const int kk = static_cast<int>(std::min<int64_t>(p.k1 + 1, n));
  const int k_half = static_cast<int>(std::min<int64_t>(p.k_half, n));
  const int k2 = static_cast<int>(std::min<int64_t>(p.k2, n));
  RowScale s;
  const std::vector<int32_t> nbr = nearest(in, in_layout, n, kk, row_sweeps(p.isa), &s);
  Sparse v = build_v(in, in_layout, n, kk, k_half, s, nbr);
  if (k2 != 1) v = rerank_parts::expand_v(v, n, kk, k2, nbr);
  const Sparse inverted = rerank_parts::transpose(v, n);

  const bool upper_only = out_layout == Layout::Condensed;
  const bool in_place = static_cast<const float*>(out) == in;
  const float jac_one = p.jaccard_weight;  // the Jaccard term of a pair sharing nothing: 1 * w
#pragma omp parallel if (n >= kParallelMin)
  {
    std::vector<float> common(n, 0.0f), jac_term(n, jac_one);
    std::vector<int32_t> touched;
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < n; ++i) {
      // Sparse Jaccard row: m[k] = sum over shared columns c (ascending) of
      // min(V[i, c], V[k, c]), accumulated in float16 as the reference does.
      for (int64_t e = v.ptr[i]; e < v.ptr[i + 1]; ++e) {
        const int32_t c = v.col[e];
        const float vi = v.val[e];
        const int32_t* rows = inverted.col.data() + inverted.ptr[c];
        const int32_t* rows_end = inverted.col.data() + inverted.ptr[c + 1];
        const int32_t* start =
            upper_only ? std::upper_bound(rows, rows_end, static_cast<int32_t>(i)) : rows;
        const float* vals = inverted.val.data() + (start - inverted.col.data());
        for (const int32_t* k = start; k != rows_end; ++k, ++vals) {
          float& acc = common[*k];
          if (acc == 0.0f) touched.push_back(*k);  // shared entries are > 0, so acc stays > 0
          acc = round_half(acc + std::min(vi, *vals));
        }
      }
      for (const int32_t k : touched) {
        const float m = common[k];
        float jac = round_half(1.0f - round_half(m / round_half(2.0f - m)));
        if (jac < 0.0f) jac = 0.0f;
        jac_term[k] = round_half(jac * p.jaccard_weight);
        common[k] = 0.0f;
      }

      const float lo = s.lo[i], range = s.range[i];
      if (out_layout == Layout::Condensed) {
        float* o = out + condensed_row(n, i);
        const int64_t m = n - 1 - i;
        if (in_layout == Layout::Condensed) {
          if (in_place)
            combine_in_place(o, jac_term.data() + i + 1, m, lo, range, p.dist_weight);
          else
            combine(in + condensed_row(n, i), jac_term.data() + i + 1, o, m, lo, range,
                    p.dist_weight);
        } else {
          combine(in + i * n + i + 1, jac_term.data() + i + 1, o, m, lo, range, p.dist_weight);
        }
      } else {
        float* o = out + i * n;
        if (in_layout == Layout::Square) {
          if (in_place)
            combine_in_place(o, jac_term.data(), n, lo, range, p.dist_weight);
          else
            combine(in + i * n, jac_term.data(), o, n, lo, range, p.dist_weight);
        } else {
          for (int64_t j = 0; j < i; ++j)  // left of the diagonal: column i of the triangle
            o[j] = jac_term[j] + ((in[condensed_index(n, j, i)] - lo) / range) * p.dist_weight;
          o[i] = jac_term[i] + ((0.0f - lo) / range) * p.dist_weight;
          combine(in + condensed_row(n, i), jac_term.data() + i + 1, o + i + 1, n - 1 - i, lo,
                  range, p.dist_weight);
        }
      }
      for (const int32_t k : touched) jac_term[k] = jac_one;
      touched.clear();
    }
  }
}

}  // namespace iics
