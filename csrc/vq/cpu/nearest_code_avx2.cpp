// AVX2 + FMA nearest-code kernel (x86-64), taken where vqext::cpu_isa() is avx2. The unit is
// compiled for the baseline target; every header is included before the target switch, so only
// the kernel below carries AVX2 instructions.
#include "../../common/cpu_features.h"
#if VQEXT_X86_KERNELS
#include <immintrin.h>

#include <cstdint>

#include "nearest_code_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "nearest_code_kernel.h"

// Alike in shape with the other instruction sets' files by design: one set of intrinsics per ISA.
namespace vqext {
namespace vq {
namespace {

struct Avx2Lanes {
  static constexpr int W = 8;
  using V = __m256;
  using I = __m256i;
  using M = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static V bcast(float v) { return _mm256_set1_ps(v); }
  static I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static M less(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  // where m: b, else a
  static V select(M m, V a, V b) { return _mm256_blendv_ps(a, b, m); }
  static I selecti(M m, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), m));
  }
  // Index of the best lane (code = panel * 8 + lane): smallest value, ties to the smallest code.
  static int64_t argmin_lanes(const float* val, const int32_t* panel, int64_t K) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i code = _mm256_add_epi32(_mm256_slli_epi32(loadi(panel), 3), lane);
    const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(K)), code));
    const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(__builtin_inff()), load(val), valid);
    __m256 m = _mm256_min_ps(v, _mm256_permute2f128_ps(v, v, 1));
    m = _mm256_min_ps(m, _mm256_permute_ps(m, 0x4E));
    m = _mm256_min_ps(m, _mm256_permute_ps(m, 0xB1));
    const __m256 at_min = _mm256_and_ps(_mm256_cmp_ps(v, m, _CMP_EQ_OQ), valid);
    if (_mm256_testz_ps(at_min, at_min)) return 0;  // all NaN
    __m256i c = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), _mm256_castsi256_ps(code), at_min));
    c = _mm256_min_epi32(c, _mm256_permute2x128_si256(c, c, 1));
    c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, 0x4E));
    c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, 0xB1));
    return _mm256_cvtsi256_si32(c);
  }
};

}  // namespace

void nearest_f32_rows_avx2(const F32Search& s, int64_t row_begin, int64_t row_end) {
  // 4 rows x 2 panels = 8 independent FMA chains: enough to cover FMA latency on 2 pipes.
  search_rows_dispatch_d<Avx2Lanes, 4, 2>(s, row_begin, row_end);
}

}  // namespace vq
}  // namespace vqext

#pragma GCC pop_options
#endif  // VQEXT_X86_KERNELS
