// CUDA kernels of apply_rope and rope_attention (forward and backward).
//
// One thread owns one query row (forward, dq) or one key row (dk, dv) and keeps it in registers
// in the accumulation type A (float for half/bfloat16/float, double for double); the other side
// streams through shared-memory tiles, rotated (RoPE) while they are loaded. The forward keeps an
// online softmax and saves only the row logsumexp; the backward recomputes probabilities from it
// (D_i = rowsum(dO * O), dS = P * (dP - D)), so no Tq x Tk buffer exists on either pass. Head
// sizes up to 128 are compiled for DMAX in {8, 16, 32, 64, 128} with the runtime d <= DMAX.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../../common/cuda_compat.h"
#include "../../common/rope.h"
#include "../attention_common.h"

namespace vqext {
namespace attention {
namespace {

struct Params {
  int64_t B, Hq, Tq, Bk, Hk, Tk, d, group;
  bool causal, rope_q, rope_k;
  double scale, base;
  int64_t q_offset, k_offset;
  const int64_t* q_offsets;  // device, nullable
  const int64_t* k_offsets;
  int64_t q_offsets_n, k_offsets_n;
};

// A block of the forward and dq kernels: kThreads consecutive query rows of one (batch, head).
// Blocks are numbered tile-fastest, then head, then batch (cuda::launch_flat).
struct RowBlock {
  int64_t tile, h, b;
};
__device__ __forceinline__ RowBlock row_block(int64_t blk, int64_t rows, int64_t heads, int rows_per_block) {
  const int64_t tiles = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t bh = blk / tiles;
  return {blk - bh * tiles, bh % heads, bh / heads};
}

__device__ __forceinline__ int64_t start_pos(int64_t base, const int64_t* per_batch, int64_t n, int64_t b) {
  return base + (per_batch ? per_batch[n == 1 ? 0 : b] : 0);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Loads row x (d values) into dst (DMAX registers, zero beyond d), rotated by R (sign +1) or R^T
// (sign -1) at position pos when rope, and multiplied by scale.
template <typename T, typename A, int DMAX>
__device__ __forceinline__ void load_row(const T* x, A* dst, int d, bool rope, int64_t pos, const double* inv_freq,
                                         A scale) {
#pragma unroll
  for (int i = 0; i < DMAX / 2; ++i) {
    A x0 = 0, x1 = 0;
    if (2 * i < d) {
      x0 = static_cast<A>(x[2 * i]);
      x1 = static_cast<A>(x[2 * i + 1]);
      if (rope) {
        A c, s;
        rope::cos_sin(pos, inv_freq[i], c, s);
        rope::rotate_pair(x0, x1, c, s);
      }
    }
    dst[2 * i] = scale * x0;
    dst[2 * i + 1] = scale * x1;
  }
}

template <typename A>
constexpr int tile_rows(int dmax) {
  return (16384 / (dmax * static_cast<int>(sizeof(A)))) < 64 ? (16384 / (dmax * static_cast<int>(sizeof(A)))) : 64;
}

// Cooperative tile load: rows [r0, r0 + n) of x (row stride d) into sh[n][DMAX], rotated at
// positions pos0 + r when rope, times scale; rows beyond `valid` are zero.
template <typename T, typename A, int DMAX, int ROWS>
__device__ __forceinline__ void load_tile(const T* x, A (*sh)[DMAX], int64_t r0, int valid, int d, bool rope,
                                          int64_t pos0, const double* inv_freq, A scale) {
  const int half = DMAX / 2;
  for (int e = threadIdx.x; e < ROWS * half; e += blockDim.x) {
    const int r = e / half, i = e % half;
    A x0 = 0, x1 = 0;
    if (r < valid && 2 * i < d) {
      const T* row = x + (r0 + r) * d;
      x0 = static_cast<A>(row[2 * i]);
      x1 = static_cast<A>(row[2 * i + 1]);
      if (rope) {
        A c, s;
        rope::cos_sin(pos0 + r, inv_freq[i], c, s);
        rope::rotate_pair(x0, x1, c, s);
      }
    }
    sh[r][2 * i] = scale * x0;
    sh[r][2 * i + 1] = scale * x1;
  }
}

__device__ __forceinline__ void init_inv_freq(double* inv_freq, int d, double base) {
  for (int i = threadIdx.x; i < d / 2; i += blockDim.x) inv_freq[i] = rope::inv_freq(i, d, base);
}

constexpr int kThreads = 64;

// ---------------------------------------------------------------------------------------------
template <typename T, typename A, int DMAX>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p, const T* __restrict__ q, const T* __restrict__ k,
                                                           const T* __restrict__ v, T* __restrict__ out,
                                                           A* __restrict__ lse, int64_t first_block) {
  constexpr int BK = tile_rows<A>(DMAX);
  __shared__ A Ks[BK][DMAX];
  __shared__ A Vs[BK][DMAX];
  __shared__ double inv_freq[64];
  const int d = static_cast<int>(p.d);
  init_inv_freq(inv_freq, d, p.base);
  __syncthreads();
  const RowBlock rb = row_block(cuda::flat_block(first_block), p.Tq, p.Hq, kThreads);
  const int64_t b = rb.b, h = rb.h;
  const int64_t bk = p.Bk == 1 ? 0 : b, hk = h / p.group;
  const int64_t i = rb.tile * kThreads + threadIdx.x;
  const bool active = i < p.Tq;
  const int64_t qs = start_pos(p.q_offset, p.q_offsets, p.q_offsets_n, b);
  const int64_t ks = start_pos(p.k_offset, p.k_offsets, p.k_offsets_n, b);
  const int64_t row = (b * p.Hq + h) * p.Tq + i;
  A qr[DMAX], acc[DMAX];
  if (active) load_row<T, A, DMAX>(q + row * d, qr, d, p.rope_q, qs + i, inv_freq, static_cast<A>(p.scale));
#pragma unroll
  for (int c = 0; c < DMAX; ++c) acc[c] = 0;
  A m = neg_inf<A>(), l = 0;
  const int64_t last = std::min<int64_t>(p.Tq, (rb.tile + 1) * kThreads) - 1;
  int64_t kend = p.Tk;
  if (p.causal) kend = std::max<int64_t>(0, std::min<int64_t>(p.Tk, qs + last - ks + 1));
  const T* kbase = k + (bk * p.Hk + hk) * p.Tk * d;
  const T* vbase = v + (bk * p.Hk + hk) * p.Tk * d;
  for (int64_t kb = 0; kb < kend; kb += BK) {
    const int nk = static_cast<int>(std::min<int64_t>(BK, kend - kb));
    __syncthreads();
    load_tile<T, A, DMAX, BK>(kbase, Ks, kb, nk, d, p.rope_k, ks + kb, inv_freq, A(1));
    load_tile<T, A, DMAX, BK>(vbase, Vs, kb, nk, d, false, 0, inv_freq, A(1));
    __syncthreads();
    if (!active) continue;
    int lim = nk;
    if (p.causal) lim = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, qs + i - (ks + kb) + 1)));
    for (int j0 = 0; j0 < lim; j0 += 8) {
      A sc[8];
      A mx = m;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int j = j0 + t;
        A s = neg_inf<A>();
        if (j < lim) {
          s = 0;
#pragma unroll
          for (int c = 0; c < DMAX; ++c) s += qr[c] * Ks[j][c];
        }
        sc[t] = s;
        mx = s > mx ? s : mx;
      }
      const A corr = m == neg_inf<A>() ? A(0) : exp_acc(m - mx);
      l *= corr;
#pragma unroll
      for (int c = 0; c < DMAX; ++c) acc[c] *= corr;
      m = mx;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int j = j0 + t;
        if (j < lim) {
          const A pj = exp_acc(sc[t] - m);
          l += pj;
#pragma unroll
          for (int c = 0; c < DMAX; ++c) acc[c] += pj * Vs[j][c];
        }
      }
    }
  }
  if (!active) return;
  T* orow = out + row * d;
  // l is 0 when the row sees no key (zeros, lse -inf) and NaN when one of its scores was NaN or
  // inf - inf arose in the softmax: that row comes out NaN with lse NaN, as in the reference and
  // the CPU kernels, and its backward gives NaN (never inf) in dq and the dk, dv it reaches.
  if (l != A(0)) {
    const A inv = A(1) / l;
#pragma unroll
    for (int c = 0; c < DMAX; ++c)
      if (c < d) orow[c] = static_cast<T>(acc[c] * inv);
    lse[row] = m + log_acc(l);
  } else {
#pragma unroll
    for (int c = 0; c < DMAX; ++c)
      if (c < d) orow[c] = static_cast<T>(A(0));
    lse[row] = neg_inf<A>();
  }
}

