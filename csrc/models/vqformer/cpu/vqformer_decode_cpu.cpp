// VQFormer's cached decoding step on the CPU, the whole model in one call.
//
// At one position per row the model is a chain of matrix-vector products over a few dozen
// numbers; through the Python modules each of them costs microseconds of dispatch, through here
// nanoseconds. The stages mirror the module path (vqext/models/vqformer.py): encoder, then per
// block layer norm, fused qkv projection, RoPE (common/rope.h, as the attention kernels), causal
// attention over the cached window (every cached key is in the past, so no mask), codebook
// attention per head; then the output head with the AR filter over the last inputs. Softmax uses
// the running maximum of the row; a NaN score makes the whole row NaN, as in the reference. Tests
// compare it with the module path (tests/test_decode.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../../common/rope.h"
#include "../decode_params.h"

namespace vqext {
namespace vqformer {
namespace {

template <typename T>
const T* data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------------------ vector helpers

// Eight independent accumulators so that the compiler vectorises the loop and the adds do not
// wait on each other.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[r] = W[r, :] . x (+ bias[r]); W is (rows, cols) row-major. accumulate: out += instead of =.
template <typename T>
inline void matvec(const T* W, const T* bias, const T* x, int64_t rows, int64_t cols, T* out, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    T v = dot(W + r * cols, x, cols) + (bias ? bias[r] : T(0));
    out[r] = accumulate ? out[r] + v : v;
  }
}

template <typename T>
inline void layer_norm(const T* x, const at::Tensor& w, const at::Tensor& b, T eps, int64_t n, T* out) {
  const T* weight = data<T>(w);
  const T* bias = data<T>(b);
  T mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= T(n);
  T var = 0;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= T(n);
  const T inv = T(1) / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * weight[i] + bias[i];
}

// out = softmax(scale * K q) V over n rows of K and V (row stride d); scores is scratch of n.
template <typename T>
inline void attend(const T* q, const T* K, const T* V, int64_t n, int64_t d, T scale, T* scores, T* out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = scale * dot(q, K + j * d, d);
    if (!(scores[j] <= m)) m = scores[j];  // NaN becomes the maximum, so the row comes out NaN
  }
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - m);
    sum += scores[j];
  }
  for (int64_t c = 0; c < d; ++c) out[c] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T p = scores[j] / sum;
    const T* v = V + j * d;
    for (int64_t c = 0; c < d; ++c) out[c] += p * v[c];
  }
}

// ------------------------------------------------------------------------------ step stages

// cos/sin of every pair's angle at the step's position, the same for all rows and heads.
template <typename T>
struct RopeAngles {
  std::vector<T> cos, sin;

  RopeAngles(const DecodeParams& p) {
    if (!p.rope) return;
    const int64_t half = p.head_dim / 2;
    cos.resize(half);
    sin.resize(half);
    for (int64_t i = 0; i < half; ++i)
      rope::cos_sin(p.pos, rope::inv_freq(i, p.head_dim, p.rope_base), cos[i], sin[i]);
  }

  void rotate(T* x) const {
    for (size_t i = 0; i < cos.size(); ++i) rope::rotate_pair(x[2 * i], x[2 * i + 1], cos[i], sin[i]);
  }
};

// Per-thread working memory of one row's step.
template <typename T>
struct Scratch {
  std::vector<T> h, normed, qkv, heads_out, code_q, scores;

  explicit Scratch(const DecodeParams& p) {
    const int64_t D = p.d_model;
    int64_t longest = 1;
    for (int64_t l = 0; l < p.depth; ++l)
      longest = std::max({longest, p.cache[l].visible, p.blocks[l].codebook.size(1)});
    h.resize(D);
    normed.resize(D);
    qkv.resize((p.heads + 2 * p.kv_heads) * p.head_dim);
    heads_out.resize(D);
    code_q.resize(D);
    scores.resize(longest);
  }
};

