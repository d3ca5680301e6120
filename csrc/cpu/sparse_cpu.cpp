// The sparse inter-camera round's native steps: see cpu/sparse_cpu.h. The Jaccard pairs follow
// the dense re-ranking's float16 accumulation (cpu/rerank_cpu.cpp) step for step; the linkage is
// the textbook priority-queue agglomeration (merge the closest pair, update its neighbours by
// Lance-Williams) restricted to a graph, with model sums for pairs the graph does not hold. The
// float16 steps round each operation on their own (round_half), so contraction cannot change them.
#include "cpu/sparse_cpu.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu/isa.h"
#include "parallel.h"

namespace iics {

using rerank_parts::round_half;
using rerank_parts::Sparse;

namespace {

constexpr int64_t kParallelMin = 4096;  // below this much work a loop stays on one thread

// <a, b> over d floats, float64 accumulation in sixteen lanes (independent chains, so the
// vectorised loop is not held to one add's latency: the merges compute thousands a step).
inline double dot(const float* a, const float* b, int64_t d) {
  double s[16] = {};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16)
    for (int u = 0; u < 16; ++u) s[u] += static_cast<double>(a[t + u]) * b[t + u];
  for (int u = 0; t < d; ++t, ++u) s[u] += static_cast<double>(a[t]) * b[t];
  for (int w = 8; w >= 1; w /= 2)
    for (int u = 0; u < w; ++u) s[u] += s[u + w];
  return s[0];
}

}  // namespace

void sparse_min_sums_cpu(const int64_t* ptr, const int32_t* col, const float* val,
                         const int32_t* ei, const int32_t* ej, int64_t edges, float* out,
                         const int64_t* offsets, int blocks, const float* tail,
                         double tail_weight) {
#pragma omp parallel if (edges >= kParallelMin)
  {
    std::vector<int64_t> kept_a(blocks), kept_b(blocks), kept_both(blocks);
#pragma omp for schedule(dynamic, 1024)
    for (int64_t e = 0; e < edges; ++e) {
      int64_t p = ptr[ei[e]], pe = ptr[ei[e] + 1], q = ptr[ej[e]], qe = ptr[ej[e] + 1];
      const float* ta = tail ? tail + static_cast<int64_t>(ei[e]) * blocks : nullptr;
      const float* tb = tail ? tail + static_cast<int64_t>(ej[e]) * blocks : nullptr;
      std::fill(kept_a.begin(), kept_a.end(), 0);
      std::fill(kept_b.begin(), kept_b.end(), 0);
      std::fill(kept_both.begin(), kept_both.end(), 0);
      int blk = 0;  // the block of the column at hand (columns only grow)
      auto block_of = [&](int32_t c) {
        while (blk + 1 < blocks && offsets[blk + 1] <= c) ++blk;  // a stray column: last block
        return blk;
      };
      double m = 0.0, t = 0.0;  // kept on both sides; with a tail on either side
      while (p < pe || q < qe) {  // merge of two ascending column lists
        if (q >= qe || (p < pe && col[p] < col[q])) {
          if (tail) {
            const int b = block_of(col[p]);
            ++kept_a[b];
            t += std::min(val[p], tb[b]);
          }
          ++p;
        } else if (p >= pe || col[q] < col[p]) {
          if (tail) {
            const int b = block_of(col[q]);
            ++kept_b[b];
            t += std::min(val[q], ta[b]);
          }
          ++q;
        } else {
          if (tail) {
            const int b = block_of(col[p]);
            ++kept_both[b];
          }
          m += std::min(val[p], val[q]);
          ++p;
          ++q;
        }
        if (!tail && (p >= pe || q >= qe)) break;  // nothing more to share
      }
      for (int b = 0; b < blocks; ++b) {
        const int64_t both_dropped = (offsets[b + 1] - offsets[b]) - kept_a[b] - kept_b[b] -
                                     kept_both[b];
        t += static_cast<double>(both_dropped) * std::min(ta[b], tb[b]);
      }
      out[e] = static_cast<float>(m + tail_weight * t);
    }
  }
}

