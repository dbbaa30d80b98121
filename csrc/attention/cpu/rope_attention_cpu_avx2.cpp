// AVX2 + FMA rope_attention kernels (x86-64), taken where vqext::cpu_isa() is avx2. The unit is
// compiled for the baseline target; every header is included before the target switch, so only
// the kernels below carry these instructions.
#include "../../common/cpu_features.h"
#if VQEXT_X86_KERNELS
#include <immintrin.h>

#include "rope_attention_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// One translation unit per instruction set (AVX2 here): the same kernel header instantiated
// under that target, so these files differ only in their vector width and target.
namespace vqext {
namespace attention {
namespace {
#define VQEXT_VEC_BYTES 32
#include "rope_attention_cpu_kernels.h"
#undef VQEXT_VEC_BYTES
}  // namespace

const AttentionKernels& attention_kernels_avx2() {
  static const AttentionKernels table = kernel_table();
  return table;
}

}  // namespace attention
}  // namespace vqext

#pragma GCC pop_options
#endif  // VQEXT_X86_KERNELS
