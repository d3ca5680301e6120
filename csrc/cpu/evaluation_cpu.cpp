// Market-1501 ranking without sorting a gallery row. Per query: find its matches through a
// pid-sorted gallery index, sort them by key, then one pass over the row's distances drops each
// gallery item into the bucket of the first match it precedes (branch-free binary search among
// the matches); the items that are not kept non-matches (same pid, junk) are taken back out, and
// prefix sums of the buckets give every match's rank. O(G log m + m log m) per query instead of
// O(G log G), and the hot loop reads nothing but the distances.
#include "cpu/evaluation_cpu.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <tuple>
#include <utility>
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

// Index of the first match key >= k among the m sorted keys h (m when none), branch-free.
inline int64_t bucket(const uint64_t* h, int64_t m, uint64_t k) {
  const uint64_t* base = h;
  for (int64_t n = m; n > 1;) {
    const int64_t half = n / 2;
    base = base[half - 1] < k ? base + half : base;
    n -= half;
  }
  return (base - h) + (*base < k);
}

}  // namespace

void rank_queries_cpu(const float* dist, int64_t ld, int64_t nq, int64_t ng, const int64_t* qp,
                      const int64_t* qc, const int64_t* gp, const int64_t* gc,
                      int64_t* first_rank, double* ap) {
  // Gallery indices grouped by pid (ascending index within a pid): a query finds its matches,
  // and the junk (pid -1), by binary search instead of a pass over the gallery.
  std::vector<int64_t> by_pid(ng);
  std::iota(by_pid.begin(), by_pid.end(), int64_t{0});
  std::stable_sort(by_pid.begin(), by_pid.end(),
                   [gp](int64_t a, int64_t b) { return gp[a] < gp[b]; });
  auto pid_range = [&](int64_t v) {  // the indices of pid v in by_pid
    auto lo = std::lower_bound(by_pid.cbegin(), by_pid.cend(), v,
                               [gp](int64_t g, int64_t x) { return gp[g] < x; });
    auto hi = std::upper_bound(lo, by_pid.cend(), v,
                               [gp](int64_t x, int64_t g) { return x < gp[g]; });
    return std::make_pair(lo, hi);
  };
  const auto junk = pid_range(-1);
  const auto junk_begin = junk.first, junk_end = junk.second;
  // Threads only pay off beyond tiny blocks (a parallel region costs microseconds to ms).
  const bool parallel = nq > 1 && nq * ng >= (int64_t{1} << 16);
  (void)parallel;
#pragma omp parallel if (parallel)
  {
    std::vector<uint64_t> hits;
    std::vector<int64_t> before;
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < nq; ++i) {
      const float* row = dist + i * ld;
      const int64_t p = qp[i], c = qc[i];
      hits.clear();
      auto same_begin = by_pid.cend(), same_end = by_pid.cend();
      if (p != -1) {
        std::tie(same_begin, same_end) = pid_range(p);
        for (auto it = same_begin; it != same_end; ++it)
          if (gc[*it] != c) hits.push_back(sort_key(row[*it], *it));
      }
      const int64_t m = static_cast<int64_t>(hits.size());
      if (m == 0) {
        first_rank[i] = 0;
        ap[i] = 0.0;
        continue;
      }
      std::sort(hits.begin(), hits.end());
      const uint64_t* h = hits.data();
      const float last_d = key_distance(hits.back());
      // Bucket j counts the items ranked between match j-1 and match j; bucket m those after
      // the last match. Count every item first (the hot loop reads only the distances), then
      // take back the ones that are not kept non-matches: same pid (the matches themselves and
      // same-camera drops) and junk.
      before.assign(m + 1, 0);
      for (int64_t g = 0; g < ng; ++g)
        if (row[g] <= last_d) ++before[bucket(h, m, sort_key(row[g], g))];
      for (auto it = same_begin; it != same_end; ++it)
        if (row[*it] <= last_d) --before[bucket(h, m, sort_key(row[*it], *it))];
      for (auto it = junk_begin; it != junk_end; ++it)
        if (row[*it] <= last_d) --before[bucket(h, m, sort_key(row[*it], *it))];
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
