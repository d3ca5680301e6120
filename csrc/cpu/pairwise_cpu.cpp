// Register-tiled pairwise sum-of-minima (generalised Jaccard) and the fused IICS inter-camera
// distance. Algorithm: the pair grid is cut into cache tiles (kMB x kNB pairs, the score
// dimension in long kKC chunks); each tile is covered by MR x NR register micro-tiles whose
// accumulators hold sum_k min(a_k, b_k) for one vector of k at a time (one min and one add a
// vector and pair), summed across their lanes once a chunk. See pairwise_cpu.h for the
// identities.
//
// Runtime SIMD dispatch: the micro-kernel exists for AVX-512 (4 x 6 micro-tiles, 16 floats a
// vector), AVX2 + FMA (2 x 6, 8 floats) and plain C++; each vector variant is compiled for its
// instruction set through function target attributes, so a portable build (IICS_NATIVE=0)
// keeps it, and the widest one the CPU supports is picked once at run time.
#include "pairwise_cpu.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define IICS_X86_SIMD 1
#include <immintrin.h>
#endif

#include "condensed.h"

namespace iics {
namespace {

#ifndef IICS_PAIRWISE_MB  // tile sizes may be overridden at build time for tuning experiments
#define IICS_PAIRWISE_MB 48
#define IICS_PAIRWISE_NB 60
#define IICS_PAIRWISE_KC 4096
#endif
constexpr int64_t kMB = IICS_PAIRWISE_MB;  // cache-tile rows (a multiple of every variant's MR)
constexpr int64_t kNB = IICS_PAIRWISE_NB;  // cache-tile columns (a multiple of every variant's NR)
// Score dims a chunk. Every chunk costs each micro-tile a start (its ten row streams begin anew)
// and an end (a horizontal sum an accumulator). Measured on Zen 4 (sum-of-minima sweeps at
// D = 3,600 and 9,000, 1 and 2 threads), chunks of 1,024 lost 15-25% of the loop's rate to
// these against chunks of 3,072 or more, more than the row panels gain from staying in L1; and
// 48-row tiles (each 60-row column panel read once for 48 rows, not 24) gained another ~10% at
// D = 9,000. So a chunk is long and the tile tall.
constexpr int64_t kKC = IICS_PAIRWISE_KC;

// Plain C++: the reference the vector variants are tested against, and the fallback. A chunk is
// summed in double: one float32 running sum over thousands of dims would drift further from the
// exact sum than the vector variants' 8 or 16 lane-wise sums do.
struct ScalarKernel {
  static constexpr int MR = 2, NR = 6;
  // acc[r*NR + q] += sum_{k in [k0, k1)} min(a[r][k], b[q][k]).
  static inline void micro(const float* const* a, const float* const* b, int64_t k0, int64_t k1,
                           float* acc) {
    for (int r = 0; r < MR; ++r)
      for (int q = 0; q < NR; ++q) {
        double s = 0.0;
        for (int64_t k = k0; k < k1; ++k) s += std::min(a[r][k], b[q][k]);
        acc[r * NR + q] += static_cast<float>(s);
      }
  }
  static inline void probe(const float* const* a, const float* const* b, int64_t kd, int64_t reps,
                           float* acc) {
    for (int64_t it = 0; it < reps; ++it) micro(a, b, 0, kd, acc);
  }
};

#ifdef IICS_X86_SIMD
#define IICS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define IICS_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))

// The remainder k1 - k (fewer than a vector) of a micro-tile, shared by the vector variants.
template <int MR, int NR>
inline void min_sum_tail(const float* const* a, const float* const* b, int64_t k, int64_t k1,
                         float* acc) {
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NR; ++q) {
      float s = 0.f;
      for (int64_t kk = k; kk < k1; ++kk) s += std::min(a[r][kk], b[q][kk]);
      acc[r * NR + q] += s;
    }
}

// Loads the column vector once into a register: left to itself, GCC's Zen 4 tuning folds the
// load into each of the MR vminps (MR loads instead of one), which makes the loop load-bound at
// about a third of its speed.
// The register tiles' loops are unrolled before GCC decides where the accumulator arrays live:
// otherwise they round-trip through the stack around the D loop.
#define IICS_UNROLL _Pragma("GCC unroll 8")

template <typename V>
inline void keep_in_register(V& v) {
  asm("" : "+v"(v));
}

// Every accumulation goes through the FMA pipes (t * 1 + c): with min on the other pipes this
// keeps both pairs busy; measured on Zen 4 it runs at twice the rate of plain adds, which share
// the min's pipes. `loop` is the D loop: `reps` times over dims [k0, k1) (whole vectors), the
// accumulators in registers throughout; micro = one pass of it, the remainder, and one
// horizontal sum an accumulator; the ceiling probe runs the same loop with many passes.
struct Avx2Kernel {
  static constexpr int MR = 2, NR = 6, VL = 8;
  IICS_TARGET_AVX2 static inline __attribute__((always_inline)) void loop(
      const float* const* a, const float* const* b, int64_t k0, int64_t k1, int64_t reps,
      float* acc) {
    __m256 c[MR][NR];
    IICS_UNROLL for (int r = 0; r < MR; ++r)
      IICS_UNROLL for (int q = 0; q < NR; ++q) c[r][q] = _mm256_setzero_ps();
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t it = 0; it < reps; ++it)
      for (int64_t k = k0; k + VL <= k1; k += VL) {
        __m256 av[MR];
        IICS_UNROLL for (int r = 0; r < MR; ++r) av[r] = _mm256_loadu_ps(a[r] + k);
        IICS_UNROLL for (int q = 0; q < NR; ++q) {
          __m256 bq = _mm256_loadu_ps(b[q] + k);
          keep_in_register(bq);
          IICS_UNROLL for (int r = 0; r < MR; ++r)
            c[r][q] = _mm256_fmadd_ps(_mm256_min_ps(av[r], bq), one, c[r][q]);
        }
      }
    IICS_UNROLL for (int r = 0; r < MR; ++r)
      IICS_UNROLL for (int q = 0; q < NR; ++q) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(c[r][q]), _mm256_extractf128_ps(c[r][q], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        acc[r * NR + q] += _mm_cvtss_f32(s);
      }
  }
  IICS_TARGET_AVX2 __attribute__((noinline)) static void micro(const float* const* a,
                                                               const float* const* b, int64_t k0,
                                                               int64_t k1, float* acc) {
    const int64_t kv = k0 + (k1 - k0) / VL * VL;
    loop(a, b, k0, kv, 1, acc);
    min_sum_tail<MR, NR>(a, b, kv, k1, acc);
  }
  IICS_TARGET_AVX2 __attribute__((noinline)) static void probe(const float* const* a,
                                                               const float* const* b, int64_t kd,
                                                               int64_t reps, float* acc) {
    loop(a, b, 0, kd, reps, acc);
  }
};