// h = encoder(x).
template <typename T>
void encode(const ModelWeights& w, T x, int64_t D, T* h) {
  const T* weight = data<T>(w.encoder_weight);
  const T* bias = data<T>(w.encoder_bias);
  for (int64_t i = 0; i < D; ++i) h[i] = weight[i] * x + bias[i];
}

// Writes row b's new key (rotated) and value of every kv head into the layer's cache slot.
template <typename T>
void store_new_kv(const DecodeParams& p, const LayerCache& c, int64_t b, const RopeAngles<T>& angles, T* k_new,
                  const T* v_new) {
  const int64_t hd = p.head_dim, cap = c.kv.size(3);
  T* keys = c.kv.data_ptr<T>() + b * p.kv_heads * cap * hd;
  T* values = keys + p.batch * p.kv_heads * cap * hd;
  for (int64_t g = 0; g < p.kv_heads; ++g) {
    T* k = k_new + g * hd;
    if (p.rope) angles.rotate(k);
    std::copy(k, k + hd, keys + (g * cap + c.write) * hd);
    std::copy(v_new + g * hd, v_new + (g + 1) * hd, values + (g * cap + c.write) * hd);
  }
}

// Each query head (rotated) attends to its kv head's cached window of row b; out is (H * hd).
template <typename T>
void attend_cache(const DecodeParams& p, const LayerCache& c, int64_t b, const RopeAngles<T>& angles, T* q, T* scores,
                  T* out) {
  const int64_t hd = p.head_dim, cap = c.kv.size(3), group = p.heads / p.kv_heads;
  const T* keys = c.kv.data_ptr<T>() + b * p.kv_heads * cap * hd;
  const T* values = keys + p.batch * p.kv_heads * cap * hd;
  for (int64_t hq = 0; hq < p.heads; ++hq) {
    T* qh = q + hq * hd;
    if (p.rope) angles.rotate(qh);
    const int64_t window = ((hq / group) * cap + c.first) * hd;
    attend(qh, keys + window, values + window, c.visible, hd, static_cast<T>(p.attn_scale), scores,
           out + hq * hd);
  }
}

// h += out_proj(attention(norm_attn(h))), the new key and value stored in the cache.
template <typename T>
void self_attention(const DecodeParams& p, const BlockWeights& w, const LayerCache& c, int64_t b,
                    const RopeAngles<T>& angles, Scratch<T>& s) {
  const int64_t D = p.d_model;
  layer_norm(s.h.data(), w.norm_attn_weight, w.norm_attn_bias, static_cast<T>(p.eps), D, s.normed.data());
  matvec(data<T>(w.qkv_weight), data<T>(w.qkv_bias), s.normed.data(), static_cast<int64_t>(s.qkv.size()), D,
         s.qkv.data(), false);
  T* q = s.qkv.data();
  T* k_new = q + p.heads * p.head_dim;
  const T* v_new = k_new + p.kv_heads * p.head_dim;
  store_new_kv(p, c, b, angles, k_new, v_new);
  attend_cache(p, c, b, angles, q, s.scores.data(), s.heads_out.data());
  matvec(data<T>(w.out_weight), data<T>(w.out_bias), s.heads_out.data(), D, D, s.h.data(), true);
}

