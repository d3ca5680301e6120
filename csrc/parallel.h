// OpenMP queries that also compile without OpenMP (one thread), shared by the CPU cores.
// Convention: a core writes its `#pragma omp` lines unguarded (without OpenMP the compiler
// ignores them and the loops run serially) and calls omp_* only through these helpers.
#pragma once

#ifdef IICS_WITH_OPENMP
#include <omp.h>
#endif

namespace iics {

// Threads a parallel region started here would get.
inline int max_threads() {
#ifdef IICS_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// This thread's index inside the current parallel region (0 outside one).
inline int thread_index() {
#ifdef IICS_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads of the current parallel region (1 outside one).
inline int num_threads() {
#ifdef IICS_WITH_OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

}  // namespace iics