struct Avx512Kernel {
  static constexpr int MR = 4, NR = 6, VL = 16;  // 24 accumulators + 4 row vectors + 1 column vector
  IICS_TARGET_AVX512 static inline __attribute__((always_inline)) void loop(
      const float* const* a, const float* const* b, int64_t k0, int64_t k1, int64_t reps,
      float* acc) {
    __m512 c[MR][NR];
    IICS_UNROLL for (int r = 0; r < MR; ++r)
      IICS_UNROLL for (int q = 0; q < NR; ++q) c[r][q] = _mm512_setzero_ps();
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t it = 0; it < reps; ++it)
      for (int64_t k = k0; k + VL <= k1; k += VL) {
        __m512 av[MR];
        IICS_UNROLL for (int r = 0; r < MR; ++r) av[r] = _mm512_loadu_ps(a[r] + k);
        IICS_UNROLL for (int q = 0; q < NR; ++q) {
          __m512 bq = _mm512_loadu_ps(b[q] + k);
          keep_in_register(bq);
          IICS_UNROLL for (int r = 0; r < MR; ++r)
            c[r][q] = _mm512_fmadd_ps(_mm512_min_ps(av[r], bq), one, c[r][q]);
        }
      }
    IICS_UNROLL for (int r = 0; r < MR; ++r)
      IICS_UNROLL for (int q = 0; q < NR; ++q) acc[r * NR + q] += _mm512_reduce_add_ps(c[r][q]);
  }
  IICS_TARGET_AVX512 __attribute__((noinline)) static void micro(const float* const* a,
                                                                 const float* const* b, int64_t k0,
                                                                 int64_t k1, float* acc) {
    const int64_t kv = k0 + (k1 - k0) / VL * VL;
    loop(a, b, k0, kv, 1, acc);
    min_sum_tail<MR, NR>(a, b, kv, k1, acc);
  }
  IICS_TARGET_AVX512 __attribute__((noinline)) static void probe(const float* const* a,
                                                                 const float* const* b, int64_t kd,
                                                                 int64_t reps, float* acc) {
    loop(a, b, 0, kd, reps, acc);
  }
};
#endif  // IICS_X86_SIMD