// ---------------------------------------------------------------------------------------------
// dq: one thread per query row, keys streamed through shared memory.
template <typename T, typename A, int DMAX>
// Its prologue mirrors forward_kernel's (stage and rotate one query tile): the two kernels keep
// their register budgets separate instead of sharing a device function that would raise both.
__global__ void __launch_bounds__(kThreads) dq_kernel(Params p, const T* __restrict__ gout, const T* __restrict__ q,
                                                      const T* __restrict__ k, const T* __restrict__ v,
                                                      const A* __restrict__ lse, const A* __restrict__ Drow,
                                                      T* __restrict__ dq, int64_t first_block) {
  constexpr int BK = tile_rows<A>(DMAX);
  __shared__ A Ks[BK][DMAX];
  __shared__ A Vs[BK][DMAX];
  __shared__ double inv_freq[64];
  const int d = static_cast<int>(p.d);
  init_inv_freq(inv_freq, d, p.base);
  __syncthreads();
  const RowBlock rb = row_block(cuda::flat_block(first_block), p.Tq, p.Hq, kThreads);
  const int64_t b = rb.b, h = rb.h;
  const int64_t bk = p.Bk == 1 ? 0 : b, hk = h / p.group;
  const int64_t i = rb.tile * kThreads + threadIdx.x;
  const bool active = i < p.Tq;
  const int64_t qs = start_pos(p.q_offset, p.q_offsets, p.q_offsets_n, b);
  const int64_t ks = start_pos(p.k_offset, p.k_offsets, p.k_offsets_n, b);
  const int64_t row = (b * p.Hq + h) * p.Tq + i;
  A qr[DMAX], dor[DMAX], acc[DMAX];
  A L = 0, D = 0;
  if (active) {
    load_row<T, A, DMAX>(q + row * d, qr, d, p.rope_q, qs + i, inv_freq, static_cast<A>(p.scale));
    load_row<T, A, DMAX>(gout + row * d, dor, d, false, 0, inv_freq, A(1));
    L = lse[row];
    D = Drow[row];
  }
#pragma unroll
  for (int c = 0; c < DMAX; ++c) acc[c] = 0;
  const int64_t last = std::min<int64_t>(p.Tq, (rb.tile + 1) * kThreads) - 1;
  int64_t kend = p.Tk;
  if (p.causal) kend = std::max<int64_t>(0, std::min<int64_t>(p.Tk, qs + last - ks + 1));
  const T* kbase = k + (bk * p.Hk + hk) * p.Tk * d;
  const T* vbase = v + (bk * p.Hk + hk) * p.Tk * d;
  for (int64_t kb = 0; kb < kend; kb += BK) {
    const int nk = static_cast<int>(std::min<int64_t>(BK, kend - kb));
    __syncthreads();
    load_tile<T, A, DMAX, BK>(kbase, Ks, kb, nk, d, p.rope_k, ks + kb, inv_freq, A(1));
    load_tile<T, A, DMAX, BK>(vbase, Vs, kb, nk, d, false, 0, inv_freq, A(1));
    __syncthreads();
    if (!active) continue;
    int lim = nk;
    if (p.causal) lim = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, qs + i - (ks + kb) + 1)));
    for (int j = 0; j < lim; ++j) {
      A s = 0, dp = 0;
#pragma unroll
      for (int c = 0; c < DMAX; ++c) {
        s += qr[c] * Ks[j][c];
        dp += dor[c] * Vs[j][c];
      }
      const A ds = exp_acc(s - L) * (dp - D);
#pragma unroll
      for (int c = 0; c < DMAX; ++c) acc[c] += ds * Ks[j][c];
    }
  }
  if (!active) return;
  // dq = scale * R^T acc
  const A scale = static_cast<A>(p.scale);
  T* drow = dq + row * d;
