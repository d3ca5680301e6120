// Reciprocal-nearest-neighbour merge on a CUDA device: the kernels around the per-pass work of
// cluster_rnn.h (the same functions the host runs) and the host loop that launches them.
//
// One pass is four kernels on the caller's stream: rnn_rescan (a block per stale row, a block
// reduction of the row's minimum), rnn_pairs (a thread per live slot, merges appended
// atomically), rnn_update (a thread per (live slot, few merges) item) and rnn_finish (one block:
// caches, sizes, the compacted live list, the next rescans). The host reads the counters back
// twice a pass (passes are few: tens at tens of thousands of points).
#include "cuda/cluster_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cluster_rnn.h"

namespace iics {
namespace {

using State = rnn::State<float>;

constexpr int kThreads = 256;        // rescan, pairs, update
constexpr int kFinishThreads = 1024; // the one block of rnn_finish
constexpr int kRescanBlocks = 4096;  // grid-stride cap of rnn_rescan
constexpr int kMergesPerThread = 4;  // merges a thread of rnn_update takes
constexpr unsigned kMaxGridY = 65535;

// counters[]: merges of this pass, merges so far, live slots, rows to rescan.
enum Counter { kPairs = 0, kDone = 1, kLive = 2, kRows = 3, kCounters = 4 };

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA merge: ") + what + ": " + cudaGetErrorString(err));
}

// Lexicographic (distance, slot) minimum over the block, valid in thread 0.
__device__ void block_argmin(float& v, int32_t& k) {
  __shared__ float sv[32];
  __shared__ int32_t sk[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_down_sync(0xffffffffu, v, off);
    const int32_t ok = __shfl_down_sync(0xffffffffu, k, off);
    if (rnn::better(ov, ok, v, k)) v = ov, k = ok;
  }
  if (lane == 0) sv[warp] = v, sk[warp] = k;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? sv[lane] : INFINITY;
    k = lane < warps ? sk[lane] : INT_MAX;
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_down_sync(0xffffffffu, v, off);
      const int32_t ok = __shfl_down_sync(0xffffffffu, k, off);
      if (rnn::better(ov, ok, v, k)) v = ov, k = ok;
    }
  }
  __syncthreads();  // sv/sk free for the next row
}

// Exclusive prefix sums of (a, b) over the block; totals in (ta, tb) in every thread.
__device__ void block_exclusive_scan(int32_t& a, int32_t& b, int32_t& ta, int32_t& tb) {
  __shared__ int32_t wa[32], wb[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  int32_t ia = a, ib = b;
  for (int off = 1; off < 32; off <<= 1) {
    const int32_t oa = __shfl_up_sync(0xffffffffu, ia, off);
    const int32_t ob = __shfl_up_sync(0xffffffffu, ib, off);
    if (lane >= off) ia += oa, ib += ob;
  }
  if (lane == 31) wa[warp] = ia, wb[warp] = ib;
  __syncthreads();
  if (warp == 0) {
    int32_t sa = lane < warps ? wa[lane] : 0, sb = lane < warps ? wb[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int32_t oa = __shfl_up_sync(0xffffffffu, sa, off);
      const int32_t ob = __shfl_up_sync(0xffffffffu, sb, off);
      if (lane >= off) sa += oa, sb += ob;
    }
    wa[lane] = sa, wb[lane] = sb;
  }
  __syncthreads();
  const int32_t base_a = warp > 0 ? wa[warp - 1] : 0, base_b = warp > 0 ? wb[warp - 1] : 0;
  ta = wa[warps - 1], tb = wb[warps - 1];
  a = base_a + ia - a;
  b = base_b + ib - b;
}

__global__ void __launch_bounds__(kThreads)
    rnn_init(State s, int64_t n, int64_t* roff, int32_t* rows, unsigned long long* key) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  key[k] = ~0ull;
  roff[k] = condensed_row(n, k) - k - 1;
  s.act[k] = static_cast<int32_t>(k);
  rows[k] = static_cast<int32_t>(k);
  s.partner[k] = -1;
  s.stale[k] = 0;
  s.size[k] = 1.0;
}

__global__ void __launch_bounds__(kThreads)
    rnn_rescan(State s, const int32_t* rows, int32_t n_rows, int32_t m) {
  for (int32_t u = blockIdx.x; u < n_rows; u += gridDim.x) {
    const int32_t x = rows[u];
    float best = INFINITY;
    int32_t arg = INT_MAX;
    rnn::scan_row(s, x, m, static_cast<int32_t>(threadIdx.x), static_cast<int32_t>(blockDim.x),
                  best, arg);
    block_argmin(best, arg);
    if (threadIdx.x == 0) s.nn[x] = arg, s.dnn[x] = best;
  }
}

