// VQFormer's cached decoding step (vqext::vqformer_decode_step): the contract between the op's
// arguments and its kernels.
//
// The op takes the model's weights as (name, tensor) pairs named as VQFormer itself names them
// (model.named_parameters() and named_buffers(): "encoder.weight", "blocks.0.attn.qkv_proj.weight",
// ...). kBlockFields and kModelFields are the one schema of which weights the step reads and their
// shapes; bind_decode_params fills DecodeParams from the pairs and rejects, naming it, any weight
// that is unknown, given twice, missing, or of the wrong shape, dtype or device. A change to the
// model's parameters therefore fails loudly here until the kernel learns it.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace vqext {
namespace vqformer {

// One block's weights (VQFormerBlock), under "blocks.<l>.". Absent optional weights stay undefined.
struct BlockWeights {
  at::Tensor norm_attn_weight, norm_attn_bias;  // (D), (D): layer norm before the self-attention
  at::Tensor qkv_weight, qkv_bias;              // ((H + 2 Hk) hd, D), optional ((H + 2 Hk) hd): q, k, v stacked
  at::Tensor out_weight, out_bias;              // (D, D), optional (D): attention output projection
  at::Tensor norm_code_weight, norm_code_bias;  // (D), (D): layer norm before the codebook attention
  at::Tensor code_in_weight, code_in_bias;      // optional (D, D), (D): codebook query projection
  at::Tensor codebook;                          // (H, K, hd): one codebook of K codes per head
  at::Tensor code_out_weight, code_out_bias;    // optional (D, D), (D): codebook output projection
};

// The weights around the blocks.
struct ModelWeights {
  at::Tensor encoder_weight, encoder_bias;    // (D, 1), (D): Linear(1 -> D)
  at::Tensor norm_out_weight, norm_out_bias;  // (D), (D)
  at::Tensor decoder_weight, decoder_bias;    // (1, D), (1): Linear(D -> 1)
  at::Tensor ar_weight, ar_bias;              // optional (1, 1, L), (1): the AR filter (Conv1d over inputs)
};

// One layer's key/value cache: buffer (2, B, Hk, capacity, hd), keys then values. The step writes
// the new key (rotated when rope) and value at slot `write` and attends to [first, first + visible).
struct LayerCache {
  at::Tensor kv;
  int64_t write, first, visible;
};

// Everything one step reads and writes.
struct DecodeParams {
  int64_t batch;     // B rows, one new position each
  int64_t depth;     // blocks
  int64_t heads;     // H query heads
  int64_t kv_heads;  // Hk key/value heads (H % Hk == 0)
  int64_t head_dim;  // hd = D / H
  int64_t d_model;   // D
  int64_t ar_len;    // L, the AR filter's length; 0 without the AR path
  int64_t pos;       // absolute position of the new step (the same for every row)
  bool rope;         // rotate queries and keys at pos (RoPE)
  bool residual;     // output x + network instead of network
  double rope_base, attn_scale, code_scale, eps;
  std::vector<BlockWeights> blocks;
  ModelWeights model;
  std::vector<LayerCache> cache;
  // The AR path's input history (B, capacity, 1): the step writes x at input_write and filters
  // [input_first, input_first + input_visible).
  at::Tensor inputs;
  int64_t input_write = 0, input_first = 0, input_visible = 0;
};

// Symbolic sizes of the schema's shapes. Codes and ArLen are read from the weight itself.
enum class Dim { D, QKV, Heads, HeadDim, Codes, ArLen, One };

template <typename Weights>
struct Field {
  const char* name;  // the model's name for the tensor (under "blocks.<l>." for a block)
  at::Tensor Weights::*slot;
  int rank;
  Dim shape[3];
  bool required;
};

inline constexpr Field<BlockWeights> kBlockFields[] = {
    {"norm_attn.weight", &BlockWeights::norm_attn_weight, 1, {Dim::D}, true},
    {"norm_attn.bias", &BlockWeights::norm_attn_bias, 1, {Dim::D}, true},
    // A table of names on purpose (alike rows): the schema both languages check weights against.
    {"attn.qkv_proj.weight", &BlockWeights::qkv_weight, 2, {Dim::QKV, Dim::D}, true},
    {"attn.qkv_proj.bias", &BlockWeights::qkv_bias, 1, {Dim::QKV}, false},
    {"attn.out_proj.weight", &BlockWeights::out_weight, 2, {Dim::D, Dim::D}, true},
    {"attn.out_proj.bias", &BlockWeights::out_bias, 1, {Dim::D}, false},
    {"norm_code.weight", &BlockWeights::norm_code_weight, 1, {Dim::D}, true},
    {"norm_code.bias", &BlockWeights::norm_code_bias, 1, {Dim::D}, true},
    {"code_in.weight", &BlockWeights::code_in_weight, 2, {Dim::D, Dim::D}, false},
    {"code_in.bias", &BlockWeights::code_in_bias, 1, {Dim::D}, false},
    {"quantize.codes.codebook", &BlockWeights::codebook, 3, {Dim::Heads, Dim::Codes, Dim::HeadDim}, true},
    {"code_out.weight", &BlockWeights::code_out_weight, 2, {Dim::D, Dim::D}, false},
    {"code_out.bias", &BlockWeights::code_out_bias, 1, {Dim::D}, false},
};

inline constexpr Field<ModelWeights> kModelFields[] = {
    {"encoder.weight", &ModelWeights::encoder_weight, 2, {Dim::D, Dim::One}, true},
    {"encoder.bias", &ModelWeights::encoder_bias, 1, {Dim::D}, true},
    {"norm_out.weight", &ModelWeights::norm_out_weight, 1, {Dim::D}, true},
    {"norm_out.bias", &ModelWeights::norm_out_bias, 1, {Dim::D}, true},
    {"decoder.weight", &ModelWeights::decoder_weight, 2, {Dim::One, Dim::D}, true},
    {"decoder.bias", &ModelWeights::decoder_bias, 1, {Dim::One}, true},
    {"ar_skip.weight", &ModelWeights::ar_weight, 3, {Dim::One, Dim::One, Dim::ArLen}, false},
    {"ar_skip.bias", &ModelWeights::ar_bias, 1, {Dim::One}, false},
};

// The op's arguments (see vqformer_ops.cpp) checked and bound by name. Weights are made contiguous.
DecodeParams bind_decode_params(const at::Tensor& x, const std::vector<std::string>& weight_names,
                                at::TensorList weights, at::TensorList kv, at::IntArrayRef kv_index,
                                const at::Tensor& inputs, at::IntArrayRef input_index, int64_t pos, int64_t heads,
                                int64_t kv_heads, bool rope, double rope_base, double attn_scale, double code_scale,
                                double eps, bool residual);

}  // namespace vqformer
}  // namespace vqext
