#pragma once
// Shared by the host code of the CPU attention ops (rope_attention_cpu.cpp) and the kernel
// translation units, one per instruction set (rope_attention_cpu_{portable,avx2,avx512}.cpp): the
// problem description, the RoPE table, and the kernel table each of those units exports. The
// kernel units include this header before they switch their target, so everything here is
// compiled for the baseline target wherever it is emitted.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../common/cpu_features.h"
#include "../../common/rope.h"
#include "../attention_common.h"

namespace vqext {
namespace attention {

// RoPE tables: cos/sin of pos * base^(-2i/d) for every position any batch element needs, stored
// once per distinct position (batches with equal offsets share rows).
template <typename A>
struct RopeTable {
  int64_t half = 0;
  std::vector<A> cos_, sin_;
  std::vector<int64_t> q_row, k_row;  // row of position (start of batch b) for q and k

  const A* cos_row(int64_t row) const { return cos_.data() + row * half; }
  const A* sin_row(int64_t row) const { return sin_.data() + row * half; }
};

// dst[c] = scale * (R x)[c] (sign = -1 applies R^T); zero-pads dst to dp entries.
template <typename T, typename A>
inline void rotate_row(const T* x, A* dst, int64_t d, int64_t dp, A scale, const A* cs, const A* sn, A sign) {
  if (cs) {
    for (int64_t i = 0; i < d / 2; ++i) {
      A x0 = static_cast<A>(x[2 * i]), x1 = static_cast<A>(x[2 * i + 1]);
      rope::rotate_pair(x0, x1, cs[i], sign * sn[i]);
      dst[2 * i] = scale * x0;
      dst[2 * i + 1] = scale * x1;
    }
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c] = scale * static_cast<A>(x[c]);
  }
  for (int64_t c = d; c < dp; ++c) dst[c] = A(0);
}

// Head sizes are at most kMaxHeadSize (checked by the op); padded to a vector width they stay
// within this bound, which sizes per-thread staging buffers.
constexpr int64_t kMaxPaddedHead = kMaxHeadSize;

struct Problem {
  int64_t B, Hq, Tq, Bk, Hk, Tk, d, group;
  bool causal, rope_q, rope_k;
  double scale, base;
  std::vector<int64_t> qpos, kpos;  // absolute position of row 0, per query batch
  bool kv_grad = true;              // backward: also dk, dv (false: dq only)
};

// Number of keys of block [kb, kb + nk) that query row i (absolute position qp) sees.
inline int visible_keys(const Problem& pr, int64_t qp, int64_t kp_block, int nk) {
  if (!pr.causal) return nk;
  const int64_t lim = qp - kp_block + 1;
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, lim)));
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Small problems run on the calling thread: waking a thread team costs more than they take.
inline int64_t work_grain(int64_t tasks, double flops) { return flops < 262144.0 ? std::max<int64_t>(tasks, 1) : 1; }

// The forward's key-lane kernel (head sizes up to 16) pays a fixed cost per query row (lane
// reductions, the softmax bookkeeping of partly masked blocks): it wins over the tile GEMMs once
// rows see a few hundred keys (codebooks, long contexts), and loses on short ones (causal T = 96).
inline bool lanes_forward(const Problem& pr) { return pr.d <= 16 && pr.Tk >= 256; }

// ---------------------------------------------------------------------------------------------
// The kernels of one instruction set, for one accumulation type A (the input type).
template <typename A>
struct AttentionKernelsOf {
  void (*forward)(const Problem& pr, const A* q, const A* k, const A* v, A* out, A* lse, const RopeTable<A>& tab);
  void (*backward)(const Problem& pr, const A* gout, const A* q, const A* k, const A* v, const A* lse, const A* Drow,
                   A* dq, A* dk_out, A* dv_out, int64_t partial_stride, int64_t nthreads, const RopeTable<A>& tab,
                   int64_t grain);
  int lanes;  // vector lanes of A: head sizes that are a multiple of it need no padding
};

struct AttentionKernels {
  AttentionKernelsOf<float> f32;
  AttentionKernelsOf<double> f64;
  int64_t lanes_backward_max_head;  // head sizes up to this take the key-lane backward (0: none)
  template <typename A>
  const AttentionKernelsOf<A>& of() const {
    if constexpr (std::is_same<A, float>::value) {
      return f32;
    } else {
      return f64;
    }
  }
};

const AttentionKernels& attention_kernels_portable();
#if VQEXT_X86_KERNELS
const AttentionKernels& attention_kernels_avx2();
const AttentionKernels& attention_kernels_avx512();
#endif

}  // namespace attention
}  // namespace vqext