namespace {

// Per-block layout of a CSR row for the tile kernel: start[b] the first entry of block b
// (start[blocks] = the row's end), low[b] the block's smallest kept value (+inf when none).
void row_blocks(const int64_t* ptr, const int32_t* col, const float* val, int32_t row,
                const int64_t* offsets, int blocks, int64_t* start, float* low) {
  const int64_t p = ptr[row], pe = ptr[row + 1];
  std::fill(low, low + blocks, std::numeric_limits<float>::infinity());
  int b = 0;
  start[0] = p;
  for (int64_t q = p; q < pe; ++q) {
    while (b + 1 < blocks && offsets[b + 1] <= col[q]) start[++b] = q;
    low[b] = std::min(low[b], val[q]);
  }
  for (++b; b <= blocks; ++b) start[b] = pe;
}

// One pair's kept-on-both sums: j's entries (blocks b at js[b] .. js[b + 1]) looked up in the
// dense spread of i's row (-1: not kept); returns the sum of min(i's value, j's value) over the
// hits and writes each block's hit count to nb.
double lookup_plain(const float* dense, const int32_t* col, const float* val, const int64_t* js,
                    int blocks, int32_t* nb) {
  double m = 0.0;
  for (int b = 0; b < blocks; ++b) {
    int32_t hits = 0;
    for (int64_t q = js[b]; q < js[b + 1]; ++q) {
      const float v = dense[col[q]];
      const bool hit = v >= 0.0f;
      m += hit ? std::min(v, val[q]) : 0.0f;
      hits += hit;
    }
    nb[b] = hits;
  }
  return m;
}

#ifdef IICS_X86_SIMD
// lookup_plain with 16 entries a gather; the minima are summed in float64 lanes.
IICS_TARGET_AVX512 double lookup_avx512(const float* dense, const int32_t* col, const float* val,
                                        const int64_t* js, int blocks, int32_t* nb) {
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  const __m512 zero = _mm512_setzero_ps();
  for (int b = 0; b < blocks; ++b) {
    int32_t hits = 0;
    for (int64_t q = js[b]; q < js[b + 1]; q += 16) {
      const int64_t left = js[b + 1] - q;
      const __mmask16 k = static_cast<__mmask16>(left >= 16 ? 0xffffu : (1u << left) - 1);
      const __m512i idx = _mm512_maskz_loadu_epi32(k, col + q);
      const __m512 v = _mm512_mask_i32gather_ps(zero, k, idx, dense, 4);
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(k, v, zero, _CMP_GE_OQ);
      const __m512 mn = _mm512_maskz_min_ps(hit, v, _mm512_maskz_loadu_ps(k, val + q));
      lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(mn)));
      hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(mn), 1))));
      hits += __builtin_popcount(static_cast<unsigned>(hit));
    }
    nb[b] = hits;
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}
#endif

using LookupFn = double (*)(const float*, const int32_t*, const float*, const int64_t*, int, int32_t*);

LookupFn lookup_variant(const std::string& isa) {
#ifdef IICS_X86_SIMD
  return pick_isa<LookupFn>(isa, lookup_plain, lookup_avx512, true);
#else
  return pick_isa<LookupFn>(isa, lookup_plain, lookup_plain, false);
#endif
}

}  // namespace

