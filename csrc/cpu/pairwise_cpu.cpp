// Register-tiled pairwise sum-of-minima (generalised Jaccard) and the fused IICS inter-camera
// distance. Algorithm: the pair grid is cut into cache tiles (kMB x kNB pairs, the dimension in
// kKC-wide chunks); a row block is packed once (micro-panel by micro-panel, one contiguous
// stream each, kept for the block's next tiles) and its tiles are covered by MR x NR register micro-tiles whose accumulators hold
// sum_k min(a_k, b_k) for one vector of k at a time (one min and one FMA a vector and pair),
// summed across their lanes once a chunk. The cosines of Eq. 5 run through the same tiles as
// dot products (one FMA a vector and pair). See pairwise_cpu.h for the identities.
//
// Runtime SIMD dispatch: the micro-kernel exists for AVX-512 (4 x 6 micro-tiles, 16 floats a
// vector), AVX2 + FMA (2 x 6, 8 floats) and plain C++; each vector variant is compiled for its
// instruction set through function target attributes, so a portable build (IICS_NATIVE=0)
// keeps it, and the widest one the CPU supports is picked once at run time.
#include "pairwise_cpu.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
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

// Tile sizes may be overridden at build time (-DIICS_PAIRWISE_MB=...) for tuning experiments.
#ifndef IICS_PAIRWISE_MB
#define IICS_PAIRWISE_MB 128
#endif
#ifndef IICS_PAIRWISE_NB
#define IICS_PAIRWISE_NB 240
#endif
#ifndef IICS_PAIRWISE_KC
#define IICS_PAIRWISE_KC 1024
#endif
constexpr int64_t kMB = IICS_PAIRWISE_MB;  // cache-tile rows (a multiple of every variant's MR)
constexpr int64_t kNB = IICS_PAIRWISE_NB;  // cache-tile columns (a multiple of every variant's NR)
// Dims a chunk. A chunk of the packed row block (kMB x kKC floats, 512 KB) stays in L2 while
// every column micro-panel passes over it, and one column micro-panel (NR x kKC, 24 KB) stays
// in L1 while every packed row micro-panel streams past it. Measured on Zen 5 (sum-of-minima
// sweep, N = 2,000, D = 3,600, one thread): unpacked rows streamed from L2 ran at 55-70% of the
// loop's rate, packed ones at 85-90%; chunks of 512 lose to the per-chunk start and end.
constexpr int64_t kKC = IICS_PAIRWISE_KC;
static_assert(kKC > 0 && kKC % 16 == 0, "a chunk must hold whole vectors of every variant");

// Pointers to R consecutive rows of a block: rows first + at + r (r < R) of `base` (row stride ld),
// clamped to the block's last row first + count - 1 (a micro-tile past the block's end repeats
// it; those results are never read).
template <int R>
inline void clamped_rows(const float* base, int64_t ld, int64_t first, int64_t at, int64_t count,
                         const float** rows) {
  for (int r = 0; r < R; ++r) rows[r] = base + (first + std::min<int64_t>(at + r, count - 1)) * ld;
}

// The packed layout of one row micro-panel (MR rows, dims [k0, kv), kv - k0 a multiple of VL):
// p[((k - k0) / VL) * MR * VL + r * VL + l] = a[r][k + l], so the micro-kernel reads its rows
// as one contiguous stream.
template <int MR, int VL>
inline void pack_rows(const float* const* a, int64_t k0, int64_t kv, float* p) {
  for (int64_t k = k0; k < kv; k += VL, p += MR * VL)
    for (int r = 0; r < MR; ++r)
      for (int l = 0; l < VL; ++l) p[r * VL + l] = a[r][k + l];
}

// One dim's term of a pair's sum: min(a, b) for the Jaccard sweep, a * b for the cosines.
template <bool kDot>
inline float term(float a, float b) {
  return kDot ? a * b : std::min(a, b);
}

