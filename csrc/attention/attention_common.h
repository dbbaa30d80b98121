#pragma once
// Shared host-side pieces of the attention ops: argument checks and the resolution of position
// offsets (a Python int plus an optional per-batch int64 tensor) used by CPU and CUDA kernels.
#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace vqext {
namespace attention {

// The offset of batch b is `base + per_batch[b]` (or `per_batch[0]` when it has one element).
inline void check_offsets(const c10::optional<at::Tensor>& offsets, int64_t batch, const at::Tensor& like,
                          const char* name) {
  if (!offsets.has_value()) return;
  const at::Tensor& t = *offsets;
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() <= 1 && (t.numel() == 1 || t.numel() == batch), name,
              " must hold one offset or one per batch element (", batch, "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// Host copy of the per-batch start positions (CPU kernels).
inline std::vector<int64_t> host_positions(int64_t base, const c10::optional<at::Tensor>& offsets, int64_t batch) {
  std::vector<int64_t> pos(batch, base);
  if (offsets.has_value()) {
    at::Tensor t = offsets->contiguous().cpu();
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) pos[b] += p[t.numel() == 1 ? 0 : b];
  }
  return pos;
}

struct AttentionShape {
  int64_t B, Hq, Tq, d, Bk, Hk, Tk, group;
};

// The largest head size (even sizes from 2); the CPU kernels size staging buffers by it.
constexpr int64_t kMaxHeadSize = 128;

inline AttentionShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must have 4 dims (B, Hq, Tq, d), got ", q.dim());
  TORCH_CHECK(k.dim() == 4, "k must have 4 dims (Bk, Hk, Tk, d), got ", k.dim());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "q, k and v must be on one device");
  AttentionShape s{q.size(0), q.size(1), q.size(2), q.size(3), k.size(0), k.size(1), k.size(2), 1};
  TORCH_CHECK(s.d % 2 == 0 && s.d >= 2 && s.d <= kMaxHeadSize, "head size d must be even and in [2, ", kMaxHeadSize,
              "], got ", s.d);
  TORCH_CHECK(k.size(3) == s.d, "k head size ", k.size(3), " differs from q head size ", s.d);
  TORCH_CHECK(s.Bk == s.B || s.Bk == 1, "k batch ", s.Bk, " must equal q batch ", s.B, " or be 1");
  TORCH_CHECK(s.Hk > 0 && s.Hq % s.Hk == 0, "q heads ", s.Hq, " must be a multiple of k heads ", s.Hk);
  s.group = s.Hq / s.Hk;
  return s;
}

// The backward's extra inputs: grad_out and out with q's shape, lse with shape (B, Hq, Tq), all
// on q's device (the kernels read them through raw pointers). Any floating dtype: the backward
// converts them.
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& q) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must have shape (B, Hq, Tq) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              lse.sizes());
  const std::pair<const char*, const at::Tensor*> named[] = {{"grad_out", &grad_out}, {"out", &out}, {"lse", &lse}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t->device());
    TORCH_CHECK(t->is_floating_point(), name, " must be a floating-point tensor, got ", t->scalar_type());
  }
}

}  // namespace attention
}  // namespace vqext