// h += code_out(codebook attention per head of code_in(norm_code(h))); code_in/out may be absent.
template <typename T>
void codebook_attention(const DecodeParams& p, const BlockWeights& w, Scratch<T>& s) {
  const int64_t D = p.d_model, hd = p.head_dim, K = w.codebook.size(1);
  layer_norm(s.h.data(), w.norm_code_weight, w.norm_code_bias, static_cast<T>(p.eps), D, s.normed.data());
  const T* queries = s.normed.data();
  if (w.code_in_weight.defined()) {
    matvec(data<T>(w.code_in_weight), data<T>(w.code_in_bias), s.normed.data(), D, D, s.code_q.data(), false);
    queries = s.code_q.data();
  }
  const T* codebook = data<T>(w.codebook);
  for (int64_t hq = 0; hq < p.heads; ++hq) {
    const T* cb = codebook + hq * K * hd;
    attend(queries + hq * hd, cb, cb, K, hd, static_cast<T>(p.code_scale), s.scores.data(),
           s.heads_out.data() + hq * hd);
  }
  if (w.code_out_weight.defined()) {
    matvec(data<T>(w.code_out_weight), data<T>(w.code_out_bias), s.heads_out.data(), D, D, s.h.data(), true);
  } else {
    for (int64_t i = 0; i < D; ++i) s.h[i] += s.heads_out[i];
  }
}

// The AR filter over row b's last ar_len inputs, x included (written into the history first); a
// history shorter than the filter repeats its oldest input, as the module path's padding.
template <typename T>
T ar_filter(const DecodeParams& p, int64_t b, T x) {
  T* history = p.inputs.data_ptr<T>() + b * p.inputs.size(1);
  history[p.input_write] = x;
  const T* f = data<T>(p.model.ar_weight);
  T conv = 0;
  for (int64_t j = 0; j < p.ar_len; ++j) {
    const int64_t idx = p.input_visible - p.ar_len + j;
    conv += f[j] * history[p.input_first + (idx < 0 ? 0 : idx)];
  }
  return data<T>(p.model.ar_bias)[0] + conv;
}

// The prediction of row b from its final hidden state: decoder(norm_out(h)) [+ AR] [+ x].
template <typename T>
T output_head(const DecodeParams& p, int64_t b, T x, Scratch<T>& s) {
  const ModelWeights& w = p.model;
  layer_norm(s.h.data(), w.norm_out_weight, w.norm_out_bias, static_cast<T>(p.eps), p.d_model, s.normed.data());
  T out = dot(data<T>(w.decoder_weight), s.normed.data(), p.d_model) + data<T>(w.decoder_bias)[0];
  if (p.ar_len > 0) out += ar_filter(p, b, x);
  return p.residual ? x + out : out;
}

template <typename T>
T decode_row(const DecodeParams& p, int64_t b, T x, const RopeAngles<T>& angles, Scratch<T>& s) {
  encode(p.model, x, p.d_model, s.h.data());
  for (int64_t l = 0; l < p.depth; ++l) {
    self_attention(p, p.blocks[l], p.cache[l], b, angles, s);
    codebook_attention(p, p.blocks[l], s);
  }
  return output_head(p, b, x, s);
}

at::Tensor vqformer_decode_step_cpu(const at::Tensor& x_in, const std::vector<std::string>& weight_names,
                                    at::TensorList weights, at::TensorList kv, at::IntArrayRef kv_index,
                                    const at::Tensor& inputs, at::IntArrayRef input_index, int64_t pos, int64_t heads,
                                    int64_t kv_heads, bool rope, double rope_base, double attn_scale,
                                    double code_scale, double eps, bool residual) {
  const at::Tensor x = x_in.contiguous();
  const DecodeParams p = bind_decode_params(x, weight_names, weights, kv, kv_index, inputs, input_index, pos, heads,
                                            kv_heads, rope, rope_base, attn_scale, code_scale, eps, residual);
  at::Tensor y = at::empty({p.batch, 1, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vqformer_decode_step_cpu", [&] {
    const RopeAngles<scalar_t> angles(p);
    const scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* ys = y.data_ptr<scalar_t>();
    at::parallel_for(0, p.batch, 16, [&](int64_t b0, int64_t b1) {
      Scratch<scalar_t> scratch(p);
      for (int64_t b = b0; b < b1; ++b) ys[b] = decode_row(p, b, xs[b], angles, scratch);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqext, CPU, m) { m.impl("vqformer_decode_step", &vqformer_decode_step_cpu); }

}  // namespace vqformer
}  // namespace vqext
