// Binding of vqformer_decode_step's arguments to DecodeParams (decode_params.h): weights by name
// against the schema there, then the sizes and cache indices. Every failure is one line naming
// the weight or argument.
#include "decode_params.h"

#include <cstdlib>
#include <string>
#include <string_view>

namespace vqext {
namespace vqformer {
namespace {

constexpr const char* kOp = "vqformer_decode_step: ";

template <typename Weights, size_t N>
at::Tensor* find_field(const Field<Weights> (&fields)[N], Weights& w, std::string_view name) {
  for (const Field<Weights>& f : fields)
    if (name == std::string_view(f.name)) return &(w.*f.slot);
  return nullptr;
}

// The slot named `name` ("blocks.<l>.<field>" or a model field), or an error naming it.
at::Tensor* slot_for(const std::string& name, DecodeParams& p) {
  static const std::string kPrefix = "blocks.";
  if (name.compare(0, kPrefix.size(), kPrefix) == 0) {
    const char* digits = name.c_str() + kPrefix.size();
    char* end = nullptr;
    const long layer = std::strtol(digits, &end, 10);
    TORCH_CHECK(end != digits && *end == '.', kOp, "weight '", name, "' is not named blocks.<layer>.<field>");
    TORCH_CHECK(layer >= 0 && layer < p.depth, kOp, "weight '", name, "' belongs to block ", layer, ", but kv holds ",
                p.depth, " layers");
    at::Tensor* slot = find_field(kBlockFields, p.blocks[layer], std::string_view(end + 1));
    TORCH_CHECK(slot, kOp, "weight '", name, "' is not one the native step reads");
    return slot;
  }
  at::Tensor* slot = find_field(kModelFields, p.model, std::string_view(name));
  TORCH_CHECK(slot, kOp, "weight '", name, "' is not one the native step reads");
  return slot;
}

int64_t dim_size(Dim d, const DecodeParams& p, const at::Tensor& t, int axis) {
  switch (d) {
    case Dim::D: return p.d_model;
    case Dim::QKV: return (p.heads + 2 * p.kv_heads) * p.head_dim;
    case Dim::Heads: return p.heads;
    case Dim::HeadDim: return p.head_dim;
    case Dim::One: return 1;
    case Dim::Codes:
    case Dim::ArLen: return t.dim() > axis && t.size(axis) > 0 ? t.size(axis) : -1;  // any positive size
  }
  return -1;
}

template <typename Weights, size_t N>
void check_fields(const Field<Weights> (&fields)[N], const Weights& w, const std::string& prefix,
                  const DecodeParams& p, const at::Tensor& x) {
  for (const Field<Weights>& f : fields) {
    const at::Tensor& t = w.*f.slot;
    TORCH_CHECK(t.defined() || !f.required, kOp, "missing weight '", prefix, f.name, "'");
    if (!t.defined()) continue;
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), kOp, "weight '", prefix, f.name,
                "' must be a ", x.scalar_type(), " tensor on ", x.device(), ", got ", t.scalar_type(), " on ",
                t.device());
    std::vector<int64_t> want(f.rank);
    for (int a = 0; a < f.rank; ++a) want[a] = dim_size(f.shape[a], p, t, a);
    TORCH_CHECK(t.sizes().vec() == want, kOp, "weight '", prefix, f.name, "' has shape ", t.sizes(), ", expected ",
                at::IntArrayRef(want), " (d_model ", p.d_model, ", heads ", p.heads, ", kv_heads ", p.kv_heads, ")");
  }
}

void check_pairs(const BlockWeights& b, const std::string& prefix) {
  TORCH_CHECK(b.code_in_weight.defined() || !b.code_in_bias.defined(), kOp, "weight '", prefix,
              "code_in.bias' is given without '", prefix, "code_in.weight'");
  TORCH_CHECK(b.code_out_weight.defined() || !b.code_out_bias.defined(), kOp, "weight '", prefix,
              "code_out.bias' is given without '", prefix, "code_out.weight'");
}

void bind_weights(DecodeParams& p, const at::Tensor& x, const std::vector<std::string>& names,
                  at::TensorList weights) {
  TORCH_CHECK(names.size() == weights.size(), kOp, "weight_names has ", names.size(), " entries but weights has ",
              weights.size());
  for (size_t i = 0; i < names.size(); ++i) {
    at::Tensor* slot = slot_for(names[i], p);
    TORCH_CHECK(!slot->defined(), kOp, "weight '", names[i], "' is given twice");
    *slot = weights[i].contiguous();
  }
  TORCH_CHECK(p.model.encoder_weight.defined(), kOp, "missing weight 'encoder.weight'");
  TORCH_CHECK(p.model.encoder_weight.dim() == 2, kOp, "weight 'encoder.weight' must be (d_model, 1), got ",
              p.model.encoder_weight.sizes());
  p.d_model = p.model.encoder_weight.size(0);
  TORCH_CHECK(p.d_model % p.heads == 0, kOp, "d_model ", p.d_model, " (encoder.weight) is not divisible by heads ",
              p.heads);
  p.head_dim = p.d_model / p.heads;
  TORCH_CHECK(!p.rope || p.head_dim % 2 == 0, kOp, "rope needs an even head size, got ", p.head_dim);
  for (int64_t l = 0; l < p.depth; ++l) {
    const std::string prefix = "blocks." + std::to_string(l) + ".";
    check_fields(kBlockFields, p.blocks[l], prefix, p, x);
    check_pairs(p.blocks[l], prefix);
  }
  check_fields(kModelFields, p.model, "", p, x);
  TORCH_CHECK(p.model.ar_weight.defined() == p.model.ar_bias.defined(), kOp,
              "weights 'ar_skip.weight' and 'ar_skip.bias' come together");
  p.ar_len = p.model.ar_weight.defined() ? p.model.ar_weight.size(2) : 0;
}

// A window [first, first + visible) of a buffer of `capacity` slots whose newest slot is `write`.
bool valid_window(int64_t write, int64_t first, int64_t visible, int64_t capacity) {
  return first >= 0 && visible >= 1 && first + visible <= capacity && write == first + visible - 1;
}

void bind_cache(DecodeParams& p, const at::Tensor& x, at::TensorList kv, at::IntArrayRef kv_index,
                const at::Tensor& inputs, at::IntArrayRef input_index) {
  TORCH_CHECK(static_cast<int64_t>(kv_index.size()) == 3 * p.depth, kOp, "kv_index needs 3 entries per layer (",
              3 * p.depth, " for ", p.depth, " kv buffers), got ", kv_index.size());
  for (int64_t l = 0; l < p.depth; ++l) {
    const at::Tensor& buf = kv[l];
    TORCH_CHECK(buf.dim() == 5 && buf.size(0) == 2 && buf.size(1) == p.batch && buf.size(2) == p.kv_heads &&
                    buf.size(4) == p.head_dim && buf.is_contiguous() && buf.scalar_type() == x.scalar_type() &&
                    buf.device() == x.device(),
                kOp, "kv[", l, "] must be a contiguous (2, ", p.batch, ", ", p.kv_heads, ", capacity, ", p.head_dim,
                ") ", x.scalar_type(), " tensor on ", x.device(), ", got ", buf.sizes());
    const LayerCache c{buf, kv_index[3 * l], kv_index[3 * l + 1], kv_index[3 * l + 2]};
    TORCH_CHECK(valid_window(c.write, c.first, c.visible, buf.size(3)), kOp, "kv_index of layer ", l,
                " is out of range");
    p.cache.push_back(c);
  }
  if (p.ar_len == 0) return;
  TORCH_CHECK(inputs.dim() == 3 && inputs.size(0) == p.batch && inputs.size(2) == 1 && inputs.is_contiguous() &&
                  inputs.scalar_type() == x.scalar_type() && inputs.device() == x.device(),
              kOp, "inputs must be a contiguous (", p.batch, ", capacity, 1) ", x.scalar_type(), " tensor, got ",
              inputs.sizes());
  TORCH_CHECK(input_index.size() == 3, kOp, "input_index needs (write, first, visible), got ", input_index.size(),
              " entries");
  TORCH_CHECK(valid_window(input_index[0], input_index[1], input_index[2], inputs.size(1)), kOp,
              "input_index is out of range");
  p.inputs = inputs;
  p.input_write = input_index[0];
  p.input_first = input_index[1];
  p.input_visible = input_index[2];
}

}  // namespace

