// Ranks of the matches of each query under the Market-1501 protocol (no Python here).
#pragma once

#include <cstdint>

namespace iics {

// For each query i (row i of dist, row stride ld):
//   matches    = gallery g with gp[g] == qp[i], gc[g] != qc[i], qp[i] != -1;
//   kept items = matches and gallery g with gp[g] != qp[i], gp[g] != -1.
// The kept items are ranked by (float32 distance, gallery index), -0.0 equal to +0.0.
// Writes first_rank[i] = 1-based rank of the first match among the kept items (0 = no match)
// and ap[i] = mean over matches of (matches so far / rank) (0 when no match).
// Precondition: no NaN in dist (the caller checks). OpenMP over queries.
void rank_queries_cpu(const float* dist, int64_t ld, int64_t nq, int64_t ng, const int64_t* qp,
                      const int64_t* qc, const int64_t* gp, const int64_t* gc,
                      int64_t* first_rank, double* ap);

}  // namespace iics
