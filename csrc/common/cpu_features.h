#pragma once
// Run-time CPU feature checks: the library is compiled for an AVX2 baseline and takes AVX-512
// paths only where the running CPU has them (VQEXT_DISABLE_AVX512=1 forces the AVX2 path).
#include <cstdlib>
#include <cstring>

namespace vqext {

inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool value = [] {
    const char* off = std::getenv("VQEXT_DISABLE_AVX512");
    if (off && std::strcmp(off, "0") != 0 && std::strlen(off) > 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return value;
#else
  return false;
#endif
}

}  // namespace vqext
