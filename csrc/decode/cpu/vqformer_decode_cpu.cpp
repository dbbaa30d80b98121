// One cached decoding step of VQFormer on the CPU, the whole model in one call.
//
// At one position per row the model is a chain of matrix-vector products over a few dozen
// numbers; through the Python modules each of them costs microseconds of dispatch, through
// here nanoseconds. The arithmetic mirrors the module path (vqext/models/vqformer.py): layer
// norm, fused qkv projection, RoPE with angles formed in double exactly as the attention
// kernel's tables, causal attention over the cached window (every cached key is in the past, so
// no mask), codebook attention per head, the AR filter over the last inputs, residual output.
// Softmax uses the running maximum of the row; a NaN score makes the whole row NaN, as in the
// reference. Tests compare it with the module path (tests/test_decode.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vqext {
namespace decode {
namespace {

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
inline void layer_norm(const T* x, const T* w, const T* b, T eps, int64_t n, T* out) {
  T mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= T(n);
  T var = 0;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= T(n);
  const T inv = T(1) / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// Interleaved pairs rotated by pos * base^(-2i/d), the angle in double as the attention kernels form it.
template <typename T>
inline void rotate(T* x, int64_t d, int64_t pos, double base) {
  for (int64_t i = 0; i < d / 2; ++i) {
    const double ang = static_cast<double>(pos) * std::pow(base, -2.0 * static_cast<double>(i) / d);
    const T c = static_cast<T>(std::cos(ang)), s = static_cast<T>(std::sin(ang));
    const T x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * c - x1 * s;
    x[2 * i + 1] = x0 * s + x1 * c;
  }
}

// out = softmax(scale * K q) V over n rows of K and V (row stride ld); scores is scratch of n.
template <typename T>
inline void attend(const T* q, const T* K, const T* V, int64_t n, int64_t ld, int64_t d, T scale, T* scores,
                   T* out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = scale * dot(q, K + j * ld, d);
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
    const T* v = V + j * ld;
    for (int64_t c = 0; c < d; ++c) out[c] += p * v[c];
  }
}

constexpr int64_t kBlockParams = 13;
constexpr int64_t kHeadParams = 8;

struct Sizes {
  int64_t B, depth, H, Hk, hd, D, rope, residual, K;
};

const at::Tensor* opt(const c10::List<c10::optional<at::Tensor>>& params, std::vector<at::Tensor>& hold, int64_t i) {
  const c10::optional<at::Tensor> t = params.get(i);
  if (!t.has_value() || !t->defined()) return nullptr;
  hold[i] = t->contiguous();
  return &hold[i];
}

template <typename T>
const T* ptr(const at::Tensor* t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void check_param(const at::Tensor* t, int64_t i, at::IntArrayRef shape, const at::Tensor& x, bool required) {
  TORCH_CHECK(t || !required, "vqformer_decode_step: parameter ", i, " is required");
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "vqformer_decode_step: parameter ",
              i, " must be a ", x.scalar_type(), " tensor on ", x.device(), ", got ", t->scalar_type(), " on ",
              t->device());
  TORCH_CHECK(t->numel() == c10::multiply_integers(shape), "vqformer_decode_step: parameter ", i, " has shape ",
              t->sizes(), ", expected ", shape, " elements");
}

at::Tensor vqformer_decode_step_cpu(const at::Tensor& x_in, const c10::List<c10::optional<at::Tensor>>& params,
                                    at::TensorList kv, at::IntArrayRef kv_index, const at::Tensor& inputs,
                                    at::IntArrayRef input_index, at::IntArrayRef sizes, at::ArrayRef<double> scalars,
                                    int64_t pos) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1 && x_in.size(2) == 1,
              "vqformer_decode_step: x must be (B, 1, 1), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "vqformer_decode_step: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(sizes.size() == 6 && scalars.size() == 4, "vqformer_decode_step: sizes needs 6 entries and scalars 4");
  Sizes s{x_in.size(0), sizes[0], sizes[1], sizes[2], sizes[3], sizes[1] * sizes[3], sizes[4], sizes[5], 0};
  TORCH_CHECK(s.depth >= 0 && s.H > 0 && s.Hk > 0 && s.H % s.Hk == 0 && s.hd > 0 && (!s.rope || s.hd % 2 == 0),
              "vqformer_decode_step: bad sizes ", sizes);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == s.depth * kBlockParams + kHeadParams,
              "vqformer_decode_step: expected ", s.depth * kBlockParams + kHeadParams, " parameters, got ",
              params.size());
  TORCH_CHECK(static_cast<int64_t>(kv.size()) == s.depth && static_cast<int64_t>(kv_index.size()) == 3 * s.depth,
              "vqformer_decode_step: expected ", s.depth, " kv buffers and ", 3 * s.depth, " kv indices");
  TORCH_CHECK(input_index.size() == 3, "vqformer_decode_step: input_index needs (write, first, visible)");
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> hold(params.size());
  std::vector<const at::Tensor*> p(params.size());
  for (size_t i = 0; i < params.size(); ++i) p[i] = opt(params, hold, static_cast<int64_t>(i));
  const int64_t D = s.D, QKV = (s.H + 2 * s.Hk) * s.hd;
  for (int64_t l = 0; l < s.depth; ++l) {
    const int64_t o = l * kBlockParams;
    TORCH_CHECK(p[o + 10], "vqformer_decode_step: block ", l, " has no codebook");
    s.K = p[o + 10]->numel() / D;
    const bool ci = p[o + 8] != nullptr, co = p[o + 11] != nullptr;
    const std::vector<int64_t> shapes[kBlockParams] = {{D}, {D}, {QKV, D}, {QKV}, {D, D}, {D}, {D}, {D},
                                                       {D, D}, {D}, {s.H, s.K, s.hd}, {D, D}, {D}};
    const bool required[kBlockParams] = {true, true, true, false, true, false, true, true,
                                         false, false, true, false, false};
    for (int64_t i = 0; i < kBlockParams; ++i) check_param(p[o + i], o + i, shapes[i], x, required[i]);
    TORCH_CHECK((ci || !p[o + 9]) && (co || !p[o + 12]), "vqformer_decode_step: a bias without its weight");
    const at::Tensor& buf = kv[l];
    TORCH_CHECK(buf.dim() == 5 && buf.size(0) == 2 && buf.size(1) == s.B && buf.size(2) == s.Hk &&
                    buf.size(4) == s.hd && buf.is_contiguous() && buf.scalar_type() == x.scalar_type(),
                "vqformer_decode_step: kv[", l, "] must be a contiguous (2, ", s.B, ", ", s.Hk, ", capacity, ", s.hd,
                ") ", x.scalar_type(), " tensor, got ", buf.sizes());
    const int64_t w = kv_index[3 * l], first = kv_index[3 * l + 1], visible = kv_index[3 * l + 2];
    TORCH_CHECK(first >= 0 && visible >= 1 && first + visible <= buf.size(3) && w == first + visible - 1,
                "vqformer_decode_step: kv_index of layer ", l, " is out of range");
  }
  const int64_t h0 = s.depth * kBlockParams;
  const std::vector<int64_t> head_shapes[6] = {{D}, {D}, {D}, {D}, {D}, {1}};
  for (int64_t i = 0; i < 6; ++i) check_param(p[h0 + i], h0 + i, head_shapes[i], x, true);
  const at::Tensor* ar_w = p[h0 + 6];
  const int64_t L = ar_w ? ar_w->numel() : 0;
  if (ar_w) {
    check_param(ar_w, h0 + 6, {L}, x, true);
    check_param(p[h0 + 7], h0 + 7, {1}, x, true);
    TORCH_CHECK(inputs.dim() == 3 && inputs.size(0) == s.B && inputs.size(2) == 1 && inputs.is_contiguous() &&
                    inputs.scalar_type() == x.scalar_type(),
                "vqformer_decode_step: inputs must be a contiguous (", s.B, ", capacity, 1) tensor, got ",
                inputs.sizes());
    const int64_t w = input_index[0], first = input_index[1], visible = input_index[2];
    TORCH_CHECK(first >= 0 && visible >= 1 && first + visible <= inputs.size(1) && w == first + visible - 1,
                "vqformer_decode_step: input_index is out of range");
  }
  TORCH_CHECK(pos >= 0, "vqformer_decode_step: pos must be >= 0, got ", pos);

