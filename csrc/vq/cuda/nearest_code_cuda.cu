// nearest_code on CUDA: GEMM-style shared-memory tiles with the argmin fused in, in one launch
// (more only beyond 2^31 - 1 blocks).
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

#include <tuple>

#include "../../common/cuda_compat.h"
#include "../vq_checks.h"

namespace vqext {
namespace vq {
namespace {

constexpr int kThreadsX = 16;  // threads along codes
constexpr int kThreadsY = 16;  // threads along rows
constexpr int kTM = 4;         // rows per thread
constexpr int kTN = 4;         // codes per thread
constexpr int kBM = kThreadsY * kTM;
constexpr int kBN = kThreadsX * kTN;
constexpr int kBK = 16;
constexpr int kBlockThreads = kThreadsX * kThreadsY;

template <typename acc_t>
__device__ __forceinline__ acc_t positive_inf();
template <>
__device__ __forceinline__ float positive_inf<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double positive_inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

// What a block works on: kBM rows of head h of x (rows H * D apart) and head h's codebook.
template <typename scalar_t>
struct HeadSlice {
  const scalar_t* x;   // row 0 of head h
  const scalar_t* cb;  // code 0 of head h
  int64_t x_stride, row0, N, K, D;
};

// Stage 1: rows [row0, row0 + kBM) and codes [k0, k0 + kBN) at dims [d0, d0 + kBK) into shared
// memory, transposed (dims first) and converted to acc_t; entries out of range are zero.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_tiles(const HeadSlice<scalar_t>& hs, int64_t k0, int64_t d0, int tid,
                                            acc_t (*xs)[kBM + 1], acc_t (*cs)[kBN + 1]) {
  for (int e = tid; e < kBM * kBK; e += kBlockThreads) {
    const int q = e / kBK, d = e % kBK;
    const int64_t row = hs.row0 + q, dim = d0 + d;
    xs[d][q] = (row < hs.N && dim < hs.D) ? static_cast<acc_t>(hs.x[row * hs.x_stride + dim]) : acc_t(0);
  }
  for (int e = tid; e < kBN * kBK; e += kBlockThreads) {
    const int c = e / kBK, d = e % kBK;
    const int64_t k = k0 + c, dim = d0 + d;
    cs[d][c] = (k < hs.K && dim < hs.D) ? static_cast<acc_t>(hs.cb[k * hs.D + dim]) : acc_t(0);
  }
}

// Stage 2: this thread's kTM x kTN dot products over the staged dims, and its codes' squared
// norms accumulated from the same shared tile.
template <typename acc_t>
__device__ __forceinline__ void accumulate_tile(const acc_t (*xs)[kBM + 1], const acc_t (*cs)[kBN + 1], int tx,
                                                int ty, acc_t (&dot)[kTM][kTN], acc_t (&norm)[kTN]) {
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
}

// Stage 3: fold one code tile's scores (||c||^2 - 2 x.c for l2, -x.c for ip) into the running
// best of each of this thread's rows. Codes in increasing k, strict less: the earliest minimum
// wins; a NaN score never replaces anything.
template <typename acc_t>
__device__ __forceinline__ void keep_best(const acc_t (&dot)[kTM][kTN], const acc_t (&norm)[kTN], int64_t k0, int tx,
                                          int64_t K, bool l2, acc_t (&best)[kTM], int64_t (&best_k)[kTM]) {
  const acc_t scale = l2 ? acc_t(-2) : acc_t(-1);
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

// Stage 4: the row's winner over the 16 threads sharing it (16 consecutive lanes of one warp),
// ties to the smaller index. A sentinel (k == K: no comparison succeeded, e.g. an all-NaN row)
// loses to any real index. Every lane ends with the winner.
template <typename acc_t>
__device__ __forceinline__ int64_t reduce_row(acc_t v, int64_t k, int64_t K) {
#pragma unroll
  for (int offset = kThreadsX / 2; offset > 0; offset /= 2) {
    const acc_t ov = __shfl_xor_sync(0xffffffffu, v, offset, kThreadsX);
    const int64_t ok = __shfl_xor_sync(0xffffffffu, k, offset, kThreadsX);
    if (ov < v || (ov == v && ok < k) || (k == K && ok < K)) {
      v = ov;
      k = ok;
    }
  }
  return k;
}

// Stage 5: the winning code's exact score (distance or inner product) recomputed from global
// memory in acc_t, and both outputs written. A row that found no code (all NaN) reports code 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_row(const HeadSlice<scalar_t>& hs, int64_t row, int64_t k, int64_t H, int64_t h,
                                          bool l2, int64_t* index, scalar_t* score) {
  if (k >= hs.K) k = 0;
  const scalar_t* xr = hs.x + row * hs.x_stride;
  const scalar_t* cr = hs.cb + k * hs.D;
  acc_t s = 0;
  for (int64_t d = 0; d < hs.D; ++d) {
    const acc_t a = static_cast<acc_t>(xr[d]), b = static_cast<acc_t>(cr[d]);
    s += l2 ? (a - b) * (a - b) : a * b;
  }
  index[row * H + h] = k;
  score[row * H + h] = static_cast<scalar_t>(s);
}

// One block: kBM rows of one head against that head's whole codebook. Blocks are numbered
// row-tile-fastest, then head (cuda::launch_flat).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
nearest_code_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ codebook, int64_t N, int64_t H,
                    int64_t K, int64_t D, bool l2, int64_t* __restrict__ index, scalar_t* __restrict__ score,
                    int64_t first_block) {
  __shared__ acc_t xs[kBK][kBM + 1];
  __shared__ acc_t cs[kBK][kBN + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t row_tiles = (N + kBM - 1) / kBM;
  const int64_t blk = cuda::flat_block(first_block);
  const int64_t h = blk / row_tiles;
  const HeadSlice<scalar_t> hs{x + h * D, codebook + h * K * D, H * D, (blk - h * row_tiles) * kBM, N, K, D};

  acc_t best[kTM];
  int64_t best_k[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = positive_inf<acc_t>();
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
      stage_tiles<scalar_t, acc_t>(hs, k0, d0, tid, xs, cs);
      __syncthreads();
      accumulate_tile<acc_t>(xs, cs, tx, ty, dot, norm);
      __syncthreads();
    }
    keep_best<acc_t>(dot, norm, k0, tx, K, l2, best, best_k);
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t k = reduce_row<acc_t>(best[i], best_k[i], K);
    const int64_t row = hs.row0 + ty + kThreadsY * i;
    if (tx == 0 && row < N) write_row<scalar_t, acc_t>(hs, row, k, H, h, l2, index, score);
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                     c10::string_view metric) {
  const NearestCodeShape sh = check_nearest_code(x, codebook, metric);
  TORCH_CHECK_VALUE(x.is_cuda(), "nearest_code: x must be a CUDA tensor here");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = cuda::current_stream();
  const auto out_shape = nearest_code_out_shape(x);
  const at::Tensor xs = x.reshape({sh.N, sh.H, sh.D}).contiguous();
  const at::Tensor cb = codebook.reshape({sh.H, sh.K, sh.D}).contiguous();
  at::Tensor index = at::empty({sh.N, sh.H}, x.options().dtype(at::kLong));
  at::Tensor score = at::empty({sh.N, sh.H}, x.options());
  if (sh.N > 0) {
    const dim3 block(kThreadsX, kThreadsY);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      cuda::launch_flat(sh.H * ((sh.N + kBM - 1) / kBM), [&](int64_t first, unsigned blocks) {
        nearest_code_kernel<scalar_t, acc_t><<<blocks, block, 0, stream>>>(
            xs.data_ptr<scalar_t>(), cb.data_ptr<scalar_t>(), sh.N, sh.H, sh.K, sh.D, sh.l2,
            index.data_ptr<int64_t>(), score.data_ptr<scalar_t>(), first);
      });
    });
  }
  return {index.reshape(out_shape), score.reshape(out_shape)};
}

}  // namespace
}  // namespace vq
}  // namespace vqext

TORCH_LIBRARY_IMPL(vqext, CUDA, m) { m.impl("nearest_code", &vqext::vq::nearest_code_cuda); }