static_assert(kMB % ScalarKernel::MR == 0 && kNB % ScalarKernel::NR == 0, "tile / micro-tile");
#ifdef IICS_X86_SIMD
static_assert(kMB % Avx2Kernel::MR == 0 && kNB % Avx2Kernel::NR == 0, "tile / micro-tile");
static_assert(kMB % Avx512Kernel::MR == 0 && kNB % Avx512Kernel::NR == 0, "tile / micro-tile");
#endif

// Which micro-tiles of a cache tile are computed: with `upper`, those with a pair j > i; with
// `cam`, only those whose pairs do not all share one camera (Eq. 5 masks J there).
struct TileFilter {
  bool upper = false;
  const int64_t* cam = nullptr;

  // Micro-tile rows [i, ie] x columns [j, je] (inclusive ends).
  bool want(int64_t i, int64_t ie, int64_t j, int64_t je) const {
    if (upper && je <= i) return false;
    if (!cam) return true;
    const int64_t c = cam[i];
    for (int64_t r = i; r <= ie; ++r)
      if (cam[r] != c) return true;
    for (int64_t q = j; q <= je; ++q)
      if (cam[q] != c) return true;
    return false;
  }
};

// Sum of minima for the pairs of rows [i0, i1) of `a` x rows [j0, j1) of `b` into
// smin[(i - i0) * kNB + (j - j0)]. Rows past the end are clamped to the last row (their results
// are never read).
template <class K>
void min_sum_tile(const float* a, int64_t lda, int64_t i0, int64_t i1, const float* b,
                  int64_t ldb, int64_t j0, int64_t j1, int64_t dim, float* smin,
                  const TileFilter& filter) {
  const int64_t mi = i1 - i0, nj = j1 - j0;
  std::fill(smin, smin + kMB * kNB, 0.f);
  for (int64_t k0 = 0; k0 < dim; k0 += kKC) {
    const int64_t k1 = std::min(dim, k0 + kKC);
    for (int64_t ir = 0; ir < mi; ir += K::MR) {
      const float* ap[K::MR];
      for (int r = 0; r < K::MR; ++r) ap[r] = a + (i0 + std::min<int64_t>(ir + r, mi - 1)) * lda;
      const int64_t ie = i0 + std::min<int64_t>(ir + K::MR, mi) - 1;
      for (int64_t jc = 0; jc < nj; jc += K::NR) {
        const int64_t je = j0 + std::min<int64_t>(jc + K::NR, nj) - 1;
        if (!filter.want(i0 + ir, ie, j0 + jc, je)) continue;
        const float* bp[K::NR];
        for (int q = 0; q < K::NR; ++q) bp[q] = b + (j0 + std::min<int64_t>(jc + q, nj - 1)) * ldb;
        float acc[K::MR * K::NR] = {};
        K::micro(ap, bp, k0, k1, acc);
        for (int r = 0; r < K::MR; ++r)
          for (int q = 0; q < K::NR; ++q) smin[(ir + r) * kNB + jc + q] += acc[r * K::NR + q];
      }
    }
  }
}

// The ceiling probe: the micro-kernel's D loop alone (K::probe: the same loads, min and
// accumulations as K::micro, the accumulators in registers across all repetitions, one
// horizontal sum at the very end), over and over on MR + NR rows of kProbeK dims that stay in
// L1 (10 rows x 1 KB): no memory traffic, no per-chunk work. Returns pair-dims.
constexpr int64_t kProbeK = 256;

