// AVX-512 nearest-code kernel (x86-64), taken where vqext::cpu_isa() is avx512. Every header is
// included before the target switch, so nothing with external linkage besides
// nearest_f32_rows_avx512 is compiled for AVX-512 here.
#include "../../common/cpu_features.h"
#if VQEXT_X86_KERNELS
#include <immintrin.h>

#include <cstdint>

#include "nearest_code_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")

#include "nearest_code_kernel.h"

// Alike in shape with the other instruction sets' files by design: one set of intrinsics per ISA.
namespace vqext {
namespace vq {
namespace {

struct Avx512Lanes {
  static constexpr int W = 16;
  using V = __m512;
  using I = __m512i;
  using M = __mmask16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static V bcast(float v) { return _mm512_set1_ps(v); }
  static I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static M less(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  // where m: b, else a
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, a, b); }
  static I selecti(M m, I a, I b) { return _mm512_mask_blend_epi32(m, a, b); }
  // Index of the best lane (code = panel * 16 + lane): smallest value, ties to the smallest code.
  static int64_t argmin_lanes(const float* val, const int32_t* panel, int64_t K) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i code = _mm512_add_epi32(_mm512_slli_epi32(loadi(panel), 4), lane);
    const __mmask16 valid = _mm512_cmplt_epi32_mask(code, _mm512_set1_epi32(static_cast<int32_t>(K)));
    const __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(__builtin_inff()), valid, load(val));
    const float m = _mm512_reduce_min_ps(v);
    const __mmask16 at_min = _mm512_mask_cmp_ps_mask(valid, v, _mm512_set1_ps(m), _CMP_EQ_OQ);
    if (!at_min) return 0;  // all NaN
    return _mm512_mask_reduce_min_epi32(at_min, code);
  }
};

}  // namespace

void nearest_f32_rows_avx512(const F32Search& s, int64_t row_begin, int64_t row_end) {
  // 32 vector registers: 4 rows x 2 panels of accumulators plus the 8 running-argmin vectors
  // stay in registers across the whole code block.
  search_rows_dispatch_d<Avx512Lanes, 4, 2>(s, row_begin, row_end);
}

}  // namespace vq
}  // namespace vqext

#pragma GCC pop_options
#endif  // VQEXT_X86_KERNELS