// The remainder [kv, k1) of a micro-tile (fewer than a vector), from the unpacked rows.
template <bool kDot, int MR, int NR>
inline void pair_sum_tail(const float* const* a, const float* const* b, int64_t kv, int64_t k1,
                          float* acc) {
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NR; ++q) {
      float s = 0.f;
      for (int64_t k = kv; k < k1; ++k) s += term<kDot>(a[r][k], b[q][k]);
      acc[r * NR + q] += s;
    }
}

// Plain C++: the reference the vector variants are tested against, and the fallback. A chunk is
// summed in double: one float32 running sum over thousands of dims would drift further from the
// exact sum than the vector variants' 8 or 16 lane-wise sums do.
struct ScalarKernel {
  static constexpr int MR = 2, NR = 6, VL = 1;
  // acc[r*NR + q] += sum_{k in [k0, kv)} term(a[r][k], b[q][k]), `reps` times; pa: the rows
  // packed.
  template <bool kDot>
  static inline void loop(const float* pa, const float* const* b, int64_t k0, int64_t kv,
                          int64_t reps, float* acc) {
    for (int64_t it = 0; it < reps; ++it)
      for (int r = 0; r < MR; ++r)
        for (int q = 0; q < NR; ++q) {
          double s = 0.0;
          for (int64_t k = k0; k < kv; ++k) s += term<kDot>(pa[(k - k0) * MR + r], b[q][k]);
          acc[r * NR + q] += static_cast<float>(s);
        }
  }
};

#ifdef IICS_X86_SIMD
#define IICS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define IICS_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))

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
// the min's pipes. `loop` is the D loop: `reps` times over dims [k0, kv) (whole vectors; the
// rows packed in pa), the accumulators in registers throughout, then one reduction into acc.
// kDot: the same loop for dot products (one FMA a vector and pair), which gives the cosines
// the same tiles, packing and reduction as the sums of minima.
struct Avx2Kernel {
  static constexpr int MR = 2, NR = 6, VL = 8;
  template <bool kDot>
  IICS_TARGET_AVX2 static inline __attribute__((always_inline)) void loop(
      const float* pa, const float* const* b, int64_t k0, int64_t kv, int64_t reps, float* acc) {
    __m256 c[MR][NR];
    IICS_UNROLL for (int r = 0; r < MR; ++r)
      IICS_UNROLL for (int q = 0; q < NR; ++q) c[r][q] = _mm256_setzero_ps();
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t it = 0; it < reps; ++it) {
      const float* p = pa;
      for (int64_t k = k0; k + VL <= kv; k += VL, p += MR * VL) {
        __m256 av[MR];
        IICS_UNROLL for (int r = 0; r < MR; ++r) av[r] = _mm256_loadu_ps(p + r * VL);
        IICS_UNROLL for (int q = 0; q < NR; ++q) {
          __m256 bq = _mm256_loadu_ps(b[q] + k);
          keep_in_register(bq);
          IICS_UNROLL for (int r = 0; r < MR; ++r)
            c[r][q] = kDot ? _mm256_fmadd_ps(av[r], bq, c[r][q])
                           : _mm256_fmadd_ps(_mm256_min_ps(av[r], bq), one, c[r][q]);
        }
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
};

// GCC 12's AVX-512 headers start shuffles and casts from `_mm512_undefined_ps()`, which
// -Wmaybe-uninitialized misreads once they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The lane sums of 24 accumulators by a transposing tree: each step adds the matching halves
// (256, 128, 64 or 32 bits) of two vectors into one (two shuffles and an add), so 16 vectors
// become one vector of 16 sums in 15 steps; 24 separate horizontal sums took about three times
// as long, which at chunks of 1,024 dims cost ~10% of the sweep.
IICS_TARGET_AVX512 inline __attribute__((always_inline)) __m512 fold256(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
}
IICS_TARGET_AVX512 inline __attribute__((always_inline)) __m512 fold128(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}
IICS_TARGET_AVX512 inline __attribute__((always_inline)) __m512 fold64(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
}
IICS_TARGET_AVX512 inline __attribute__((always_inline)) __m512 fold32(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD));
}
// Lane 4i + j of the result is the sum of v[4j + i]. Written out: GCC keeps 16-element arrays
// on the stack.
IICS_TARGET_AVX512 inline __attribute__((always_inline)) __m512 sum16(
    __m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5, __m512 v6, __m512 v7,
    __m512 v8, __m512 v9, __m512 v10, __m512 v11, __m512 v12, __m512 v13, __m512 v14,
    __m512 v15) {
  const __m512 w0 = fold128(fold256(v0, v1), fold256(v2, v3));
  const __m512 w1 = fold128(fold256(v4, v5), fold256(v6, v7));
  const __m512 w2 = fold128(fold256(v8, v9), fold256(v10, v11));
  const __m512 w3 = fold128(fold256(v12, v13), fold256(v14, v15));
  return fold32(fold64(w0, w1), fold64(w2, w3));
}

