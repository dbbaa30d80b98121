#pragma once
// Interface between the host code (nearest_code_cpu.cpp, which sees torch) and the float32 search
// kernels, one translation unit per instruction set: nearest_code_portable.cpp (any CPU) and, on
// x86-64, nearest_code_avx2.cpp / nearest_code_avx512.cpp. The kernel units include no torch
// headers, so no inline function of a shared header is emitted there for a wider target.
#include <cstdint>

#include "../../common/cpu_features.h"

namespace vqext {
namespace vq {

// One head's search problem over float32 rows, with the codebook already packed by pack_codebook:
//   packed[p][d][lane] = scale * c[p * lanes + lane][d]   (scale -2 for l2, -1 for ip)
//   bias[p][lane]      = ||c||^2 for l2, 0 for ip; +inf on padding lanes.
// The kernel minimises bias + x . packed over k, so the argmin is the l2 / ip answer.
struct F32Search {
  const float* x;          // row r starts at x + r * x_row_stride
  int64_t x_row_stride;
  const float* packed;     // [panels][D][lanes]
  const float* bias;       // [panels][lanes]
  int64_t panels;          // a multiple of kPanelsPerStep
  int64_t K;
  int64_t D;
  int64_t* index;          // row r writes index[r * index_stride]
  int64_t index_stride;
};

constexpr int kPanelsPerStep = 2;

// Nearest code for rows [row_begin, row_end) with the codebook packed `lanes` codes per panel.
using NearestRowsFn = void (*)(const F32Search& s, int64_t row_begin, int64_t row_end);
struct NearestCodeKernel {
  int lanes;
  NearestRowsFn rows;
};

void nearest_f32_rows_portable(const F32Search& s, int64_t row_begin, int64_t row_end);
constexpr int kLanesPortable = 4;
#if VQEXT_X86_KERNELS
void nearest_f32_rows_avx2(const F32Search& s, int64_t row_begin, int64_t row_end);
void nearest_f32_rows_avx512(const F32Search& s, int64_t row_begin, int64_t row_end);
constexpr int kLanesAvx2 = 8;
constexpr int kLanesAvx512 = 16;
#endif

inline NearestCodeKernel nearest_code_kernel(CpuIsa isa) {
#if VQEXT_X86_KERNELS
  if (isa == CpuIsa::kAvx512) return {kLanesAvx512, &nearest_f32_rows_avx512};
  if (isa == CpuIsa::kAvx2) return {kLanesAvx2, &nearest_f32_rows_avx2};
#endif
  (void)isa;
  return {kLanesPortable, &nearest_f32_rows_portable};
}

}  // namespace vq
}  // namespace vqext
