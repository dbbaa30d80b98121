#pragma once
// Run-time choice of the CPU kernels' instruction set.
//
// Every translation unit is compiled for the compiler's baseline target (no -m flags), so the
// library builds and loads on any CPU the compiler targets. Each op has one kernel translation
// unit per instruction set: *_portable.cpp (plain C++ on GCC vector types, any architecture) and,
// on x86-64 only, *_avx2.cpp and *_avx512.cpp, which switch the target with `#pragma GCC target`
// after their system and torch headers, so only their own kernels carry those instructions. The
// op's host code picks one kernel per call from cpu_isa().
//
// VQEXT_CPU_ISA=portable|avx2|avx512 caps the choice (a level the CPU lacks falls back to the
// best it has); VQEXT_DISABLE_AVX512=1 is the same as VQEXT_CPU_ISA=avx2.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__)
#define VQEXT_X86_KERNELS 1
#else
#define VQEXT_X86_KERNELS 0
#endif

namespace vqext {

enum class CpuIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "portable";
  }
}

inline bool cpu_has_avx2() {
#if VQEXT_X86_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if VQEXT_X86_KERNELS
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The widest instruction set this CPU runs and this build has kernels for.
inline CpuIsa cpu_isa_available() {
  return cpu_has_avx512() ? CpuIsa::kAvx512 : cpu_has_avx2() ? CpuIsa::kAvx2 : CpuIsa::kPortable;
}

// The instruction set the kernels use: the available one, capped by the environment. Read once.
// An unknown VQEXT_CPU_ISA value throws (the first op call, or vqext's import, reports it).
inline CpuIsa cpu_isa() {
  static const CpuIsa value = [] {
    CpuIsa cap = CpuIsa::kAvx512;
    const char* off = std::getenv("VQEXT_DISABLE_AVX512");
    if (off && std::strlen(off) > 0 && std::strcmp(off, "0") != 0) cap = CpuIsa::kAvx2;
    const char* want = std::getenv("VQEXT_CPU_ISA");
    if (want && std::strlen(want) > 0) {
      const std::string w(want);
      if (w == "portable") {
        cap = CpuIsa::kPortable;
      } else if (w == "avx2") {
        cap = CpuIsa::kAvx2;
      } else if (w != "avx512") {
        throw std::invalid_argument("VQEXT_CPU_ISA must be portable, avx2 or avx512, got '" + w + "'");
      }
    }
    const CpuIsa have = cpu_isa_available();
    return static_cast<int>(have) < static_cast<int>(cap) ? have : cap;
  }();
  return value;
}

}  // namespace vqext