template <class K>
double min_sum_probe(int64_t reps) {
  std::vector<float> buf((K::MR + K::NR) * kProbeK);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i % 97) * 0.01f;
  const float* ap[K::MR];
  const float* bp[K::NR];
  for (int r = 0; r < K::MR; ++r) ap[r] = buf.data() + r * kProbeK;
  for (int q = 0; q < K::NR; ++q) bp[q] = buf.data() + (K::MR + q) * kProbeK;
  float acc[K::MR * K::NR] = {};
  K::probe(ap, bp, kProbeK, reps, acc);
  asm volatile("" : : "r"(acc) : "memory");  // the sums are kept
  return static_cast<double>(reps) * K::MR * K::NR * kProbeK;
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                        int64_t, int64_t, float*, const TileFilter&);
using ProbeFn = double (*)(int64_t);

void tile_scalar(const float* a, int64_t lda, int64_t i0, int64_t i1, const float* b, int64_t ldb,
                 int64_t j0, int64_t j1, int64_t dim, float* smin, const TileFilter& f) {
  min_sum_tile<ScalarKernel>(a, lda, i0, i1, b, ldb, j0, j1, dim, smin, f);
}
double probe_scalar(int64_t reps) { return min_sum_probe<ScalarKernel>(reps); }

#ifdef IICS_X86_SIMD
// `flatten` inlines the generic tile loop and the micro-kernel into these target functions, so
// the whole loop nest is compiled for the instruction set.
IICS_TARGET_AVX2 __attribute__((flatten)) void tile_avx2(
    const float* a, int64_t lda, int64_t i0, int64_t i1, const float* b, int64_t ldb, int64_t j0,
    int64_t j1, int64_t dim, float* smin, const TileFilter& f) {
  min_sum_tile<Avx2Kernel>(a, lda, i0, i1, b, ldb, j0, j1, dim, smin, f);
}
IICS_TARGET_AVX2 __attribute__((flatten)) double probe_avx2(int64_t reps) {
  return min_sum_probe<Avx2Kernel>(reps);
}
IICS_TARGET_AVX512 __attribute__((flatten)) void tile_avx512(
    const float* a, int64_t lda, int64_t i0, int64_t i1, const float* b, int64_t ldb, int64_t j0,
    int64_t j1, int64_t dim, float* smin, const TileFilter& f) {
  min_sum_tile<Avx512Kernel>(a, lda, i0, i1, b, ldb, j0, j1, dim, smin, f);
}
IICS_TARGET_AVX512 __attribute__((flatten)) double probe_avx512(int64_t reps) {
  return min_sum_probe<Avx512Kernel>(reps);
}
#endif

struct Variant {
  const char* name;
  TileFn tile;
  ProbeFn probe;
  bool (*supported)();
};

const Variant kVariants[] = {
#ifdef IICS_X86_SIMD
    {"avx512", tile_avx512, probe_avx512,
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512vl");
     }},
    {"avx2", tile_avx2, probe_avx2,
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
     }},
#endif
    {"scalar", tile_scalar, probe_scalar, [] { return true; }},
};

// The named variant ("auto": the widest this CPU runs); a clear error for an unknown name or
// one this CPU lacks.
const Variant& variant(const std::string& isa) {
  for (const Variant& v : kVariants) {
    if (isa != "auto" && isa != v.name) continue;
    if (v.supported()) return v;
    if (isa != "auto")
      throw std::invalid_argument("isa='" + isa + "' is not supported by this CPU; use isa='auto'");
  }
  if (isa == "auto") return kVariants[sizeof(kVariants) / sizeof(kVariants[0]) - 1];
  std::string names;
  for (const Variant& v : kVariants) names += std::string(names.empty() ? "" : ", ") + v.name;
  throw std::invalid_argument("isa must be 'auto' or one of: " + names + "; got '" + isa + "'");
}

// J from the sum of minima and the two row sums; J(0, 0) := 0.
inline float jaccard_from_min(float smin, float sa, float sb) {
  const float smax = sa + sb - smin;
  if (!(smax > 0.f)) return 0.f;
  return std::clamp(smin / smax, 0.f, 1.f);
}

}  // namespace

std::vector<std::string> simd_variants() {
  std::vector<std::string> out;
  for (const Variant& v : kVariants)
    if (v.supported()) out.emplace_back(v.name);
  return out;
}

std::string simd_variant(const std::string& isa) { return variant(isa).name; }

