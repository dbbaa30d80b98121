// AVX2 + FMA nearest-code kernel: the portable baseline (the whole library is built with -mavx2).
#include <immintrin.h>

#include <cstdint>

#include "nearest_code_kernel.h"

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
};

}  // namespace

void nearest_f32_rows_avx2(const F32Search& s, int64_t row_begin, int64_t row_end) {
  // 4 rows x 2 panels = 8 independent FMA chains: enough to cover FMA latency on 2 pipes.
  search_rows_dispatch_d<Avx2Lanes, 4, 2>(s, row_begin, row_end);
}

}  // namespace vq
}  // namespace vqext
