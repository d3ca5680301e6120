// The sparse inter-camera round's native steps: see cpu/sparse_cpu.h. The Jaccard pairs follow
// the dense re-ranking's float16 accumulation (cpu/rerank_cpu.cpp) step for step; the linkage is
// the textbook priority-queue agglomeration (merge the closest pair, update its neighbours by
// Lance-Williams) restricted to a graph, with model sums for pairs the graph does not hold. The
// float16 steps round each operation on their own (round_half), so contraction cannot change them.
#include "cpu/sparse_cpu.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "parallel.h"

namespace iics {

using rerank_parts::round_half;
using rerank_parts::Sparse;

namespace {

constexpr int64_t kParallelMin = 4096;  // below this much work a loop stays on one thread

// <a, b> over d floats, float64 accumulation in four lanes.
inline double dot(const float* a, const float* b, int64_t d) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t t = 0;
  for (; t + 4 <= d; t += 4)
    for (int u = 0; u < 4; ++u) s[u] += static_cast<double>(a[t + u]) * b[t + u];
  for (; t < d; ++t) s[0] += static_cast<double>(a[t]) * b[t];
  return (s[0] + s[1]) + (s[2] + s[3]);
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

SparseLinkage::SparseLinkage(int64_t n, int64_t d, float* x, float* g, const double* u, double c0)
    : n_(n), d_(d), x_(x), g_(g), symmetric_(g == x), c0_(c0), u_(u, u + n), size_(n, 1.0),
      stamp_(n, 0), alive_(n, 1), adj_(n), next_(n, -1), tail_(n),
      bound_(n, std::numeric_limits<double>::infinity()), bound_stamp_(n, 0), live_(n) {
  for (int64_t s = 0; s < n; ++s) tail_[s] = static_cast<int32_t>(s);
}

void SparseLinkage::check_pairs(double margin) {
  checking_ = true;
  margin_ = margin;
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

void SparseLinkage::push(int32_t a, int32_t b, const Link& link) {
  if (a > b) std::swap(a, b);
  const double height = link.sum / (size_[a] * size_[b]);
  heap_.push(Entry{link.exact ? height : height - margin_, a, b, stamp_[a], stamp_[b], link.exact});
}

void SparseLinkage::add_edges(const int32_t* a, const int32_t* b, const double* s, int64_t count) {
  std::vector<double> model;
  if (s == nullptr) {  // model sums of the new pairs, in parallel
    model.resize(count);
#pragma omp parallel for schedule(dynamic, 256) if (count * d_ >= kParallelMin * 64)
    for (int64_t e = 0; e < count; ++e) model[e] = sep(a[e], b[e]);
  }
  for (int64_t e = 0; e < count; ++e) {
    const int32_t p = a[e], q = b[e];
    if (p == q || !alive_[p] || !alive_[q] || adj_[p].count(q)) continue;
    const Link link{s ? s[e] : model[e], s != nullptr || !checking_};
    adj_[p].emplace(q, link);
    adj_[q].emplace(p, link);
    push(p, q, link);
  }
}

void SparseLinkage::pending(int64_t count, std::vector<int32_t>& a, std::vector<int32_t>& b,
                            std::vector<double>& model) {
  const double limit = min_bound() - margin_;
  std::vector<Entry> exact;
  while (static_cast<int64_t>(a.size()) < count && !heap_.empty()) {
    const Entry e = heap_.top();
    if (!valid(e)) {
      heap_.pop();
      continue;
    }
    if (e.dist > limit) break;
    heap_.pop();
    if (e.exact) {
      exact.push_back(e);
    } else {
      a.push_back(e.a);
      b.push_back(e.b);
      model.push_back(e.dist + margin_);
    }
  }
  for (const Entry& e : exact) heap_.push(e);
}

void SparseLinkage::set_sums(const int32_t* a, const int32_t* b, const double* s, int64_t count) {
  for (int64_t e = 0; e < count; ++e) {
    const int32_t p = a[e], q = b[e];
    if (p == q || !alive_[p] || !alive_[q]) continue;
    auto it = adj_[p].find(q);
    if (it == adj_[p].end()) continue;
    const Link link{s[e], true};
    it->second = link;
    adj_[q][p] = link;
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
  ak.erase(gone);
  ag.erase(keep);
  // Pairs with a neighbour of one side only need the other side's model sum, taken before the
  // sums of `keep` change.
  std::vector<std::pair<int32_t, int32_t>> need;  // (neighbour, side whose model sum is needed)
  for (const auto& kv : ak)
    if (!ag.count(kv.first)) need.emplace_back(kv.first, gone);
  for (const auto& kv : ag)
    if (!ak.count(kv.first)) need.emplace_back(kv.first, keep);
  std::vector<double> model(need.size());
  const int64_t m = static_cast<int64_t>(need.size());
#pragma omp parallel for schedule(static) if (m * d_ >= kParallelMin * 64)
  for (int64_t t = 0; t < m; ++t) model[t] = sep(need[t].second, need[t].first);
  for (const auto& kv : ag) {  // sums of both sides' edges; exact when both are
    auto it = ak.find(kv.first);
    if (it == ak.end()) {
      ak.emplace(kv.first, kv.second);
    } else {
      it->second.sum += kv.second.sum;
      it->second.exact = it->second.exact && kv.second.exact;
    }
  }
  for (int64_t t = 0; t < m; ++t) {  // one side's edge plus the other side's model sum
    Link& link = ak[need[t].first];
    link.sum += model[t];
    link.exact = link.exact && !checking_;
  }
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
  ++stamp_[keep];
  alive_[gone] = 0;
  --live_;
  std::unordered_map<int32_t, Link>().swap(ag);
  for (const auto& kv : ak) {
    auto& ac = adj_[kv.first];
    ac.erase(gone);
    ac[keep] = kv.second;
    push(keep, kv.first, kv.second);
  }
}

int64_t SparseLinkage::run(int64_t target) {
  while (live_ > target) {
    const double height = this->top();
    // no edge left, an off-graph pair may be closer, or the closest sum needs its exact check
    if (heap_.empty() || height > min_bound() - margin_ || !heap_.top().exact) break;
    const Entry top = heap_.top();
    heap_.pop();
    const bool a_keeps = adj_[top.a].size() >= adj_[top.b].size();
    merge(a_keeps ? top.a : top.b, a_keeps ? top.b : top.a, top.dist);
  }
  return live_;
}

}  // namespace iics