void sparse_tile_jaccard_cpu(const int64_t* ptr, const int32_t* col, const float* val,
                             const float* total, const int32_t* rows, const int64_t* rows_ptr,
                             const int32_t* cols, const int64_t* cols_ptr, int64_t tiles,
                             const int64_t* offsets, int blocks, const float* tail,
                             double tail_weight, const int64_t* cams, float* out,
                             const std::string& isa) {
  const LookupFn lookup = lookup_variant(isa);
  std::vector<int64_t> base(tiles + 1, 0);
  for (int64_t t = 0; t < tiles; ++t)
    base[t + 1] = base[t] + (rows_ptr[t + 1] - rows_ptr[t]) * (cols_ptr[t + 1] - cols_ptr[t]);
  const int64_t ncols = offsets[blocks];
#pragma omp parallel if (base[tiles] >= kParallelMin)
  {
    std::vector<float> dense(ncols, -1.0f);  // the query row's kept values (-1: not kept)
    std::vector<int64_t> cstart, qstart(blocks + 1);  // per-block layouts
    std::vector<float> clow, qlow(blocks);
    std::vector<int32_t> nbs(blocks);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t nr = rows_ptr[t + 1] - rows_ptr[t], nc = cols_ptr[t + 1] - cols_ptr[t];
      if (nr == 0 || nc == 0) continue;
      const int32_t* rt = rows + rows_ptr[t];
      const int32_t* ct = cols + cols_ptr[t];
      cstart.resize(nc * (blocks + 1));
      clow.resize(nc * blocks);
      for (int64_t x = 0; x < nc; ++x)
        row_blocks(ptr, col, val, ct[x], offsets, blocks, &cstart[x * (blocks + 1)], &clow[x * blocks]);
      for (int64_t y = 0; y < nr; ++y) {
        const int32_t i = rt[y];
        for (int64_t p = ptr[i]; p < ptr[i + 1]; ++p) dense[col[p]] = val[p];
        row_blocks(ptr, col, val, i, offsets, blocks, qstart.data(), qlow.data());
        const float* ti = tail ? tail + static_cast<int64_t>(i) * blocks : nullptr;
        float* o = out + base[t] + y * nc;
        for (int64_t x = 0; x < nc; ++x) {
          const int32_t j = ct[x];
          if (cams && cams[i] == cams[j]) {  // Eq. 5 masks pairs within a camera
            o[x] = 0.0f;
            continue;
          }
          const int64_t* js = &cstart[x * (blocks + 1)];
          const float* tj = tail ? tail + static_cast<int64_t>(j) * blocks : nullptr;
          // kept on both sides: min of the two values (j's entries looked up in i's row)
          const double m = lookup(dense.data(), col, val, js, blocks, nbs.data());
          double tsum = 0.0;
          for (int b = 0; b < blocks && tail; ++b) {
            const int32_t nb = nbs[b];
            // the tail terms: kept on one side only, min(value, the other's tail); dropped on
            // both, min of the tails. A side whose kept values all reach the other's tail adds
            // count x tail; otherwise the block's entries are summed one by one.
            const float ta = ti[b], tb = tj[b];
            const int64_t ci = qstart[b + 1] - qstart[b], cj = js[b + 1] - js[b];
            const int64_t dropped = (offsets[b + 1] - offsets[b]) - ci - cj + nb;
            double tt = static_cast<double>(dropped) * std::min(ta, tb);
            if (tb <= qlow[b] && ta <= clow[x * blocks + b]) {
              tt += static_cast<double>(ci - nb) * tb + static_cast<double>(cj - nb) * ta;
            } else {
              for (int64_t p = qstart[b]; p < qstart[b + 1]; ++p) tt += std::min(val[p], tb);
              for (int64_t q = js[b]; q < js[b + 1]; ++q) {
                const float v = dense[col[q]];
                tt += v >= 0.0f ? -static_cast<double>(std::min(v, tb))
                                : static_cast<double>(std::min(val[q], ta));
              }
            }
            tsum += tt;
          }
          const double mm = static_cast<float>(m + tail_weight * tsum);
          const double den = static_cast<double>(total[i]) + total[j] - mm;
          o[x] = den > 0 ? static_cast<float>(mm / den) : 0.0f;
        }
        for (int64_t p = ptr[i]; p < ptr[i + 1]; ++p) dense[col[p]] = -1.0f;
      }
    }
  }
}

namespace {

// Whether (a, ia) ranks below (b, ib) in a near (largest first) or far (smallest first) list,
// ties by the smaller id: a strict total order, so the lists kept do not depend on the order
// the values arrive in.
template <bool Near>
inline bool worse(float a, int32_t ia, float b, int32_t ib) {
  if (a != b) return Near ? a < b : a > b;
  return ia > ib;
}

// Replaces the root of a heap of k (value, id) whose root is its worst entry with (v, id) and
// restores the order.
template <bool Near>
void heap_replace_root(float* val, int32_t* ids, int k, float v, int32_t id) {
  int pos = 0;
  for (;;) {
    const int l = 2 * pos + 1;
    if (l >= k) break;
    const int w = (l + 1 < k && worse<Near>(val[l + 1], ids[l + 1], val[l], ids[l])) ? l + 1 : l;
    if (!worse<Near>(val[w], ids[w], v, id)) break;
    val[pos] = val[w];
    ids[pos] = ids[w];
    pos = w;
  }
  val[pos] = v;
  ids[pos] = id;
}

constexpr int64_t kTopChunk = 64;  // values tested at once against the lists' roots

}  // namespace