struct Avx512Kernel {
  static constexpr int MR = 4, NR = 6, VL = 16;  // 24 accumulators + 4 row vectors + 1 column vector
  template <bool kDot>
  IICS_TARGET_AVX512 static inline __attribute__((always_inline)) void loop(
      const float* pa, const float* const* b, int64_t k0, int64_t kv, int64_t reps, float* acc) {
    __m512 c[MR][NR];
    IICS_UNROLL for (int r = 0; r < MR; ++r)
      IICS_UNROLL for (int q = 0; q < NR; ++q) c[r][q] = _mm512_setzero_ps();
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t it = 0; it < reps; ++it) {
      const float* p = pa;
      for (int64_t k = k0; k + VL <= kv; k += VL, p += MR * VL) {
        __m512 av[MR];
        IICS_UNROLL for (int r = 0; r < MR; ++r) av[r] = _mm512_loadu_ps(p + r * VL);
        IICS_UNROLL for (int q = 0; q < NR; ++q) {
          __m512 bq = _mm512_loadu_ps(b[q] + k);
          keep_in_register(bq);
          IICS_UNROLL for (int r = 0; r < MR; ++r)
            c[r][q] = kDot ? _mm512_fmadd_ps(av[r], bq, c[r][q])
                           : _mm512_fmadd_ps(_mm512_min_ps(av[r], bq), one, c[r][q]);
        }
      }
    }
    // Slot s of a tree gets accumulator m = 4 (s % 4) + s / 4 (at c[m / 6][m % 6]), so lane m
    // of its result is accumulator m's sum: acc[0..16) from the first tree, acc[16..24) from
    // the second.
#define IICS_C(m) c[(m) / NR][(m) % NR]
    const __m512 z = _mm512_setzero_ps();
    const __m512 lo = sum16(IICS_C(0), IICS_C(4), IICS_C(8), IICS_C(12), IICS_C(1), IICS_C(5),
                            IICS_C(9), IICS_C(13), IICS_C(2), IICS_C(6), IICS_C(10), IICS_C(14),
                            IICS_C(3), IICS_C(7), IICS_C(11), IICS_C(15));
    const __m512 hi = sum16(IICS_C(16), IICS_C(20), z, z, IICS_C(17), IICS_C(21), z, z, IICS_C(18),
                            IICS_C(22), z, z, IICS_C(19), IICS_C(23), z, z);
#undef IICS_C
    _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), lo));
    _mm256_storeu_ps(acc + 16,
                     _mm256_add_ps(_mm256_loadu_ps(acc + 16), _mm512_castps512_ps256(hi)));
  }
};
#pragma GCC diagnostic pop
static_assert(Avx512Kernel::MR * Avx512Kernel::NR == 24, "the reduction tree is written for 24");
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

