// nearest_code on CUDA: one launch, GEMM-style shared-memory tiles with the argmin fused in.
//
// A block owns kBM rows of one head and walks the whole codebook in kBN-code tiles, staging kBK
// dimensions of rows and codes at a time in shared memory (converted to the accumulation type,
// float for float16/bfloat16/float32, double for float64). Each of the 16 x 16 threads holds a
// 4 x 4 register tile of dot products, adds ||c||^2 (accumulated alongside from the same shared
// tile) and keeps a running (value, index) per row over its codes, visited in increasing k.
// A 16-lane shuffle reduction (ties to the smaller index) finishes each row, and the winning
// code's exact score is recomputed from global memory. No N x K buffer exists at any point.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cfloat>
#include <tuple>

#include "../vq_checks.h"

// A CUDA build of torch ships c10/cuda complete; the CPU wheel used for the compile-only CI check
// lacks its generated cuda_cmake_macros.h. There the kernel still compiles, launched on the
// legacy default stream with a hand-rolled device guard.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define VQEXT_HAVE_C10_CUDA 1
#else
#define VQEXT_HAVE_C10_CUDA 0
#endif

namespace vqext {
namespace vq {
namespace {

#if !VQEXT_HAVE_C10_CUDA
struct DeviceGuard {
  int previous = 0;
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous);
    cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous); }
};
#endif

constexpr int kThreadsX = 16;  // threads along codes
constexpr int kThreadsY = 16;  // threads along rows
constexpr int kTM = 4;         // rows per thread
constexpr int kTN = 4;         // codes per thread
constexpr int kBM = kThreadsY * kTM;
constexpr int kBN = kThreadsX * kTN;
constexpr int kBK = 16;

template <typename acc_t>
__device__ __forceinline__ acc_t positive_inf();
template <>
__device__ __forceinline__ float positive_inf<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double positive_inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
nearest_code_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ codebook, int64_t N, int64_t H,
                    int64_t K, int64_t D, bool l2, int64_t* __restrict__ index, scalar_t* __restrict__ score) {
  __shared__ acc_t xs[kBK][kBM + 1];
  __shared__ acc_t cs[kBK][kBN + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t h = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t x_stride = H * D;  // between consecutive rows of one head
  const scalar_t* xh = x + h * D;
  const scalar_t* ch = codebook + h * K * D;
  const acc_t inf = positive_inf<acc_t>();
  const acc_t scale = l2 ? acc_t(-2) : acc_t(-1);

  acc_t best[kTM];
  int64_t best_k[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = inf;
    best_k[i] = K;  // sentinel: no comparison succeeded yet
  }

  for (int64_t k0 = 0; k0 < K; k0 += kBN) {
    acc_t dot[kTM][kTN];
    acc_t norm[kTN];
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      norm[j] = 0;
#pragma unroll
      for (int i = 0; i < kTM; ++i) dot[i][j] = 0;
    }
    for (int64_t d0 = 0; d0 < D; d0 += kBK) {
      // Stage kBM rows x kBK dims and kBN codes x kBK dims; out-of-range entries are zero.
      for (int e = tid; e < kBM * kBK; e += kThreadsX * kThreadsY) {
        const int q = e / kBK, d = e % kBK;
        const int64_t row = row0 + q, dim = d0 + d;
        xs[d][q] = (row < N && dim < D) ? static_cast<acc_t>(xh[row * x_stride + dim]) : acc_t(0);
      }
      for (int e = tid; e < kBN * kBK; e += kThreadsX * kThreadsY) {
        const int c = e / kBK, d = e % kBK;
        const int64_t k = k0 + c, dim = d0 + d;
        cs[d][c] = (k < K && dim < D) ? static_cast<acc_t>(ch[k * D + dim]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kBK; ++d) {
        acc_t xv[kTM], cv[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) xv[i] = xs[d][ty + kThreadsY * i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) {
          cv[j] = cs[d][tx + kThreadsX * j];
          norm[j] += cv[j] * cv[j];
        }
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) dot[i][j] += xv[i] * cv[j];
      }
      __syncthreads();
    }
    // Codes of this thread in increasing k, strict less: the earliest minimum wins.
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t k = k0 + tx + kThreadsX * j;
      if (k >= K) continue;
      const acc_t bias = l2 ? norm[j] : acc_t(0);
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const acc_t v = bias + scale * dot[i][j];
        if (v < best[i]) {
          best[i] = v;
          best_k[i] = k;
        }
      }
    }
  }

  // Reduce over the 16 threads sharing a row (they are 16 consecutive lanes of one warp).
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    acc_t v = best[i];
    int64_t k = best_k[i];
#pragma unroll
    for (int offset = kThreadsX / 2; offset > 0; offset /= 2) {
      const acc_t ov = __shfl_xor_sync(0xffffffffu, v, offset, kThreadsX);
      const int64_t ok = __shfl_xor_sync(0xffffffffu, k, offset, kThreadsX);
      // A sentinel (k == K, e.g. all-NaN row) loses to any real index.
      if (ov < v || (ov == v && ok < k) || (k == K && ok < K)) {
        v = ov;
        k = ok;
      }
    }
    const int64_t row = row0 + ty + kThreadsY * i;
    if (tx == 0 && row < N) {
      if (k >= K) k = 0;
      const scalar_t* xr = xh + row * x_stride;
      const scalar_t* cr = ch + k * D;
      acc_t s = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t a = static_cast<acc_t>(xr[d]), b = static_cast<acc_t>(cr[d]);
        s += l2 ? (a - b) * (a - b) : a * b;
      }
      index[row * H + h] = k;
      score[row * H + h] = static_cast<scalar_t>(s);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                     c10::string_view metric) {
  const NearestCodeShape sh = check_nearest_code(x, codebook, metric);
  TORCH_CHECK_VALUE(x.is_cuda(), "nearest_code: x must be a CUDA tensor here");
#if VQEXT_HAVE_C10_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#else
  const DeviceGuard guard(x.device().index());
  const cudaStream_t stream = nullptr;
#endif
  const auto out_shape = nearest_code_out_shape(x);
  const at::Tensor xs = x.reshape({sh.N, sh.H, sh.D}).contiguous();
  const at::Tensor cb = codebook.reshape({sh.H, sh.K, sh.D}).contiguous();
  at::Tensor index = at::empty({sh.N, sh.H}, x.options().dtype(at::kLong));
  at::Tensor score = at::empty({sh.N, sh.H}, x.options());
  if (sh.N > 0) {
    TORCH_CHECK_VALUE(sh.H <= 65535, "nearest_code: at most 65535 heads on CUDA, got ", sh.H);
    const dim3 block(kThreadsX, kThreadsY);
    const dim3 grid(static_cast<unsigned>((sh.N + kBM - 1) / kBM), static_cast<unsigned>(sh.H));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      nearest_code_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          xs.data_ptr<scalar_t>(), cb.data_ptr<scalar_t>(), sh.N, sh.H, sh.K, sh.D, sh.l2,
          index.data_ptr<int64_t>(), score.data_ptr<scalar_t>());
    });
#if VQEXT_HAVE_C10_CUDA
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "nearest_code: CUDA launch failed: ", cudaGetErrorString(err));
#endif
  }
  return {index.reshape(out_shape), score.reshape(out_shape)};
}

}  // namespace
}  // namespace vq
}  // namespace vqext

TORCH_LIBRARY_IMPL(vqext, CUDA, m) { m.impl("nearest_code", &vqext::vq::nearest_code_cuda); }