void top_update_cpu(const float* p, int64_t r, int64_t c, int64_t gr0, int64_t gc0, int64_t r0,
                    float* near_c, int32_t* near_i, int kn, float* far_c, int32_t* far_i, int kf,
                    bool rows_side, bool cols_side) {
  if (rows_side) {
#pragma omp parallel for schedule(dynamic, 16) if (r * c >= kParallelMin)
    for (int64_t i = 0; i < r; ++i) {
      const float* row = p + i * c;
      const int64_t h = gr0 - r0 + i;
      float* nc = near_c + h * kn;
      int32_t* ni = near_i + h * kn;
      float* fc = far_c + h * kf;
      int32_t* fi = far_i + h * kf;
      float tn = nc[0], tf = fc[0];
      for (int64_t j0 = 0; j0 < c; j0 += kTopChunk) {
        const int64_t j1 = std::min(c, j0 + kTopChunk);
        int hit = 0;
        for (int64_t j = j0; j < j1; ++j) hit |= (row[j] >= tn) | (row[j] <= tf);
        if (!hit) continue;
        for (int64_t j = j0; j < j1; ++j) {
          const float v = row[j];
          const int32_t id = static_cast<int32_t>(gc0 + j);
          if (worse<true>(nc[0], ni[0], v, id)) {
            heap_replace_root<true>(nc, ni, kn, v, id);
            tn = nc[0];
          }
          if (worse<false>(fc[0], fi[0], v, id)) {
            heap_replace_root<false>(fc, fi, kf, v, id);
            tf = fc[0];
          }
        }
      }
    }
  }
  if (cols_side) {
    // one contiguous range of columns a thread, every row scanned against their roots
    const int chunks = max_threads();
#pragma omp parallel for schedule(static, 1) if (r * c >= kParallelMin)
    for (int t = 0; t < chunks; ++t) {
      const int64_t ja = c * t / chunks, jb = c * (t + 1) / chunks;
      std::vector<float> tn(jb - ja), tf(jb - ja);
      for (int64_t j = ja; j < jb; ++j) {
        tn[j - ja] = near_c[(gc0 - r0 + j) * kn];
        tf[j - ja] = far_c[(gc0 - r0 + j) * kf];
      }
      for (int64_t i = 0; i < r; ++i) {
        const float* row = p + i * c;
        for (int64_t j0 = ja; j0 < jb; j0 += kTopChunk) {
          const int64_t j1 = std::min(jb, j0 + kTopChunk);
          int hit = 0;
          for (int64_t j = j0; j < j1; ++j) hit |= (row[j] >= tn[j - ja]) | (row[j] <= tf[j - ja]);
          if (!hit) continue;
          const int32_t id = static_cast<int32_t>(gr0 + i);
          for (int64_t j = j0; j < j1; ++j) {
            const float v = row[j];
            const int64_t h = gc0 - r0 + j;
            if (worse<true>(near_c[h * kn], near_i[h * kn], v, id)) {
              heap_replace_root<true>(near_c + h * kn, near_i + h * kn, kn, v, id);
              tn[j - ja] = near_c[h * kn];
            }
            if (worse<false>(far_c[h * kf], far_i[h * kf], v, id)) {
              heap_replace_root<false>(far_c + h * kf, far_i + h * kf, kf, v, id);
              tf[j - ja] = far_c[h * kf];
            }
          }
        }
      }
    }
  }
}

void pair_find_cpu(const int64_t* ptr, const int32_t* col, const int32_t* qi, const int32_t* qj, int64_t q,
                   int64_t* out) {
#pragma omp parallel for schedule(static, 4096) if (q >= kParallelMin)
  for (int64_t e = 0; e < q; ++e) {
    const int32_t* a = col + ptr[qi[e]];
    const int32_t* b = col + ptr[qi[e] + 1];
    const int32_t* p = std::lower_bound(a, b, qj[e]);
    out[e] = (p != b && *p == qj[e]) ? p - col : -1;
  }
}

namespace {
// Each of the m lists best first in the lists' own order (`worse`).
template <bool Near>
void top_sort_lists(float* val, int32_t* ids, int64_t m, int k) {
#pragma omp parallel if (m * k >= kParallelMin)
  {
    std::vector<std::pair<float, int32_t>> row(k);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      for (int e = 0; e < k; ++e) row[e] = {val[i * k + e], ids[i * k + e]};
      std::sort(row.begin(), row.end(), [](const auto& a, const auto& b) {
        return worse<Near>(b.first, b.second, a.first, a.second);
      });
      for (int e = 0; e < k; ++e) {
        val[i * k + e] = row[e].first;
        ids[i * k + e] = row[e].second;
      }
    }
  }
}
}  // namespace

void top_sort_cpu(float* val, int32_t* ids, int64_t m, int k, bool descending) {
  if (descending)
    top_sort_lists<true>(val, ids, m, k);
  else
    top_sort_lists<false>(val, ids, m, k);
}

void pair_dots_cpu(const float* f, int64_t d, const int32_t* ei, const int32_t* ej, int64_t edges,
                   float* out) {
#pragma omp parallel for schedule(static, 256) if (edges * d >= kParallelMin * 64)
  for (int64_t e = 0; e < edges; ++e)
    out[e] = static_cast<float>(dot(f + static_cast<int64_t>(ei[e]) * d, f + static_cast<int64_t>(ej[e]) * d, d));
}