#pragma unroll
  for (int ii = 0; ii < DMAX / 2; ++ii) {
    if (2 * ii < d) {
      A g0 = acc[2 * ii], g1 = acc[2 * ii + 1];
      if (p.rope_q) {  // the gradient goes back through R^T
        A c, s;
        rope::cos_sin(qs + i, inv_freq[ii], c, s);
        rope::rotate_pair(g0, g1, c, -s);
      }
      drow[2 * ii] = static_cast<T>(scale * g0);
      drow[2 * ii + 1] = static_cast<T>(scale * g1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dk, dv: one thread per key row of one (kv batch, kv head); every query batch and grouped head
// that reads it streams through shared memory. dk is accumulated per query batch in the rotated
// frame, turned back by R^T and added to a float/double buffer owned by this thread's row.
template <typename T, typename A, int DMAX>
__global__ void __launch_bounds__(kThreads) dkv_kernel(Params p, const T* __restrict__ gout, const T* __restrict__ q,
                                                       const T* __restrict__ k, const T* __restrict__ v,
                                                       const A* __restrict__ lse, const A* __restrict__ Drow,
                                                       A* __restrict__ dk_acc, T* __restrict__ dv,
                                                       int64_t first_block) {
  constexpr int BQ = tile_rows<A>(DMAX);
  __shared__ A Qs[BQ][DMAX];
  __shared__ A dOs[BQ][DMAX];
  __shared__ A Ls[BQ], Ds[BQ];
  __shared__ double inv_freq[64];
  const int d = static_cast<int>(p.d);
  init_inv_freq(inv_freq, d, p.base);
  __syncthreads();
  const RowBlock rb = row_block(cuda::flat_block(first_block), p.Tk, p.Hk, kThreads);
  const int64_t bk = rb.b, hk = rb.h;
  const int64_t jfirst = rb.tile * kThreads;
  const int64_t j = jfirst + threadIdx.x;
  const bool active = j < p.Tk;
  const int64_t krow = (bk * p.Hk + hk) * p.Tk + j;
  A kr[DMAX], vr[DMAX], dkr[DMAX], dvr[DMAX];
  if (active) load_row<T, A, DMAX>(v + krow * d, vr, d, false, 0, inv_freq, A(1));
#pragma unroll
  for (int c = 0; c < DMAX; ++c) dvr[c] = 0;
  const A scale = static_cast<A>(p.scale);
  const int64_t b_begin = p.Bk == 1 ? 0 : bk, b_end = p.Bk == 1 ? p.B : bk + 1;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t qs = start_pos(p.q_offset, p.q_offsets, p.q_offsets_n, b);
    const int64_t ks = start_pos(p.k_offset, p.k_offsets, p.k_offsets_n, b);
    if (active) load_row<T, A, DMAX>(k + krow * d, kr, d, p.rope_k, ks + j, inv_freq, A(1));
#pragma unroll
    for (int c = 0; c < DMAX; ++c) dkr[c] = 0;
    // first query row that sees this block's first key
    const int64_t qbeg = p.causal ? std::max<int64_t>(0, ks + jfirst - qs) : 0;
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t h = hk * p.group + g;
      const int64_t rowbase = (b * p.Hq + h) * p.Tq;
      for (int64_t i0 = qbeg; i0 < p.Tq; i0 += BQ) {
        const int nq = static_cast<int>(std::min<int64_t>(BQ, p.Tq - i0));
        __syncthreads();
        load_tile<T, A, DMAX, BQ>(q + rowbase * d, Qs, i0, nq, d, p.rope_q, qs + i0, inv_freq, scale);
        load_tile<T, A, DMAX, BQ>(gout + rowbase * d, dOs, i0, nq, d, false, 0, inv_freq, A(1));
        for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
          Ls[r] = r < nq ? lse[rowbase + i0 + r] : A(0);
          Ds[r] = r < nq ? Drow[rowbase + i0 + r] : A(0);
        }
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < nq; ++r) {
          if (p.causal && ks + j > qs + i0 + r) continue;
          A s = 0, dp = 0;
#pragma unroll
          for (int c = 0; c < DMAX; ++c) {
            s += Qs[r][c] * kr[c];
            dp += dOs[r][c] * vr[c];
          }
          const A pr = exp_acc(s - Ls[r]);
          const A ds = pr * (dp - Ds[r]);
#pragma unroll
          for (int c = 0; c < DMAX; ++c) {
            dvr[c] += pr * dOs[r][c];
            dkr[c] += ds * Qs[r][c];
          }
        }
      }
    }
    if (!active) continue;
    A* dst = dk_acc + krow * d;
#pragma unroll
    for (int ii = 0; ii < DMAX / 2; ++ii) {
      if (2 * ii < d) {
        A g0 = dkr[2 * ii], g1 = dkr[2 * ii + 1];
        if (p.rope_k) {  // the gradient goes back through R^T
          A c, s;
          rope::cos_sin(ks + j, inv_freq[ii], c, s);
          rope::rotate_pair(g0, g1, c, -s);
        }
        dst[2 * ii] += g0;
        dst[2 * ii + 1] += g1;
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < DMAX; ++c)
    if (c < d) dv[krow * d + c] = static_cast<T>(dvr[c]);
}

// ---------------------------------------------------------------------------------------------
template <typename T, typename A>
__global__ void apply_rope_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t H, int64_t T_,
                                  int d, int64_t offset, const int64_t* offsets, int64_t offsets_n, double base,
                                  A sign, int64_t first_block) {
  const int half = d / 2;
  const int64_t e = cuda::flat_block(first_block) * blockDim.x + threadIdx.x;
  if (e >= rows * half) return;
  const int64_t r = e / half;
  const int i = static_cast<int>(e % half);
  const int64_t t = r % T_, b = r / (H * T_);
  const int64_t pos = start_pos(offset, offsets, offsets_n, b) + t;
  A c, s;
  rope::cos_sin(pos, rope::inv_freq(i, d, base), c, s);
  A x0 = static_cast<A>(x[r * d + 2 * i]), x1 = static_cast<A>(x[r * d + 2 * i + 1]);
  rope::rotate_pair(x0, x1, c, sign * s);
  y[r * d + 2 * i] = static_cast<T>(x0);
  y[r * d + 2 * i + 1] = static_cast<T>(x1);
}

