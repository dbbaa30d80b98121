// Operator schema of the cached decoding step. The kernel is cpu/vqformer_decode_cpu.cpp; the
// Python side (vqext/models/vqformer.py, VQFormer._decode_one) gathers the arguments once per
// cache and keeps the sliding-buffer bookkeeping, so the op only reads and writes memory.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqext, m) {
  // One VQFormer step of one new position per batch row, inference only (no autograd):
  //   params: per block [ln_attn.w, ln_attn.b, qkv.w, qkv.b?, out.w, out.b?, ln_code.w, ln_code.b,
  //           code_in.w?, code_in.b?, codebook, code_out.w?, code_out.b?], then
  //           [encoder.w, encoder.b, ln_out.w, ln_out.b, decoder.w, decoder.b, ar.w?, ar.b?]
  //   kv[layer] (2, B, Hk, capacity, hd): the new key (rotated when rope) and value are written at
  //           kv_index[3 * layer], then the step attends to entries [first, first + visible) given by
  //           kv_index[3 * layer + 1], kv_index[3 * layer + 2]
  //   inputs (B, capacity, 1) and input_index (write, first, visible): the AR path's input history
  //   sizes: [depth, heads, kv_heads, head_dim, rope, residual]
  //   scalars: [rope_base, attention scale, codebook scale, layer-norm eps]
  //   pos: the absolute position of the new step (the same for every row)
  m.def(
      "vqformer_decode_step(Tensor x, Tensor?[] params, Tensor(a!)[] kv, int[] kv_index, Tensor(b!) inputs, "
      "int[] input_index, int[] sizes, float[] scalars, int pos) -> Tensor");
}