__global__ void __launch_bounds__(kThreads)
    rnn_pairs(State s, int32_t m, int32_t* counters, int32_t pass, int32_t* out_a,
              int32_t* out_b, double* out_h, int32_t* out_pass) {
  const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  int32_t x, y;
  if (t >= m || !rnn::pair_at(s, t, x, y)) return;
  const int32_t q = atomicAdd(&counters[kPairs], 1);
  s.pi[q] = x, s.pj[q] = y;
  s.partner[x] = y, s.partner[y] = x;
  const int64_t r = static_cast<int64_t>(counters[kDone]) + q;
  out_a[r] = x, out_b[r] = y, out_h[r] = static_cast<double>(s.dnn[x]), out_pass[r] = pass;
}

// Order-preserving 64-bit key of (distance, slot): the lexicographic order of better(). -0 is
// folded into +0, which better() treats as equal.
__device__ unsigned long long pack(float v, int32_t k) {
  uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(b) << 32) | static_cast<uint32_t>(k);
}
__device__ float unpack_value(unsigned long long key) {
  uint32_t b = static_cast<uint32_t>(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
  return __uint_as_float(b);
}

// Items (merge q, live slot act[t]): t along x, kMergesPerThread merges a thread along y. Entries
// that improve a cache go to its key by atomicMin (rare: for reducible linkages an updated
// distance is never below the cached one, so only exact ties with a lower slot get there).
__global__ void __launch_bounds__(kThreads)
    rnn_update(State s, int32_t m, int32_t p, unsigned long long* key) {
  const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= m) return;
  for (int64_t q0 = blockIdx.y * static_cast<int64_t>(kMergesPerThread); q0 < p;
       q0 += static_cast<int64_t>(gridDim.y) * kMergesPerThread) {
    const int32_t q1 = static_cast<int32_t>(q0 + kMergesPerThread < p ? q0 + kMergesPerThread : p);
    for (int32_t q = static_cast<int32_t>(q0); q < q1; ++q) {
      float v;
      if (rnn::update_item(s, q, t, v)) atomicMin(&key[s.act[t]], pack(v, s.pj[q]));
    }
  }
}

// The caches: a slot whose neighbour merged is stale, the others take their key if one was set.
// Then sizes of the unions; the live list without the dropped slots (in order) into act_out; the
// slots to rescan next (unions and stale caches) into rows; then the pass's marks are cleared.
__global__ void __launch_bounds__(kFinishThreads)
    rnn_finish(State s, int32_t m, int32_t* act_out, int32_t* rows, int32_t* counters,
               unsigned long long* key) {
  const int32_t p = counters[kPairs];
  const int32_t chunk = (m + blockDim.x - 1) / blockDim.x;
  const int32_t b = min(m, static_cast<int32_t>(threadIdx.x) * chunk), e = min(m, b + chunk);
  for (int32_t t = b; t < e; ++t) {
    const int32_t k = s.act[t];
    if (s.partner[k] >= 0) continue;
    if (rnn::lost(s, k)) {
      s.stale[k] = 1;
    } else if (key[k] != ~0ull) {
      s.nn[k] = static_cast<int32_t>(key[k] & 0xffffffffu);
      s.dnn[k] = unpack_value(key[k]);
    }
    key[k] = ~0ull;
  }
  __syncthreads();  // every lost() read its neighbour before any cache changed
  for (int32_t q = threadIdx.x; q < p; q += blockDim.x) s.size[s.pj[q]] += s.size[s.pi[q]];
  int32_t kept = 0, stale = 0;
  for (int32_t t = b; t < e; ++t) {
    const int32_t k = s.act[t], mate = s.partner[k];
    if (mate > k) continue;
    ++kept;
    stale += s.stale[k] || mate >= 0;
  }
  int32_t total_kept, total_stale;
  block_exclusive_scan(kept, stale, total_kept, total_stale);
  for (int32_t t = b; t < e; ++t) {
    const int32_t k = s.act[t], mate = s.partner[k];
    if (mate > k) continue;
    act_out[kept++] = k;
    if (s.stale[k] || mate >= 0) rows[stale++] = k;
    s.stale[k] = 0;
  }
  __syncthreads();  // every partner read before the reset
  for (int32_t q = threadIdx.x; q < p; q += blockDim.x) s.partner[s.pi[q]] = s.partner[s.pj[q]] = -1;
  if (threadIdx.x == 0) {
    counters[kPairs] = 0;
    counters[kDone] += p;
    counters[kLive] = total_kept;
    counters[kRows] = total_stale;
  }
}

// Device memory of one merge, freed on scope exit; the caller's current device is restored.
struct Workspace {
  void* base = nullptr;
  int previous = -1;
  explicit Workspace(int device) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~Workspace() {
    if (base) cudaFree(base);
    if (previous >= 0) cudaSetDevice(previous);
  }
};