// The packed rows of a row block (64-byte aligned), kept for the block's next tiles: packing
// each tile's rows anew read every row block once a column tile and cost ~15% of the sweep.
struct PackedRows {
  std::vector<float> buf;
  const float* src = nullptr;  // the packed block: rows [i0, i1), dims [0, dv) of `src`
  int64_t lda = -1, i0 = -1, i1 = -1, dv = -1;

  // Rows [i0, i1) of a (row stride lda), dims [0, dv) packed panel by panel (see pack_rows): panel
  // ir / MR starts at the result + ir * dv. Rows past i1 repeat row i1 - 1.
  template <int MR, int VL>
  const float* get(const float* a, int64_t lda_, int64_t i0_, int64_t i1_, int64_t dv_) {
    if (src == a && lda == lda_ && i0 == i0_ && i1 == i1_ && dv == dv_) return aligned();
    buf.resize(static_cast<size_t>(kMB * dv_ + 16));
    float* p = aligned();
    for (int64_t ir = 0; ir < i1_ - i0_; ir += MR) {
      const float* ap[MR];
      clamped_rows<MR>(a, lda_, i0_, ir, i1_ - i0_, ap);
      pack_rows<MR, VL>(ap, 0, dv_, p + ir * dv_);
    }
    src = a, lda = lda_, i0 = i0_, i1 = i1_, dv = dv_;
    return p;
  }
  float* aligned() {
    const auto at = reinterpret_cast<uintptr_t>(buf.data());
    return buf.data() + ((64 - at % 64) % 64) / sizeof(float);
  }
};

// A thread's working memory: a tile's sums of minima and dot products (kMB x kNB each) and the
// packed rows of the scores and of the features.
struct Scratch {
  std::vector<float> smin = std::vector<float>(kMB * kNB);
  std::vector<float> sdot = std::vector<float>(kMB * kNB);
  PackedRows scores, feats;
};

// sum[(i - i0) * kNB + (j - j0)] = sum_k term(a[i][k], b[j][k]) for the pairs of rows [i0, i1)
// of `a` x rows [j0, j1) of `b` (kDot: dot products, else sums of minima). Chunk by chunk of
// dims, each column
// micro-panel (kept in L1) meets every packed row micro-panel (streamed from L2).
template <class K, bool kDot>
void pair_sum_tile(const float* a, int64_t lda, int64_t i0, int64_t i1, const float* b,
                   int64_t ldb, int64_t j0, int64_t j1, int64_t dim, PackedRows& packed,
                   float* sum, const TileFilter& filter) {
  const int64_t mi = i1 - i0, nj = j1 - j0, dv = dim / K::VL * K::VL;
  const float* pack = packed.get<K::MR, K::VL>(a, lda, i0, i1, dv);
  std::fill(sum, sum + kMB * kNB, 0.f);
  for (int64_t k0 = 0; k0 < dim; k0 += kKC) {
    const int64_t k1 = std::min(dim, k0 + kKC), kv = std::min(dv, k1);
    for (int64_t jc = 0; jc < nj; jc += K::NR) {
      const int64_t je = j0 + std::min<int64_t>(jc + K::NR, nj) - 1;
      const float* bp[K::NR];
      clamped_rows<K::NR>(b, ldb, j0, jc, nj, bp);
      for (int64_t ir = 0; ir < mi; ir += K::MR) {
        const int64_t ie = i0 + std::min<int64_t>(ir + K::MR, mi) - 1;
        if (!filter.want(i0 + ir, ie, j0 + jc, je)) continue;
        float acc[K::MR * K::NR] = {};
        K::template loop<kDot>(pack + ir * dv + k0 * K::MR, bp, k0, kv, 1, acc);
        if (kv < k1) {
          const float* ap[K::MR];
          clamped_rows<K::MR>(a, lda, i0, ir, mi, ap);
          pair_sum_tail<kDot, K::MR, K::NR>(ap, bp, kv, k1, acc);
        }
        for (int r = 0; r < K::MR; ++r)
          for (int q = 0; q < K::NR; ++q) sum[(ir + r) * kNB + jc + q] += acc[r * K::NR + q];
      }
    }
  }
}

