// CPU kernels of apply_rope and rope_attention (forward and backward).
//
// Attention runs on tiles of BQ queries x BK keys held in small per-thread buffers in the
// accumulation type A (float, or double for double inputs). q and k are rotated (RoPE) while their
// tiles are loaded; scores use an online softmax so that only the row statistics (logsumexp) are
// kept for the backward, never the Tq x Tk matrix. The backward recomputes the probabilities from
// the saved logsumexp in one pass over (batch, kv head) tasks; with a shared k the dk, dv go to
// per-thread partial sums reduced in a fixed order, so results are the same run to run.
//
// The tile products are written as small register-blocked GEMMs on GCC vector types, so one code
// path serves every head size; head sizes 8, 16 and 64 get compile-time trip counts. That code
// (rope_attention_cpu_kernels.h) is compiled once per instruction set, in its own translation
// unit (rope_attention_cpu_{portable,avx2,avx512}.cpp); this file picks one per call from
// vqext::cpu_isa() (VQEXT_CPU_ISA=portable|avx2|avx512 caps it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../../common/cpu_features.h"
#include "../../common/rope.h"
#include "../attention_common.h"
#include "rope_attention_cpu.h"

namespace vqext {
namespace attention {
namespace {

// ---------------------------------------------------------------------------------------------
// RoPE tables: cos/sin of pos * base^(-2i/d) for every position any batch element needs, stored
// once per distinct position (batches with equal offsets share rows).
template <typename A>
RopeTable<A> build_table(int64_t d, double base, const std::vector<int64_t>* qstart, int64_t Tq,
                         const std::vector<int64_t>* kstart, int64_t Tk) {
  RopeTable<A> t;
  t.half = d / 2;
  std::vector<std::pair<int64_t, int64_t>> iv;  // [start, end)
  if (qstart)
    for (int64_t s : *qstart) iv.emplace_back(s, s + Tq);
  if (kstart)
    for (int64_t s : *kstart) iv.emplace_back(s, s + Tk);
  std::sort(iv.begin(), iv.end());
  std::vector<int64_t> seg_start, seg_end, seg_row;
  int64_t rows = 0;
  for (auto& p : iv) {
    if (p.second <= p.first) continue;
    if (!seg_start.empty() && p.first <= seg_end.back()) {
      if (p.second > seg_end.back()) {
        rows += p.second - seg_end.back();
        seg_end.back() = p.second;
      }
    } else {
      seg_start.push_back(p.first);
      seg_end.push_back(p.second);
      seg_row.push_back(rows);
      rows += p.second - p.first;
    }
  }
  auto row_of = [&](int64_t pos) -> int64_t {
    if (seg_start.empty()) return 0;
    auto it = std::upper_bound(seg_start.begin(), seg_start.end(), pos);
    const size_t s = static_cast<size_t>(it - seg_start.begin()) - 1;
    return seg_row[s] + (pos - seg_start[s]);
  };
  if (qstart)
    for (int64_t s : *qstart) t.q_row.push_back(Tq > 0 ? row_of(s) : 0);
  if (kstart)
    for (int64_t s : *kstart) t.k_row.push_back(Tk > 0 ? row_of(s) : 0);
  t.cos_.resize(rows * t.half);
  t.sin_.resize(rows * t.half);
  std::vector<double> inv_freq(t.half);
  for (int64_t i = 0; i < t.half; ++i) inv_freq[i] = rope::inv_freq(i, d, base);
  std::vector<int64_t> row_pos(rows);
  for (size_t s = 0; s < seg_start.size(); ++s)
    for (int64_t p = seg_start[s]; p < seg_end[s]; ++p) row_pos[seg_row[s] + p - seg_start[s]] = p;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < t.half; ++i)
        rope::cos_sin(row_pos[r], inv_freq[i], t.cos_[r * t.half + i], t.sin_[r * t.half + i]);
  });
  return t;
}

// The kernels of the instruction set in use: AVX-512 where it is in use and the head size fills
// its vectors (small head sizes would be zero-padded to 16 lanes, which costs more than the wider
// vectors gain), or for the small head sizes whose kernels lay keys along the lanes; otherwise
// AVX2 where it is in use, else the portable kernels.
template <typename A>
const AttentionKernelsOf<A>& kernels_for(const Problem& pr, bool forward) {
  const CpuIsa isa = cpu_isa();
#if VQEXT_X86_KERNELS
  if (isa == CpuIsa::kAvx512) {
    const AttentionKernels& wide = attention_kernels_avx512();
    const bool lanes = forward ? lanes_forward(pr) : pr.d <= wide.lanes_backward_max_head;
    if (pr.d % wide.of<A>().lanes == 0 || lanes) return wide.of<A>();
  }
  if (isa != CpuIsa::kPortable) return attention_kernels_avx2().of<A>();
#endif
  (void)isa;
  return attention_kernels_portable().of<A>();
}

// ---------------------------------------------------------------------------------------------
// Host entry points
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_offset,
                     const c10::optional<at::Tensor>& q_offsets, int64_t k_offset,
                     const c10::optional<at::Tensor>& k_offsets, bool causal, bool rope_q, bool rope_k, double scale,
                     double base) {
  const AttentionShape s = check_attention(q, k, v);
  check_offsets(q_offsets, s.B, q, "q_offset");
  check_offsets(k_offsets, s.B, q, "k_offset");
  Problem pr{s.B, s.Hq, s.Tq, s.Bk, s.Hk, s.Tk, s.d, s.group, causal, rope_q, rope_k, scale, base, {}, {}};
  pr.qpos = host_positions(q_offset, q_offsets, s.B);
  pr.kpos = host_positions(k_offset, k_offsets, s.B);
  return pr;
}

