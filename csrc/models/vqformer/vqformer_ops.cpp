// Operator schema of VQFormer's cached decoding step. The CPU kernel is cpu/vqformer_decode_cpu.cpp,
// the argument contract decode_params.h, the fake kernel and the caller vqext/models/vqformer_decode.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqext, m) {
  // One VQFormer step of one new position per batch row, inference only (no autograd):
  //   x (B, 1, 1): the new inputs; returns the predictions (B, 1, 1)
  //   weight_names, weights: the model's tensors by the model's own names (decode_params.h)
  //   kv[layer] (2, B, kv_heads, capacity, head_dim): keys then values; the new key (rotated when
  //           rope) and value are written at kv_index[3 * layer], then the step attends to entries
  //           [first, first + visible) given by kv_index[3 * layer + 1], kv_index[3 * layer + 2]
  //   inputs (B, capacity, 1), input_index (write, first, visible): the AR path's input history
  //   pos: the absolute position of the new step (the same for every row)
  m.def(
      "vqformer_decode_step(Tensor x, str[] weight_names, Tensor[] weights, Tensor(a!)[] kv, int[] kv_index, "
      "Tensor(b!) inputs, int[] input_index, int pos, *, int heads, int kv_heads, bool rope, float rope_base, "
      "float attn_scale, float code_scale, float eps, bool residual) -> Tensor");
}