// The ceiling probe: the micro-kernel's D loop alone (K::loop: the same loads, min and
// accumulations as the tiles, the accumulators in registers across all repetitions, one
// reduction at the very end), over and over on a packed row micro-panel and NR column rows of
// kProbeK dims that stay in L1 (10 rows x 1 KB): no memory traffic, no per-chunk work. Returns
// pair-dims.
constexpr int64_t kProbeK = 256;

template <class K>
double min_sum_probe(int64_t reps) {
  std::vector<float> buf((K::MR + K::NR) * kProbeK);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i % 97) * 0.01f;
  const float* ap[K::MR];
  const float* bp[K::NR];
  for (int r = 0; r < K::MR; ++r) ap[r] = buf.data() + r * kProbeK;
  for (int q = 0; q < K::NR; ++q) bp[q] = buf.data() + (K::MR + q) * kProbeK;
  std::vector<float> pa(K::MR * kProbeK);
  pack_rows<K::MR, K::VL>(ap, 0, kProbeK, pa.data());
  float acc[K::MR * K::NR] = {};
  K::template loop<false>(pa.data(), bp, 0, kProbeK, reps, acc);
  asm volatile("" : : "r"(acc) : "memory");  // the sums are kept
  return static_cast<double>(reps) * K::MR * K::NR * kProbeK;
}

using TileFn = void (*)(bool, const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                        int64_t, int64_t, int64_t, PackedRows&, float*, const TileFilter&);
using ProbeFn = double (*)(int64_t);

// One tile of dot products (dot) or sums of minima, through variant K.
#define IICS_TILE_BODY(K)                                                                      \
  if (dot)                                                                                     \
    pair_sum_tile<K, true>(a, lda, i0, i1, b, ldb, j0, j1, dim, packed, sum, f);               \
  else                                                                                         \
    pair_sum_tile<K, false>(a, lda, i0, i1, b, ldb, j0, j1, dim, packed, sum, f);
#define IICS_TILE_ARGS                                                                         \
  bool dot, const float *a, int64_t lda, int64_t i0, int64_t i1, const float *b, int64_t ldb,  \
      int64_t j0, int64_t j1, int64_t dim, PackedRows &packed, float *sum, const TileFilter &f

void tile_scalar(IICS_TILE_ARGS) { IICS_TILE_BODY(ScalarKernel) }
double probe_scalar(int64_t reps) { return min_sum_probe<ScalarKernel>(reps); }

#ifdef IICS_X86_SIMD
// `flatten` inlines the generic tile loop and the micro-kernel into these target functions, so
// the whole loop nest is compiled for the instruction set.
IICS_TARGET_AVX2 __attribute__((flatten)) void tile_avx2(IICS_TILE_ARGS) { IICS_TILE_BODY(Avx2Kernel) }
IICS_TARGET_AVX2 __attribute__((flatten)) double probe_avx2(int64_t reps) {
  return min_sum_probe<Avx2Kernel>(reps);
}
IICS_TARGET_AVX512 __attribute__((flatten)) void tile_avx512(IICS_TILE_ARGS) {
  IICS_TILE_BODY(Avx512Kernel)
}
IICS_TARGET_AVX512 __attribute__((flatten)) double probe_avx512(int64_t reps) {
  return min_sum_probe<Avx512Kernel>(reps);
}
#endif
#undef IICS_TILE_ARGS
#undef IICS_TILE_BODY

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

// The threads take runs of up to kRun column tiles of one row block, so a block's packed rows
// serve several tiles on any number of threads (tile by tile, many threads would mostly repack).
constexpr int64_t kRun = 4;