template <typename A>
RopeTable<A> tables_for(const Problem& pr) {
  return build_table<A>(pr.d, pr.base, pr.rope_q ? &pr.qpos : nullptr, pr.Tq, pr.rope_k ? &pr.kpos : nullptr, pr.Tk);
}

std::tuple<at::Tensor, at::Tensor> rope_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, int64_t q_offset,
                                                          const c10::optional<at::Tensor>& q_offsets, int64_t k_offset,
                                                          const c10::optional<at::Tensor>& k_offsets, bool causal,
                                                          bool rope_q, bool rope_k, double scale, double base) {
  const Problem pr =
      make_problem(q_in, k_in, v_in, q_offset, q_offsets, k_offset, k_offsets, causal, rope_q, rope_k, scale, base);
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "rope_attention on CPU takes float32 or float64, got ", q_in.scalar_type());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.Tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rope_attention_fwd_cpu", [&] {
    using A = scalar_t;
    const RopeTable<A> tab = tables_for<A>(pr);
    kernels_for<A>(pr, true).forward(
        pr, q.data_ptr<A>(), k.data_ptr<A>(), v.data_ptr<A>(), out.data_ptr<A>(), lse.data_ptr<A>(), tab);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_bwd_cpu(
    const at::Tensor& gout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t q_offset, const c10::optional<at::Tensor>& q_offsets,
    int64_t k_offset, const c10::optional<at::Tensor>& k_offsets, bool causal, bool rope_q, bool rope_k, double scale,
    double base, bool kv_grad) {
  Problem pr =
      make_problem(q_in, k_in, v_in, q_offset, q_offsets, k_offset, k_offsets, causal, rope_q, rope_k, scale, base);
  pr.kv_grad = kv_grad;
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "rope_attention on CPU takes float32 or float64, got ", q_in.scalar_type());
  check_backward_inputs(gout_in, out_in, lse_in, q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor gout = gout_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(q.scalar_type()).contiguous();
  // D_i = rowsum(dO * O): the softmax-Jacobian term of flash-attention-2's backward
  const at::Tensor Drow = (gout * out_in.to(q.scalar_type())).sum(-1).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  // dk, dv accumulate in A; with a shared k (Bk == 1) each thread has its own partial sums
  const int64_t nthreads = pr.Bk == 1 ? at::get_num_threads() : 1;
  const int64_t kv_numel = k.numel();
  at::Tensor dk_acc = at::zeros({kv_grad ? nthreads : 0, kv_numel}, q.options());
  at::Tensor dv_acc = at::zeros({kv_grad ? nthreads : 0, kv_numel}, q.options());
  const int64_t grain = work_grain(pr.B * pr.Hk, static_cast<double>(pr.B) * pr.Hq * pr.Tq * pr.Tk * pr.d);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rope_attention_bwd_cpu", [&] {
    using A = scalar_t;
    const RopeTable<A> tab = tables_for<A>(pr);
    kernels_for<A>(pr, false).backward(
        pr, gout.data_ptr<A>(), q.data_ptr<A>(), k.data_ptr<A>(), v.data_ptr<A>(), lse.data_ptr<A>(),
        Drow.data_ptr<A>(), dq.data_ptr<A>(), dk_acc.data_ptr<A>(), dv_acc.data_ptr<A>(), kv_numel, nthreads, tab,
        grain);
  });
  if (!kv_grad) return {dq, at::empty({0}, k.options()), at::empty({0}, v.options())};
  at::Tensor dk = dk_acc.sum(0).view(k.sizes());
  at::Tensor dv = dv_acc.sum(0).view(v.sizes());
  return {dq, dk, dv};
}

// Its argument checks are repeated in apply_rope_cuda so each backend file stands alone.
at::Tensor apply_rope_cpu(const at::Tensor& x_in, int64_t offset, const c10::optional<at::Tensor>& offsets, double base,
                          bool inverse) {
  TORCH_CHECK(x_in.dim() == 3 || x_in.dim() == 4, "x must have 3 (B, T, d) or 4 (B, H, T, d) dims, got ", x_in.dim());
  TORCH_CHECK(x_in.is_floating_point(), "x must be a floating-point tensor, got ", x_in.scalar_type());
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(d % 2 == 0, "x's last dim (d) must be even, got ", d);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(-2), H = x.dim() == 4 ? x.size(1) : 1;
  check_offsets(offsets, B, x, "offset");
  const std::vector<int64_t> pos = host_positions(offset, offsets, B);
  at::Tensor y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rope_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const RopeTable<A> tab = build_table<A>(d, base, &pos, T, nullptr, 0);
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const A sign = inverse ? A(-1) : A(1);
    at::parallel_for(0, B * H * T, 256, [&](int64_t r0, int64_t r1) {
      A tmp[4096];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % T, b = r / (H * T);
        const int64_t row = tab.q_row[b] + t;
        for (int64_t c0 = 0; c0 < d; c0 += 4096) {
          const int64_t n = std::min<int64_t>(4096, d - c0);
          rotate_row<scalar_t, A>(src + r * d + c0, tmp, n, n, A(1), tab.cos_row(row) + c0 / 2,
                                  tab.sin_row(row) + c0 / 2, sign);
          for (int64_t c = 0; c < n; ++c) dst[r * d + c0 + c] = static_cast<scalar_t>(tmp[c]);
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqext, CPU, m) {
  m.impl("apply_rope", &apply_rope_cpu);
  m.impl("rope_attention_fwd", &rope_attention_fwd_cpu);
  m.impl("rope_attention_bwd", &rope_attention_bwd_cpu);
}

}  // namespace attention
}  // namespace vqext
