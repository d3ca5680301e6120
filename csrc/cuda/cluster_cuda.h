// Launcher of the reciprocal-nearest-neighbour merge on a CUDA device (cluster_cuda.cu).
#pragma once
#include <cstdint>

namespace iics {

// Runs the merge of cluster_rnn.h on the condensed float32 triangle of n points that `D` points
// to on CUDA device `device`, in place (destroyed), on `stream` (a cudaStream_t; 0 for the
// legacy default stream). O(n) device work space. Writes the n-1 merges to host arrays: the two
// slots (merge_a < merge_b), the height and the pass that made it; within a pass the order is
// arbitrary (sort by pass, then merge_a, for the host's order). Throws std::runtime_error on a
// CUDA error. Preconditions: 2 <= n < 2^31, entries finite, method code 0..3.
void rnn_linkage_cuda(float* D, int64_t n, int method, int device, void* stream,
                      int32_t* merge_a, int32_t* merge_b, double* merge_h, int32_t* merge_pass);

}  // namespace iics