double min_sum_ceiling(const std::string& isa, double seconds) {
  const Variant& v = variant(isa);
  using Clock = std::chrono::steady_clock;
  auto timed = [&](int64_t reps) {
    const auto t0 = Clock::now();
    const double w = v.probe(reps);
    return std::make_pair(w, std::chrono::duration<double>(Clock::now() - t0).count());
  };
  // Bursts of about 0.5 ms (sized by the fastest of three tries, so a preempted try does not
  // cut them short); the fastest burst within `seconds` is the rate: on a shared machine a
  // burst that no other process interrupted shows what the core can do.
  int64_t reps = 256;
  while (reps < (int64_t(1) << 40)) {
    double t = 1e30;
    for (int i = 0; i < 3; ++i) t = std::min(t, timed(reps).second);
    if (t >= 5e-4) break;
    reps *= 2;
  }
  double best = 0.0;
  const auto start = Clock::now();
  do {
    const auto [w, t] = timed(reps);
    best = std::max(best, w / t);
  } while (std::chrono::duration<double>(Clock::now() - start).count() < seconds);
  return best;
}

void pairwise_jaccard_cpu(const float* a, int64_t m, int64_t lda, const float* sa,
                          const float* b, int64_t p, int64_t ldb, const float* sb, int64_t d,
                          float* out, int64_t ldo, const std::string& isa) {
  const TileFn tile = variant(isa).tile;
  const int64_t tm = (m + kMB - 1) / kMB, tp = (p + kNB - 1) / kNB;
  const TileFilter all;
#pragma omp parallel
  {
    std::vector<float> smin(kMB * kNB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tm * tp; ++t) {
      const int64_t i0 = (t / tp) * kMB, j0 = (t % tp) * kNB;
      const int64_t i1 = std::min(m, i0 + kMB), j1 = std::min(p, j0 + kNB);
      tile(a, lda, i0, i1, b, ldb, j0, j1, d, smin.data(), all);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j)
          out[i * ldo + j] = jaccard_from_min(smin[(i - i0) * kNB + (j - j0)], sa[i], sb[j]);
    }
  }
}

void inter_camera_rows_cpu(const float* scores, int64_t lds, const float* rowsum, int64_t dim,
                           const float* gram, int64_t ldg, int64_t g0, const int64_t* cam,
                           int64_t n, int64_t r0, int64_t r1, float mu, InterCameraMode mode,
                           bool square, float* out, int64_t out_base, const std::string& isa) {
  const TileFn tile = variant(isa).tile;
  // Work list: cache tiles (i0, j0) of the upper triangle of rows [r0, r1) x columns [r0, n).
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = r0; i0 < r1; i0 += kMB)
    for (int64_t j0 = i0; j0 < n; j0 += kNB) tiles.emplace_back(i0, j0);
  const bool need_l1 = mode != InterCameraMode::kFeature;
  const bool masked = mode == InterCameraMode::kEq5;
  // Micro-tiles below the diagonal are skipped and, under Eq. 5, those whose pairs all share
  // one camera (J is masked there).
  TileFilter filter;
  filter.upper = true;
  filter.cam = masked ? cam : nullptr;
#pragma omp parallel
  {
    std::vector<float> smin(kMB * kNB);
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < tiles.size(); ++t) {
      const int64_t i0 = tiles[t].first, j0 = tiles[t].second;
      const int64_t i1 = std::min(r1, i0 + kMB), j1 = std::min(n, j0 + kNB);
      if (need_l1) tile(scores, lds, i0, i1, scores, lds, j0, j1, dim, smin.data(), filter);
      for (int64_t i = i0; i < i1; ++i) {
        const float* g = gram ? gram + (i - g0) * ldg - g0 : nullptr;  // g[j] = cos(f_i, f_j)
        const float* sm = smin.data() + (i - i0) * kNB - j0;          // sm[j] = Smin(i, j)
        float* row = square ? out + i * n : out + (condensed_row(n, i) - out_base) - (i + 1);
        for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
          float v;
          if (mode == InterCameraMode::kJaccard) {
            v = 1.f - jaccard_from_min(sm[j], rowsum[i], rowsum[j]);
          } else {
            v = 1.f - g[j];
            if (masked && cam[i] != cam[j]) v -= mu * jaccard_from_min(sm[j], rowsum[i], rowsum[j]);
          }
          row[j] = v;
          if (square) out[j * n + i] = v;
        }
      }
    }
  }
  if (square)
    for (int64_t i = r0; i < r1; ++i) out[i * n + i] = 0.f;
}

}  // namespace iics