// ---------------------------------------------------------------------------------------------
// Host side
Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_offset,
                   const c10::optional<at::Tensor>& q_offsets, int64_t k_offset,
                   const c10::optional<at::Tensor>& k_offsets, bool causal, bool rope_q, bool rope_k, double scale,
                   double base) {
  const AttentionShape s = check_attention(q, k, v);
  check_offsets(q_offsets, s.B, q, "q_offset");
  check_offsets(k_offsets, s.B, q, "k_offset");
  Params p{s.B, s.Hq, s.Tq, s.Bk, s.Hk, s.Tk, s.d, s.group, causal, rope_q, rope_k, scale, base,
           q_offset, k_offset, nullptr, nullptr, 0, 0};
  if (q_offsets.has_value()) {
    p.q_offsets = q_offsets->data_ptr<int64_t>();
    p.q_offsets_n = q_offsets->numel();
  }
  if (k_offsets.has_value()) {
    p.k_offsets = k_offsets->data_ptr<int64_t>();
    p.k_offsets_n = k_offsets->numel();
  }
  return p;
}

// Blocks of kThreads rows for `rows` rows of each of batch x heads (row_block decodes them).
int64_t row_blocks(int64_t batch, int64_t heads, int64_t rows) {
  return batch * heads * ((rows + kThreads - 1) / kThreads);
}