// Runs of the column tiles [c0, c1) (steps of kNB) of each row block i0 of [r0, r1) (steps of
// kMB), c0 = first(i0): {i0, first column, end column}.
template <class First>
std::vector<std::array<int64_t, 3>> tile_runs(int64_t r0, int64_t r1, First first, int64_t c1) {
  std::vector<std::array<int64_t, 3>> runs;
  for (int64_t i0 = r0; i0 < r1; i0 += kMB)
    for (int64_t j0 = first(i0); j0 < c1; j0 += kRun * kNB)
      runs.push_back({i0, j0, std::min(c1, j0 + kRun * kNB)});
  return runs;
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
  const auto runs = tile_runs(0, m, [](int64_t) { return int64_t(0); }, p);
  const TileFilter all;
#pragma omp parallel
  {
    Scratch scratch;
    const float* smin = scratch.smin.data();
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < runs.size(); ++t) {
      const auto [i0, c0, c1] = runs[t];
      const int64_t i1 = std::min(m, i0 + kMB);
      for (int64_t j0 = c0; j0 < c1; j0 += kNB) {
        const int64_t j1 = std::min(c1, j0 + kNB);
        tile(false, a, lda, i0, i1, b, ldb, j0, j1, d, scratch.scores, scratch.smin.data(), all);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j)
            out[i * ldo + j] = jaccard_from_min(smin[(i - i0) * kNB + (j - j0)], sa[i], sb[j]);
      }
    }
  }
}

void inter_camera_rows_cpu(const float* scores, int64_t lds, const float* rowsum, int64_t dim,
                           const float* feats, int64_t ldf, int64_t fdim, const int64_t* cam,
                           int64_t n, int64_t r0, int64_t r1, float mu, InterCameraMode mode,
                           bool square, float* out, int64_t out_base, const std::string& isa) {
  const TileFn tile = variant(isa).tile;
  // Work list: runs of the cache tiles (i0, j0 >= i0) of rows [r0, r1) x columns [r0, n).
  const auto runs = tile_runs(r0, r1, [](int64_t i0) { return i0; }, n);
  const bool need_l1 = mode != InterCameraMode::kFeature;
  const bool need_cos = mode != InterCameraMode::kJaccard;
  const bool masked = mode == InterCameraMode::kEq5;
  // Micro-tiles below the diagonal are skipped and, for the sums of minima under Eq. 5, those
  // whose pairs all share one camera (J is masked there).
  TileFilter upper, filter;
  upper.upper = filter.upper = true;
  filter.cam = masked ? cam : nullptr;
#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < runs.size(); ++t) {
      const auto [i0, c0, c1] = runs[t];
      const int64_t i1 = std::min(r1, i0 + kMB);
      for (int64_t j0 = c0; j0 < c1; j0 += kNB) {
        const int64_t j1 = std::min(c1, j0 + kNB);
        if (need_cos)
          tile(true, feats, ldf, i0, i1, feats, ldf, j0, j1, fdim, scratch.feats,
               scratch.sdot.data(), upper);
        if (need_l1)
          tile(false, scores, lds, i0, i1, scores, lds, j0, j1, dim, scratch.scores,
               scratch.smin.data(), filter);
        for (int64_t i = i0; i < i1; ++i) {
          const float* g = scratch.sdot.data() + (i - i0) * kNB - j0;  // g[j] = cos(f_i, f_j)
          const float* sm = scratch.smin.data() + (i - i0) * kNB - j0;  // sm[j] = Smin(i, j)
          float* row = square ? out + i * n : out + (condensed_row(n, i) - out_base) - (i + 1);
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
            float v;
            if (mode == InterCameraMode::kJaccard) {
              v = 1.f - jaccard_from_min(sm[j], rowsum[i], rowsum[j]);
            } else {
              v = 1.f - g[j];
              if (masked && cam[i] != cam[j])
                v -= mu * jaccard_from_min(sm[j], rowsum[i], rowsum[j]);
            }
            row[j] = v;
            if (square) out[j * n + i] = v;
          }
        }
      }
    }
  }
  if (square)
    for (int64_t i = r0; i < r1; ++i) out[i * n + i] = 0.f;
}

}  // namespace iics
