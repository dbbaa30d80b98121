// Rotary position embedding (RoPE), the one definition every kernel uses: apply_rope and
// rope_attention on the CPU and on CUDA, and VQFormer's cached decoding step.
//
// Pair i of a head of size d, (x[2i], x[2i+1]), is rotated at position pos by the angle
// pos * base^(-2i/d), as vqext.ops.reference does. The angle is formed in double: positions can
// be large, and a float angle would lose the low bits of pos * inv_freq.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VQEXT_HD __host__ __device__ __forceinline__
#else
#define VQEXT_HD inline
#endif

namespace vqext {
namespace rope {

// base^(-2i/d): the angle per position of pair i.
VQEXT_HD double inv_freq(int64_t i, int64_t d, double base) {
  return pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(d));
}

// Cosine and sine of pos * inv_freq in the accumulation type. On the host they are computed in
// double and rounded, so CPU tables equal the reference's rounded values. On the device a float
// rotation reduces the angle to [-pi, pi] in double and finishes with sincosf: double sincos per
// element would run at the GPU's FP64 rate.
VQEXT_HD void cos_sin(int64_t pos, double inv_freq, float& c, float& s) {
  const double a = static_cast<double>(pos) * inv_freq;
#if defined(__CUDA_ARCH__)
  const double n = rint(a * 0.15915494309189535);
  sincosf(static_cast<float>(a - n * 6.283185307179586), &s, &c);
#else
  c = static_cast<float>(std::cos(a));
  s = static_cast<float>(std::sin(a));
#endif
}

VQEXT_HD void cos_sin(int64_t pos, double inv_freq, double& c, double& s) {
  const double a = static_cast<double>(pos) * inv_freq;
#if defined(__CUDA_ARCH__)
  sincos(a, &s, &c);
#else
  c = std::cos(a);
  s = std::sin(a);
#endif
}

// Rotates the pair (x0, x1) in place by the angle with cosine c and sine s (R x); passing -s
// applies R^T, the inverse rotation (apply_rope's inverse, and the gradients of rotated inputs).
template <typename A>
VQEXT_HD void rotate_pair(A& x0, A& x1, A c, A s) {
  const A y0 = x0 * c - x1 * s;
  x1 = x0 * s + x1 * c;
  x0 = y0;
}

}  // namespace rope
}  // namespace vqext
