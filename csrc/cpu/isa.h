// The run-time choice of a kernel's instruction set for the kernels that keep an AVX-512 variant
// beside a plain loop (the re-ranking's row sweeps, the sparse tile lookups): "auto" (the widest
// this CPU runs), "avx512" or "plain". Builds without x86 SIMD keep the plain loops only.
#pragma once
#include <stdexcept>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define IICS_X86_SIMD 1
#include <immintrin.h>
#define IICS_TARGET_AVX512 __attribute__((target("avx512f")))
#endif

namespace iics {

inline bool cpu_has_avx512f() {
#ifdef IICS_X86_SIMD
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// `plain` or `avx512` (built: whether this build has the AVX-512 variant) by name; a clear error
// for an unknown name or for "avx512" where it cannot run.
template <class T>
T pick_isa(const std::string& isa, const T& plain, const T& avx512, bool built) {
  const bool runs = built && cpu_has_avx512f();
  if (isa == "plain" || (isa == "auto" && !runs)) return plain;
  if (isa == "auto" || (isa == "avx512" && runs)) return avx512;
  if (isa == "avx512")
    throw std::invalid_argument("isa='avx512' is not supported by this CPU; use isa='auto'");
  throw std::invalid_argument("isa must be 'auto', 'avx512' or 'plain'; got '" + isa + "'");
}

}  // namespace iics