JaccardPairs k_reciprocal_pairs_cpu(Sparse v, const float* keys, int64_t n, int kk, int k2,
                                    const std::vector<int32_t>& nbr) {
  rerank_parts::weigh_rows(v, keys);
  if (k2 != 1) v = rerank_parts::expand_v(v, n, kk, k2, nbr);
  const Sparse inverted = rerank_parts::transpose(v, n);
  // One contiguous chunk of rows a thread, joined in row order.
  const int chunks = max_threads();
  std::vector<JaccardPairs> part(chunks);
#pragma omp parallel for schedule(static, 1) if (n >= 1024)
  for (int t = 0; t < chunks; ++t) {
    std::vector<float> common(n, 0.0f);
    std::vector<int32_t> touched;
    JaccardPairs& out = part[t];
    for (int64_t i = n * t / chunks; i < n * (t + 1) / chunks; ++i) {
      // m[k] = sum over shared columns c (ascending) of min(V[i, c], V[k, c]), k > i, in
      // float16 as the dense re-ranking accumulates it.
      for (int64_t e = v.ptr[i]; e < v.ptr[i + 1]; ++e) {
        const int32_t c = v.col[e];
        const float vi = v.val[e];
        const int32_t* rows = inverted.col.data() + inverted.ptr[c];
        const int32_t* rows_end = inverted.col.data() + inverted.ptr[c + 1];
        const int32_t* start = std::upper_bound(rows, rows_end, static_cast<int32_t>(i));
        const float* vals = inverted.val.data() + (start - inverted.col.data());
        for (const int32_t* k = start; k != rows_end; ++k, ++vals) {
          float& acc = common[*k];
          if (acc == 0.0f) touched.push_back(*k);
          acc = round_half(acc + std::min(vi, *vals));
        }
      }
      std::sort(touched.begin(), touched.end());
      for (const int32_t k : touched) {
        out.i.push_back(static_cast<int32_t>(i));
        out.j.push_back(k);
        out.m.push_back(common[k]);
        common[k] = 0.0f;
      }
      touched.clear();
    }
  }
  JaccardPairs all;
  size_t total = 0;
  for (const auto& p : part) total += p.i.size();
  all.i.reserve(total);
  all.j.reserve(total);
  all.m.reserve(total);
  for (auto& p : part) {
    all.i.insert(all.i.end(), p.i.begin(), p.i.end());
    all.j.insert(all.j.end(), p.j.begin(), p.j.end());
    all.m.insert(all.m.end(), p.m.begin(), p.m.end());
    JaccardPairs().i.swap(p.i);
  }
  return all;
}

// ----------------------------------------------------------------------------- linkage

namespace {
inline uint32_t neighbour_hash(int32_t key) {  // lowbias32: spreads nearby slots
  uint32_t h = static_cast<uint32_t>(key);
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}
}  // namespace

size_t SparseLinkage::Neighbours::home(int32_t key) const {  // the hash scaled to the buckets
  return static_cast<size_t>((static_cast<uint64_t>(neighbour_hash(key)) * buckets()) >> 32);
}

const int32_t* SparseLinkage::Neighbours::find(int32_t key) const {
  if (slots_.empty()) return nullptr;
  const size_t n = buckets();
  for (size_t i = home(key);; i = i + 1 == n ? 0 : i + 1) {
    if (slots_[2 * i] == key) return &slots_[2 * i + 1];
    if (slots_[2 * i] < 0) return nullptr;
  }
}

int32_t SparseLinkage::Neighbours::at(int32_t key) const {
  const int32_t* v = find(key);
  if (!v) throw std::out_of_range("SparseLinkage: slots are not adjacent");
  return *v;
}

void SparseLinkage::Neighbours::rehash(size_t buckets) {
  std::vector<int32_t> old;
  old.swap(slots_);
  slots_.assign(2 * buckets, -1);
  size_ = 0;
  for (size_t i = 0; i < old.size(); i += 2)
    if (old[i] >= 0) set(old[i], old[i + 1]);
}

void SparseLinkage::Neighbours::reserve(size_t count) {
  const size_t want = std::max<size_t>(4, count * 4 / 3 + 1);  // load at most 3/4
  if (want > buckets()) rehash(want);
}

void SparseLinkage::Neighbours::set(int32_t key, int32_t value) {
  if ((size_ + 1) * 4 > buckets() * 3) rehash(std::max<size_t>(4, buckets() * 3 / 2 + 1));
  const size_t n = buckets();
  for (size_t i = home(key);; i = i + 1 == n ? 0 : i + 1) {
    if (slots_[2 * i] == key) {
      slots_[2 * i + 1] = value;
      return;
    }
    if (slots_[2 * i] < 0) {
      slots_[2 * i] = key;
      slots_[2 * i + 1] = value;
      ++size_;
      return;
    }
  }
}

void SparseLinkage::Neighbours::erase(int32_t key) {
  const int32_t* v = find(key);
  if (!v) return;
  const size_t n = buckets();
  size_t hole = static_cast<size_t>(v - slots_.data()) / 2;
  // backward shift: an entry further along the probe run moves into the hole unless its home
  // bucket lies cyclically in (hole, j]
  for (size_t j = hole + 1 == n ? 0 : hole + 1; slots_[2 * j] >= 0; j = j + 1 == n ? 0 : j + 1) {
    const size_t h = home(slots_[2 * j]);
    const bool stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
    if (stays) continue;
    slots_[2 * hole] = slots_[2 * j];
    slots_[2 * hole + 1] = slots_[2 * j + 1];
    hole = j;
  }
  slots_[2 * hole] = -1;
  --size_;
}