// Carves aligned arrays out of one allocation.
struct Carver {
  char* at;
  template <typename U>
  U* take(int64_t count) {
    U* p = reinterpret_cast<U*>(at);
    at += (count * static_cast<int64_t>(sizeof(U)) + 255) / 256 * 256;
    return p;
  }
};

}  // namespace

void rnn_linkage_cuda(float* D, int64_t n, int method, int device, void* stream,
                      int32_t* merge_a, int32_t* merge_b, double* merge_h, int32_t* merge_pass) {
  if (n < 2) return;
  if (n > INT_MAX) throw std::invalid_argument("CUDA merge: at most 2^31 - 1 points");
  Workspace ws(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // int64 roff; int32 act x2, nn, partner, pi, pj, rows, out_a, out_b, out_pass; float dnn;
  // uint8 stale; double size, out_h; uint64 key; int32 counters.
  const int64_t bytes = 256 * 20 + n * (8 + 4 * 10 + 4 + 1 + 8 + 8 + 8) + 64;
  check(cudaMalloc(&ws.base, bytes), "allocating the work space");
  Carver c{static_cast<char*>(ws.base)};
  State s;
  s.D = D;
  int64_t* roff = c.take<int64_t>(n);
  s.roff = roff;
  int32_t* act[2] = {c.take<int32_t>(n), c.take<int32_t>(n)};
  s.act = act[0];
  s.nn = c.take<int32_t>(n);
  s.dnn = c.take<float>(n);
  s.partner = c.take<int32_t>(n);
  s.stale = c.take<uint8_t>(n);
  s.size = c.take<double>(n);
  s.pi = c.take<int32_t>(n / 2 + 1);
  s.pj = c.take<int32_t>(n / 2 + 1);
  s.method = method;
  int32_t* rows = c.take<int32_t>(n);
  int32_t* out_a = c.take<int32_t>(n);
  int32_t* out_b = c.take<int32_t>(n);
  int32_t* out_pass = c.take<int32_t>(n);
  double* out_h = c.take<double>(n);
  unsigned long long* key = c.take<unsigned long long>(n);
  int32_t* counters = c.take<int32_t>(kCounters);

  const int32_t host_init[kCounters] = {0, 0, static_cast<int32_t>(n), static_cast<int32_t>(n)};
  check(cudaMemcpyAsync(counters, host_init, sizeof host_init, cudaMemcpyHostToDevice, st),
        "copying the counters");
  const auto blocks = [](int64_t items) {
    return static_cast<unsigned>((items + kThreads - 1) / kThreads);
  };
  rnn_init<<<blocks(n), kThreads, 0, st>>>(s, n, roff, rows, key);
  check(cudaGetLastError(), "launching rnn_init");

  int32_t m = static_cast<int32_t>(n), n_rows = m;
  for (int32_t pass = 0, cur = 0; m > 1; ++pass, cur ^= 1) {
    s.act = act[cur];
    if (n_rows > 0)
      rnn_rescan<<<std::min(n_rows, kRescanBlocks), kThreads, 0, st>>>(s, rows, n_rows, m);
    rnn_pairs<<<blocks(m), kThreads, 0, st>>>(s, m, counters, pass, out_a, out_b, out_h, out_pass);
    int32_t h[kCounters];
    check(cudaMemcpyAsync(h, counters, sizeof h, cudaMemcpyDeviceToHost, st), "reading counters");
    check(cudaStreamSynchronize(st), "finding reciprocal pairs");
    const int32_t p = h[kPairs];
    if (p == 0)
      throw std::runtime_error("CUDA merge: a pass found no reciprocal pair (non-finite input?)");
    const unsigned ys = static_cast<unsigned>(
        std::min<int64_t>((p + kMergesPerThread - 1) / kMergesPerThread, kMaxGridY));
    rnn_update<<<dim3(blocks(m), ys), kThreads, 0, st>>>(s, m, p, key);
    rnn_finish<<<1, kFinishThreads, 0, st>>>(s, m, act[cur ^ 1], rows, counters, key);
    check(cudaGetLastError(), "launching a merge pass");
    check(cudaMemcpyAsync(h, counters, sizeof h, cudaMemcpyDeviceToHost, st), "reading counters");
    check(cudaStreamSynchronize(st), "running a merge pass");
    m = h[kLive], n_rows = h[kRows];
  }
  check(cudaMemcpyAsync(merge_a, out_a, (n - 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, st),
        "copying merges");
  check(cudaMemcpyAsync(merge_b, out_b, (n - 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, st),
        "copying merges");
  check(cudaMemcpyAsync(merge_h, out_h, (n - 1) * sizeof(double), cudaMemcpyDeviceToHost, st),
        "copying merges");
  check(cudaMemcpyAsync(merge_pass, out_pass, (n - 1) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                        st),
        "copying merges");
  check(cudaStreamSynchronize(st), "copying merges");
}

}  // namespace iics