  at::Tensor y = at::empty({s.B, 1, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vqformer_decode_step_cpu", [&] {
    using T = scalar_t;
    const T attn_scale = static_cast<T>(scalars[1]), code_scale = static_cast<T>(scalars[2]);
    const T eps = static_cast<T>(scalars[3]);
    at::parallel_for(0, s.B, 16, [&](int64_t b0, int64_t b1) {
      int64_t longest = s.K;
      for (int64_t l = 0; l < s.depth; ++l) longest = std::max(longest, kv_index[3 * l + 2]);
      std::vector<T> h(D), a(D), qkv(QKV), att(D), code(D), scores(std::max<int64_t>(longest, 1));
      for (int64_t b = b0; b < b1; ++b) {
        const T xt = x.data_ptr<T>()[b];
        const T* enc_w = ptr<T>(p[h0]);
        const T* enc_b = ptr<T>(p[h0 + 1]);
        for (int64_t i = 0; i < D; ++i) h[i] = enc_w[i] * xt + enc_b[i];
        for (int64_t l = 0; l < s.depth; ++l) {
          const at::Tensor* const* bp = p.data() + l * kBlockParams;
          layer_norm(h.data(), ptr<T>(bp[0]), ptr<T>(bp[1]), eps, D, a.data());
          matvec(ptr<T>(bp[2]), ptr<T>(bp[3]), a.data(), QKV, D, qkv.data(), false);
          T* q = qkv.data();
          T* k_new = q + s.H * s.hd;
          T* v_new = k_new + s.Hk * s.hd;
          const int64_t cap = kv[l].size(3), w = kv_index[3 * l], first = kv_index[3 * l + 1];
          const int64_t visible = kv_index[3 * l + 2];
          T* kbase = kv[l].data_ptr<T>() + (b * s.Hk) * cap * s.hd;       // keys of row b
          T* vbase = kbase + s.B * s.Hk * cap * s.hd;                       // its values
          for (int64_t g = 0; g < s.Hk; ++g) {
            if (s.rope) rotate(k_new + g * s.hd, s.hd, pos, scalars[0]);
            std::copy(k_new + g * s.hd, k_new + (g + 1) * s.hd, kbase + (g * cap + w) * s.hd);
            std::copy(v_new + g * s.hd, v_new + (g + 1) * s.hd, vbase + (g * cap + w) * s.hd);
          }
          const int64_t group = s.H / s.Hk;
          for (int64_t hq = 0; hq < s.H; ++hq) {
            T* qh = q + hq * s.hd;
            if (s.rope) rotate(qh, s.hd, pos, scalars[0]);
            const int64_t g = hq / group;
            attend(qh, kbase + (g * cap + first) * s.hd, vbase + (g * cap + first) * s.hd, visible, s.hd, s.hd,
                   attn_scale, scores.data(), att.data() + hq * s.hd);
          }
          matvec(ptr<T>(bp[4]), ptr<T>(bp[5]), att.data(), D, D, h.data(), true);
          layer_norm(h.data(), ptr<T>(bp[6]), ptr<T>(bp[7]), eps, D, a.data());
          const T* cq = a.data();
          if (bp[8]) {
            matvec(ptr<T>(bp[8]), ptr<T>(bp[9]), a.data(), D, D, code.data(), false);
            cq = code.data();
          }
          const T* codebook = ptr<T>(bp[10]);
          for (int64_t hq = 0; hq < s.H; ++hq) {
            const T* cb = codebook + hq * s.K * s.hd;
            attend(cq + hq * s.hd, cb, cb, s.K, s.hd, s.hd, code_scale, scores.data(), att.data() + hq * s.hd);
          }
          if (bp[11]) {
            matvec(ptr<T>(bp[11]), ptr<T>(bp[12]), att.data(), D, D, h.data(), true);
          } else {
            for (int64_t i = 0; i < D; ++i) h[i] += att[i];
          }
        }
        layer_norm(h.data(), ptr<T>(p[h0 + 2]), ptr<T>(p[h0 + 3]), eps, D, a.data());
        T out = dot(ptr<T>(p[h0 + 4]), a.data(), D) + ptr<T>(p[h0 + 5])[0];
        if (ar_w) {  // causal filter over the last L inputs; history shorter than L repeats its oldest
          T* hist = inputs.data_ptr<T>() + b * inputs.size(1);
          const int64_t w = input_index[0], first = input_index[1], visible = input_index[2];
          hist[w] = xt;
          const T* f = ar_w->data_ptr<T>();
          T acc = ptr<T>(p[h0 + 7])[0];
          T conv = 0;
          for (int64_t j = 0; j < L; ++j) {
            const int64_t idx = visible - L + j;
            conv += f[j] * hist[first + (idx < 0 ? 0 : idx)];
          }
          out += acc + conv;
        }
        y.data_ptr<T>()[b] = s.residual ? xt + out : out;
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqext, CPU, m) { m.impl("vqformer_decode_step", &vqformer_decode_step_cpu); }

}  // namespace decode
}  // namespace vqext