SparseLinkage::SparseLinkage(int64_t n, int64_t d, float* x, float* g, const double* u, double c0)
    : n_(n), d_(d), x_(x), g_(g), symmetric_(g == x), c0_(c0), u_(u, u + n), size_(n, 1.0),
      alive_(n, 1), adj_(n), next_(n, -1), tail_(n),
      bound_(n, std::numeric_limits<double>::infinity()), bound_stamp_(n, 0), live_(n) {
  for (int64_t s = 0; s < n; ++s) tail_[s] = static_cast<int32_t>(s);
}

void SparseLinkage::check_pairs(double margin, int64_t max_rects) {
  checking_ = true;
  margin_ = margin;
  max_rects_ = static_cast<size_t>(max_rects);
}

void SparseLinkage::set_bound(int32_t slot, double value) {
  bound_[slot] = value;
  ++bound_stamp_[slot];
  if (value < std::numeric_limits<double>::infinity())
    bounds_.push(Bound{value, slot, bound_stamp_[slot]});
}

double SparseLinkage::min_bound() {
  while (!bounds_.empty()) {
    const Bound& b = bounds_.top();
    if (alive_[b.slot] && bound_stamp_[b.slot] == b.stamp) return b.value;
    bounds_.pop();
  }
  return std::numeric_limits<double>::infinity();
}

double SparseLinkage::top() {
  while (!heap_.empty()) {
    if (valid(heap_.top())) return heap_.top().dist;
    heap_.pop();  // superseded by a merge
  }
  return std::numeric_limits<double>::infinity();
}

double SparseLinkage::sep(int32_t a, int32_t b) const {
  const float* xa = x_ + static_cast<int64_t>(a) * d_;
  const float* xb = x_ + static_cast<int64_t>(b) * d_;
  const double na = size_[a], nb = size_[b];
  double cross;
  if (symmetric_) {
    cross = dot(xa, xb, d_);
  } else {
    const float* ga = g_ + static_cast<int64_t>(a) * d_;
    const float* gb = g_ + static_cast<int64_t>(b) * d_;
    cross = 0.5 * (dot(ga, xb, d_) + dot(xa, gb, d_));
  }
  return na * nb * c0_ + 0.5 * (nb * u_[a] + na * u_[b]) - cross;
}

double SparseLinkage::key(int32_t a, int32_t b, const Link& link) const {
  const double model = link.parts < 0 ? 0.0 : parts_[link.parts].model;
  const double height = (link.exact + model) / (size_[a] * size_[b]);
  return link.parts < 0 ? height : height - margin_;
}

int32_t SparseLinkage::entry_link(const Entry& e) const {
  if (!alive_[e.a] || !alive_[e.b]) return -1;
  const int32_t* id = adj_[e.a].find(e.b);
  if (!id) return -1;
  const Link& link = links_[*id];
  return !link.pending && key(e.a, e.b, link) == e.dist ? *id : -1;
}

void SparseLinkage::push(int32_t a, int32_t b, Link& link) {
  if (a > b) std::swap(a, b);
  link.pending = false;
  heap_.push(Entry{key(a, b, link), a, b});
  const size_t links = links_.size() - free_links_.size();
  if (heap_.size() > 2 * links + 1024)
    heap_.drop_invalid([this](const Entry& e) { return valid(e); });
}

namespace {
// A fresh element of `pool`: a freed one reset, else a new one at the end; returns its index.
template <class T>
int32_t take(std::vector<T>& pool, std::vector<int32_t>& freed) {
  if (freed.empty()) {
    pool.emplace_back();
    return static_cast<int32_t>(pool.size() - 1);
  }
  const int32_t id = freed.back();
  freed.pop_back();
  pool[id] = T();
  return id;
}
}  // namespace

int32_t SparseLinkage::new_link(int32_t a, int32_t b) {
  const int32_t id = take(links_, free_links_);
  adj_[a].set(b, id);
  adj_[b].set(a, id);
  return id;
}

void SparseLinkage::orient(Link& link, int32_t slot) {
  if (link.parts < 0) return;
  Parts& p = parts_[link.parts];
  if (p.end_a == slot) return;
  std::swap(p.end_a, p.end_b);
  for (Rect& r : p.rects) r = Rect{r.lo_b, r.hi_b, r.lo_a, r.hi_a};
}

void SparseLinkage::drop_parts(Link& link) {
  if (link.parts < 0) return;
  parts_[link.parts] = Parts();  // releases the rectangles now
  free_parts_.push_back(link.parts);
  link.parts = -1;
}

