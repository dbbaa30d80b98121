// Portable rope_attention kernels: GCC vector types of 16 bytes (SSE2 on x86-64, NEON on
// aarch64) lowered for the baseline target. Taken where vqext::cpu_isa() is portable: CPUs
// without AVX2 + FMA, non-x86 CPUs, or VQEXT_CPU_ISA=portable.
#include "rope_attention_cpu.h"

// One translation unit per instruction set (portable here): the same kernel header instantiated
// under that target, so these files differ only in their vector width and target.
namespace vqext {
namespace attention {
namespace {
#define VQEXT_VEC_BYTES 16
#include "rope_attention_cpu_kernels.h"
#undef VQEXT_VEC_BYTES
}  // namespace

const AttentionKernels& attention_kernels_portable() {
  static const AttentionKernels table = kernel_table();
  return table;
}

}  // namespace attention
}  // namespace vqext