template <typename F>
void dispatch_dmax(int64_t d, F&& f) {
  if (d <= 8)
    f(std::integral_constant<int, 8>());
  else if (d <= 16)
    f(std::integral_constant<int, 16>());
  else if (d <= 32)
    f(std::integral_constant<int, 32>());
  else if (d <= 64)
    f(std::integral_constant<int, 64>());
  else
    f(std::integral_constant<int, 128>());
}

std::tuple<at::Tensor, at::Tensor> rope_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, int64_t q_offset,
                                                           const c10::optional<at::Tensor>& q_offsets,
                                                           int64_t k_offset, const c10::optional<at::Tensor>& k_offsets,
                                                           bool causal, bool rope_q, bool rope_k, double scale,
                                                           double base) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  c10::optional<at::Tensor> qo, ko;
  if (q_offsets.has_value()) qo = q_offsets->contiguous();
  if (k_offsets.has_value()) ko = k_offsets->contiguous();
  const Params p = make_params(q, k, v, q_offset, qo, k_offset, ko, causal, rope_q, rope_k, scale, base);
  const auto stats_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Tq}, q.options().dtype(stats_type));
  if (q.numel() == 0) return {out, lse};
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_attention_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    dispatch_dmax(p.d, [&](auto dm) {
      cuda::launch_flat(row_blocks(p.B, p.Hq, p.Tq), [&](int64_t first, unsigned blocks) {
        forward_kernel<scalar_t, A, decltype(dm)::value><<<blocks, kThreads, 0, stream>>>(
            p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            lse.data_ptr<A>(), first);
      });
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_bwd_cuda(
    const at::Tensor& gout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t q_offset, const c10::optional<at::Tensor>& q_offsets,
    int64_t k_offset, const c10::optional<at::Tensor>& k_offsets, bool causal, bool rope_q, bool rope_k, double scale,
    double base, bool kv_grad) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  c10::optional<at::Tensor> qo, ko;
  if (q_offsets.has_value()) qo = q_offsets->contiguous();
  if (k_offsets.has_value()) ko = k_offsets->contiguous();
  const Params p = make_params(q, k, v, q_offset, qo, k_offset, ko, causal, rope_q, rope_k, scale, base);
  check_backward_inputs(gout_in, out_in, lse_in, q);
  const at::Tensor no_grad = at::empty({0}, k.options());
  const auto stats_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gout = gout_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(stats_type).contiguous();
  // D_i = rowsum(dO * O), in the accumulation type
  const at::Tensor Drow = (gout.to(stats_type) * out_in.to(stats_type)).sum(-1).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk_acc = at::zeros(k.sizes(), k.options().dtype(stats_type));
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0)
    return kv_grad ? std::make_tuple(dq.zero_(), dk_acc.to(k.scalar_type()), dv.zero_())
                   : std::make_tuple(dq.zero_(), no_grad, no_grad);
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_attention_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    dispatch_dmax(p.d, [&](auto dm) {
      constexpr int DMAX = decltype(dm)::value;
      cuda::launch_flat(row_blocks(p.B, p.Hq, p.Tq), [&](int64_t first, unsigned blocks) {
        dq_kernel<scalar_t, A, DMAX><<<blocks, kThreads, 0, stream>>>(
            p, gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
            lse.data_ptr<A>(), Drow.data_ptr<A>(), dq.data_ptr<scalar_t>(), first);
      });
      if (!kv_grad) return;
      cuda::launch_flat(row_blocks(p.Bk, p.Hk, p.Tk), [&](int64_t first, unsigned blocks) {
        dkv_kernel<scalar_t, A, DMAX><<<blocks, kThreads, 0, stream>>>(
            p, gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
            lse.data_ptr<A>(), Drow.data_ptr<A>(), dk_acc.data_ptr<A>(), dv.data_ptr<scalar_t>(), first);
      });
    });
  });
  if (!kv_grad) return {dq, no_grad, no_grad};
  return {dq, dk_acc.to(k.scalar_type()), dv};
}