void SparseLinkage::add_model(Link& link, int32_t end_a, int32_t end_b, double sum, Rect r) {
  if (!checking_) {
    link.exact += sum;
    return;
  }
  if (link.parts < 0) {
    link.parts = take(parts_, free_parts_);
    parts_[link.parts].end_a = end_a;
    parts_[link.parts].end_b = end_b;
  }
  Parts& p = parts_[link.parts];
  p.model += sum;
  if (!p.rects.empty()) {  // extends the last rectangle when adjacent to it
    Rect& q = p.rects.back();
    if (q.lo_b == r.lo_b && q.hi_b == r.hi_b && q.hi_a == r.lo_a) {
      q.hi_a = r.hi_a;
      return;
    }
    if (q.lo_a == r.lo_a && q.hi_a == r.hi_a && q.hi_b == r.lo_b) {
      q.hi_b = r.hi_b;
      return;
    }
  }
  p.rects.push_back(r);
}

void SparseLinkage::add_edges(const int32_t* a, const int32_t* b, const double* s, int64_t count) {
  std::vector<double> model;
  if (s == nullptr) {  // model sums of the new pairs, in parallel
    model.resize(count);
#pragma omp parallel for schedule(dynamic, 256) if (count * d_ >= kParallelMin * 64)
    for (int64_t e = 0; e < count; ++e) model[e] = sep(a[e], b[e]);
  }
  if (links_.empty()) {  // the first graph: sized once, no growth copies of the largest arrays
    links_.reserve(count);
    heap_.reserve(count);
    std::vector<int32_t> degree(n_, 0);
    for (int64_t e = 0; e < count; ++e)
      if (a[e] != b[e]) ++degree[a[e]], ++degree[b[e]];
    for (int64_t v = 0; v < n_; ++v)
      if (degree[v]) adj_[v].reserve(adj_[v].size() + degree[v]);
  }
  for (int64_t e = 0; e < count; ++e) {
    const int32_t p = a[e], q = b[e];
    if (p == q || !alive_[p] || !alive_[q] || adj_[p].contains(q)) continue;
    Link& link = links_[new_link(p, q)];
    if (s)
      link.exact = s[e];
    else
      add_model(link, p, q, model[e], Rect{0, static_cast<int32_t>(size_[p]), 0, static_cast<int32_t>(size_[q])});
    push(p, q, link);
  }
}

void SparseLinkage::pending(int64_t count, std::vector<int32_t>& a, std::vector<int32_t>& b,
                            std::vector<double>& model, std::vector<double>& exact,
                            std::vector<int64_t>& rect_ptr, std::vector<Rect>& rects) {
  const double limit = min_bound() - margin_;
  std::vector<Entry> kept;
  rect_ptr.assign(1, static_cast<int64_t>(rects.size()));
  while (static_cast<int64_t>(a.size()) < count && !heap_.empty()) {
    const Entry e = heap_.top();
    const int32_t id = entry_link(e);
    if (id < 0) {
      heap_.pop();
      continue;
    }
    if (e.dist > limit) break;
    heap_.pop();
    Link& link = links_[id];
    if (link.parts < 0) {
      kept.push_back(e);
      continue;
    }
    orient(link, e.a);
    link.pending = true;
    const Parts& p = parts_[link.parts];
    a.push_back(e.a);
    b.push_back(e.b);
    model.push_back(e.dist + margin_);
    exact.push_back(link.exact);
    rects.insert(rects.end(), p.rects.begin(), p.rects.end());
    rect_ptr.push_back(static_cast<int64_t>(rects.size()));
  }
  for (const Entry& e : kept) heap_.push(e);
}

void SparseLinkage::set_sums(const int32_t* a, const int32_t* b, const double* s, int64_t count) {
  for (int64_t e = 0; e < count; ++e) {
    const int32_t p = a[e], q = b[e];
    if (p == q || !alive_[p] || !alive_[q]) continue;
    const int32_t* id = adj_[p].find(q);
    if (!id) continue;
    Link& link = links_[*id];
    link.exact += s[e];
    drop_parts(link);
    push(p, q, link);
  }
}

void SparseLinkage::members(int32_t slot, std::vector<int32_t>& out) const {
  for (int32_t m = slot; m >= 0; m = next_[m]) out.push_back(m);
}

