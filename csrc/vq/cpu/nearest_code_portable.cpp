// Portable nearest-code kernel: GCC vector types of 16 bytes (SSE2 on x86-64, NEON on aarch64)
// that the compiler lowers for whatever the baseline target is. Taken where vqext::cpu_isa() is
// portable: CPUs without AVX2 + FMA, non-x86 CPUs, or VQEXT_CPU_ISA=portable.
#include <cstdint>
#include <cstring>

#include "nearest_code_kernel.h"

namespace vqext {
namespace vq {
namespace {

struct PortableLanes {
  static constexpr int W = kLanesPortable;
  typedef float V __attribute__((vector_size(W * 4)));
  typedef int32_t I __attribute__((vector_size(W * 4)));
  using M = I;
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static I loadi(const int32_t* p) {
    I v;
    std::memcpy(&v, p, sizeof(I));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static void storei(int32_t* p, I v) { std::memcpy(p, &v, sizeof(I)); }
  static V bcast(float v) { return V{} + v; }
  static I set1i(int32_t v) { return I{} + v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static M less(V a, V b) { return a < b; }
  // where m: b, else a
  static V select(M m, V a, V b) { return m ? b : a; }
  static I selecti(M m, I a, I b) { return m ? b : a; }
  // Index of the best lane (code = panel * W + lane): smallest value, ties to the smallest code;
  // 0 when no lane holds a real code with a comparable value (an all-NaN row).
  static int64_t argmin_lanes(const float* val, const int32_t* panel, int64_t K) {
    int64_t best_code = -1;
    float best = 0.f;
    for (int lane = 0; lane < W; ++lane) {
      const int64_t code = static_cast<int64_t>(panel[lane]) * W + lane;
      const float v = val[lane];
      if (code >= K || v != v) continue;
      if (best_code < 0 || v < best || (v == best && code < best_code)) {
        best = v;
        best_code = code;
      }
    }
    return best_code < 0 ? 0 : best_code;
  }
};

}  // namespace

void nearest_f32_rows_portable(const F32Search& s, int64_t row_begin, int64_t row_end) {
  // 4 rows x 2 panels = 8 independent multiply-add chains.
  search_rows_dispatch_d<PortableLanes, 4, 2>(s, row_begin, row_end);
}

}  // namespace vq
}  // namespace vqext