// Its argument checks are the CPU op's (apply_rope_cpu), repeated so each backend file stands alone.
at::Tensor apply_rope_cuda(const at::Tensor& x_in, int64_t offset, const c10::optional<at::Tensor>& offsets,
                           double base, bool inverse) {
  TORCH_CHECK(x_in.dim() == 3 || x_in.dim() == 4, "x must have 3 (B, T, d) or 4 (B, H, T, d) dims, got ", x_in.dim());
  TORCH_CHECK(x_in.is_floating_point(), "x must be a floating-point tensor, got ", x_in.scalar_type());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.size(-1);
  TORCH_CHECK(d % 2 == 0, "x's last dim (d) must be even, got ", d);
  const int64_t B = x.size(0), T = x.size(-2), H = x.dim() == 4 ? x.size(1) : 1;
  c10::optional<at::Tensor> offs;
  if (offsets.has_value()) offs = offsets->contiguous();
  check_offsets(offs, B, x, "offset");
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = B * H * T, n = rows * (d / 2);
  if (n == 0) return y;
  const int threads = 256;
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rope_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    cuda::launch_flat((n + threads - 1) / threads, [&](int64_t first, unsigned blocks) {
      apply_rope_kernel<scalar_t, A><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, H, T, static_cast<int>(d), offset,
          offs.has_value() ? offs->data_ptr<int64_t>() : nullptr, offs.has_value() ? offs->numel() : 0, base,
          inverse ? A(-1) : A(1), first);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqext, CUDA, m) {
  m.impl("apply_rope", &apply_rope_cuda);
  m.impl("rope_attention_fwd", &rope_attention_fwd_cuda);
  m.impl("rope_attention_bwd", &rope_attention_bwd_cuda);
}

}  // namespace attention
}  // namespace vqext
