// Market-1501 ranking without sorting a gallery row: sort the query's few matches by key, then
// one pass over the gallery drops each kept non-match into the bucket of the first match it
// precedes (binary search among the matches). Prefix sums of the buckets give every match's
// rank: O(G log m + m log m) per query instead of O(G log G).
#include "cpu/evaluation_cpu.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace iics {

namespace {

// Unique key ordering (distance, index) lexicographically: the float's bits made monotone as
// an unsigned integer in the high half, the gallery index in the low half.
inline uint64_t sort_key(float d, int64_t g) {
  if (d == 0.0f) d = 0.0f;  // -0.0 ties with +0.0
  uint32_t u;
  std::memcpy(&u, &d, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(g);
}

// The distance a key was made from.
inline float key_distance(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  float d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

}  // namespace

void rank_queries_cpu(const float* dist, int64_t ld, int64_t nq, int64_t ng, const int64_t* qp,
                      const int64_t* qc, const int64_t* gp, const int64_t* gc,
                      int64_t* first_rank, double* ap) {
  // Gallery indices grouped by pid (ascending index within a pid): a query finds its matches
  // by binary search instead of a pass over the gallery.
  std::vector<int64_t> by_pid(ng);
  std::iota(by_pid.begin(), by_pid.end(), int64_t{0});
  std::stable_sort(by_pid.begin(), by_pid.end(),
                   [gp](int64_t a, int64_t b) { return gp[a] < gp[b]; });
  // Threads only pay off beyond tiny blocks (a parallel region costs microseconds to ms).
  const bool parallel = nq > 1 && nq * ng >= (int64_t{1} << 16);
  (void)parallel;
#ifdef IICS_WITH_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    std::vector<uint64_t> hits;
    std::vector<int64_t> before;
#ifdef IICS_WITH_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t i = 0; i < nq; ++i) {
      const float* row = dist + i * ld;
      const int64_t p = qp[i], c = qc[i];
      hits.clear();
      if (p != -1) {
        auto lo = std::lower_bound(by_pid.begin(), by_pid.end(), p,
                                   [gp](int64_t g, int64_t v) { return gp[g] < v; });
        for (; lo != by_pid.end() && gp[*lo] == p; ++lo)
          if (gc[*lo] != c) hits.push_back(sort_key(row[*lo], *lo));
      }
      const int64_t m = static_cast<int64_t>(hits.size());
      if (m == 0) {
        first_rank[i] = 0;
        ap[i] = 0.0;
        continue;
      }
      std::sort(hits.begin(), hits.end());
      const uint64_t last = hits.back();
      const float last_d = key_distance(last);
      before.assign(m, 0);
      const uint64_t* h = hits.data();
      for (int64_t g = 0; g < ng; ++g) {
        if (row[g] > last_d) continue;            // after every match: changes no rank
        if (gp[g] == p || gp[g] == -1) continue;  // matches, same-camera drops, junk
        const uint64_t k = sort_key(row[g], g);
        // Branchless lower bound: index of the first match key >= k (keys are unique).
        const uint64_t* base = h;
        for (int64_t n = m; n > 1;) {
          const int64_t half = n / 2;
          base = base[half - 1] < k ? base + half : base;
          n -= half;
        }
        const int64_t pos = (base - h) + (*base < k);
        if (pos < m) ++before[pos];
      }
      int64_t ahead = 0;
      double sum = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        ahead += before[j];
        const int64_t rank = ahead + j + 1;
        if (j == 0) first_rank[i] = rank;
        sum += static_cast<double>(j + 1) / static_cast<double>(rank);
      }
      ap[i] = sum / static_cast<double>(m);
    }
  }
}

}  // namespace iics
