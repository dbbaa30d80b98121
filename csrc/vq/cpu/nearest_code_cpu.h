#pragma once
// Interface between the dispatcher glue (vq_ops.cpp, which sees torch) and the SIMD kernels
// (nearest_code_avx2.cpp / nearest_code_avx512.cpp, which see only <immintrin.h>). Keeping torch
// headers out of the AVX-512 translation unit means no inline function from a shared header can be
// emitted there with AVX-512 instructions and then picked by the linker for AVX2-only machines.
#include <cstdint>

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

// Nearest code for rows [row_begin, row_end). Lanes: 8 (AVX2) or 16 (AVX-512).
void nearest_f32_rows_avx2(const F32Search& s, int64_t row_begin, int64_t row_end);
void nearest_f32_rows_avx512(const F32Search& s, int64_t row_begin, int64_t row_end);

constexpr int kLanesAvx2 = 8;
constexpr int kLanesAvx512 = 16;

}  // namespace vq
}  // namespace vqext