void SparseLinkage::merge(int32_t keep, int32_t gone, double height) {
  kept_.push_back(keep);
  absorbed_.push_back(gone);
  heights_.push_back(height);
  auto& ak = adj_[keep];
  auto& ag = adj_[gone];
  free_links_.push_back(ak.at(gone));
  drop_parts(links_[ak.at(gone)]);
  ak.erase(gone);
  ag.erase(keep);
  // Pairs with a neighbour of one side only need the other side's model sum, taken before the
  // sums of `keep` change.
  std::vector<std::pair<int32_t, int32_t>> need;  // (neighbour, side whose model sum is needed)
  ak.each([&](int32_t x, int32_t) {
    if (!ag.contains(x)) need.emplace_back(x, gone);
  });
  ag.each([&](int32_t x, int32_t) {
    if (!ak.contains(x)) need.emplace_back(x, keep);
  });
  std::vector<double> model(need.size());
  const int64_t m = static_cast<int64_t>(need.size());
#pragma omp parallel for schedule(static) if (m * d_ >= kParallelMin * 64)
  for (int64_t t = 0; t < m; ++t) model[t] = sep(need[t].second, need[t].first);
  const int32_t sk = static_cast<int32_t>(size_[keep]), sg = static_cast<int32_t>(size_[gone]);
  std::unordered_map<int32_t, double> keep_model;  // neighbours of `gone` only: keep's model sum
  for (int64_t t = 0; t < m; ++t) {
    const int32_t x = need[t].first, sx = static_cast<int32_t>(size_[x]);
    if (need[t].second == gone) {  // a neighbour of keep only: gone's rows are model
      Link& link = links_[ak.at(x)];
      orient(link, keep);
      add_model(link, keep, x, model[t], Rect{sk, sk + sg, 0, sx});
    } else {
      keep_model.emplace(x, model[t]);
    }
  }
  std::vector<Rect> moved;
  ag.each([&](int32_t x, int32_t gid) {  // gone's edges: its positions follow keep's in the merged list
    Link& g = links_[gid];
    orient(g, gone);
    if (g.parts >= 0) {
      Parts& gp = parts_[g.parts];
      gp.end_a = keep;
      for (Rect& r : gp.rects) {
        r.lo_a += sk;
        r.hi_a += sk;
      }
    }
    const int32_t sx = static_cast<int32_t>(size_[x]);
    const int32_t* kid = ak.find(x);
    if (!kid) {  // a neighbour of gone only: keep's rows are model
      ak.set(x, gid);
      add_model(g, keep, x, keep_model.at(x), Rect{0, sk, 0, sx});
      return;
    }
    Link& k = links_[*kid];  // both sides' sums (Lance-Williams)
    orient(k, keep);
    k.exact += g.exact;
    if (g.parts >= 0) {  // copied first: add_model may move parts_
      const double gm = parts_[g.parts].model;
      moved = parts_[g.parts].rects;
      for (size_t r = 0; r < moved.size(); ++r) add_model(k, keep, x, r == 0 ? gm : 0.0, moved[r]);
      drop_parts(g);
    }
    free_links_.push_back(gid);
  });
  float* xk = x_ + static_cast<int64_t>(keep) * d_;
  const float* xg = x_ + static_cast<int64_t>(gone) * d_;
  for (int64_t t = 0; t < d_; ++t) xk[t] += xg[t];
  if (!symmetric_) {
    float* gk = g_ + static_cast<int64_t>(keep) * d_;
    const float* gg = g_ + static_cast<int64_t>(gone) * d_;
    for (int64_t t = 0; t < d_; ++t) gk[t] += gg[t];
  }
  u_[keep] += u_[gone];
  size_[keep] += size_[gone];
  next_[tail_[keep]] = gone;
  tail_[keep] = tail_[gone];
  if (bound_[gone] < bound_[keep]) set_bound(keep, bound_[gone]);
  alive_[gone] = 0;
  --live_;
  ag.clear();
  ak.each([&](int32_t x, int32_t id) {
    Link& link = links_[id];
    if (link.parts >= 0 && parts_[link.parts].rects.size() > max_rects_) {
      ++collapsed_;  // too fragmented: the whole pair counts as model
      orient(link, keep);
      Parts& p = parts_[link.parts];
      p.model += link.exact;
      link.exact = 0.0;
      p.rects.assign(1, Rect{0, static_cast<int32_t>(size_[keep]), 0, static_cast<int32_t>(size_[x])});
    }
    Neighbours& ax = adj_[x];
    ax.erase(gone);
    ax.set(keep, id);
    push(keep, x, link);
  });
}

int64_t SparseLinkage::run(int64_t target) {
  while (live_ > target) {
    const double height = this->top();
    // no edge left, an off-graph pair may be closer, or the closest sum needs its exact check
    if (heap_.empty() || height > min_bound() - margin_ || links_[entry_link(heap_.top())].parts >= 0) break;
    const Entry top = heap_.top();
    heap_.pop();
    const bool a_keeps = adj_[top.a].size() >= adj_[top.b].size();
    merge(a_keeps ? top.a : top.b, a_keeps ? top.b : top.a, top.dist);
  }
  return live_;
}

}  // namespace iics