DecodeParams bind_decode_params(const at::Tensor& x, const std::vector<std::string>& weight_names,
                                at::TensorList weights, at::TensorList kv, at::IntArrayRef kv_index,
                                const at::Tensor& inputs, at::IntArrayRef input_index, int64_t pos, int64_t heads,
                                int64_t kv_heads, bool rope, double rope_base, double attn_scale, double code_scale,
                                double eps, bool residual) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.size(2) == 1, kOp, "x must be (B, 1, 1), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, kOp,
              "heads must be a positive multiple of kv_heads, got heads ", heads, ", kv_heads ", kv_heads);
  TORCH_CHECK(pos >= 0, kOp, "pos must be >= 0, got ", pos);
  TORCH_CHECK(eps > 0, kOp, "eps must be > 0, got ", eps);
  DecodeParams p;
  p.batch = x.size(0);
  p.depth = static_cast<int64_t>(kv.size());
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.pos = pos;
  p.rope = rope;
  p.residual = residual;
  p.rope_base = rope_base;
  p.attn_scale = attn_scale;
  p.code_scale = code_scale;
  p.eps = eps;
  p.blocks.resize(p.depth);
  bind_weights(p, x, weight_names, weights);
  bind_cache(p, x, kv, kv_index, inputs, input_index);
  return p;
}

}  // namespace vqformer
}  // namespace vqext
