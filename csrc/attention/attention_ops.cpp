// Operator schemas of the attention family. Kernels register per backend: cpu/*.cpp (CPU) and
// cuda/*.cu (CUDA). Offsets travel as an int plus an optional per-batch int64 tensor so that the
// common Python-int case needs no tensor at all. rope_attention_bwd with kv_grad=False computes dq
// only and returns empty dk, dv (a frozen codebook needs no gradient).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqext, m) {
  m.def("apply_rope(Tensor x, int offset, Tensor? offsets, float base, bool inverse) -> Tensor");
  m.def(
      "rope_attention_fwd(Tensor q, Tensor k, Tensor v, int q_offset, Tensor? q_offsets, int k_offset, "
      "Tensor? k_offsets, bool causal, bool rope_q, bool rope_k, float scale, float base) -> (Tensor, Tensor)");
  m.def(
      "rope_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int q_offset, "
      "Tensor? q_offsets, int k_offset, Tensor? k_offsets, bool causal, bool rope_q, bool rope_k, float scale, "
      "float base, bool kv_grad=True) -> (Tensor, Tensor, Tensor)");
}
