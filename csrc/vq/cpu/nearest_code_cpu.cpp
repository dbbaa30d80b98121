// nearest_code on the CPU: input checks, codebook packing, the float64 search and the dispatch of
// the float32 search to one instruction set's kernel (nearest_code_{portable,avx2,avx512}.cpp,
// chosen by vqext::cpu_isa()).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../../common/cpu_features.h"
#include "../vq_checks.h"
#include "nearest_code_cpu.h"

namespace vqext {
namespace vq {
namespace {

constexpr int64_t kRowsPerTask = 256;

// Runs task(0..tasks-1) over torch's intra-op pool (or inline when `inline_only`). A task writes
// only its own rows, so the split among threads never changes a result.
template <class F>
void run_tasks(int64_t tasks, bool inline_only, const F& task) {
  at::parallel_for(0, tasks, inline_only ? tasks : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task(t);
  });
}

// Exact score at the chosen code: the expanded form used for the search loses digits to
// cancellation, and recomputing costs O(D) per row against O(K D) for the search. Eight partial
// sums break the FMA dependency chain (it otherwise dominates at small K and large D).
template <class T>
inline T exact_score(const T* x, const T* c, int64_t D, bool l2) {
  constexpr int P = 8;
  T part[P] = {};
  int64_t d = 0;
  if (l2) {
    for (; d + P <= D; d += P)
      for (int j = 0; j < P; ++j) {
        const T diff = x[d + j] - c[d + j];
        part[j] += diff * diff;
      }
    for (; d < D; ++d) {
      const T diff = x[d] - c[d];
      part[0] += diff * diff;
    }
  } else {
    for (; d + P <= D; d += P)
      for (int j = 0; j < P; ++j) part[j] += x[d + j] * c[d + j];
    for (; d < D; ++d) part[0] += x[d] * c[d];
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

void search_f32(const at::Tensor& xs, const at::Tensor& cb, const NearestCodeShape& sh, at::Tensor& index,
                at::Tensor& score) {
  const NearestCodeKernel kernel = nearest_code_kernel(cpu_isa());
  const int64_t W = kernel.lanes;
  const int64_t H = sh.H, K = sh.K, D = sh.D;
  int64_t panels = (K + W - 1) / W;
  panels = (panels + kPanelsPerStep - 1) / kPanelsPerStep * kPanelsPerStep;

  // Packed codebook: O(K D) extra memory, panel-major so the micro-kernel streams it linearly.
  at::Tensor packed = at::empty({H, panels, D, W}, xs.options());
  at::Tensor bias = at::empty({H, panels, W}, xs.options());
  const float scale = sh.l2 ? -2.0f : -1.0f;
  const float* c = cb.data_ptr<float>();
  float* pk = packed.data_ptr<float>();
  float* bs = bias.data_ptr<float>();
  // Packing is O(K D): a fork/join costs more than it saves unless the codebook is large.
  at::parallel_for(0, H * panels, H * panels * D * W < (int64_t(1) << 21) ? H * panels : 16, [&](int64_t b, int64_t e) {
    for (int64_t hp = b; hp < e; ++hp) {
      const int64_t h = hp / panels, p = hp % panels;
      for (int64_t lane = 0; lane < W; ++lane) {
        const int64_t k = p * W + lane;
        float* dst = pk + hp * D * W + lane;
        if (k < K) {
          const float* src = c + (h * K + k) * D;
          float norm = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            dst[d * W] = scale * src[d];
            norm += src[d] * src[d];
          }
          bs[hp * W + lane] = sh.l2 ? norm : 0.f;
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d * W] = 0.f;
          bs[hp * W + lane] = std::numeric_limits<float>::infinity();
        }
      }
    }
  });

  const float* x = xs.data_ptr<float>();
  int64_t* idx = index.data_ptr<int64_t>();
  float* sc = score.data_ptr<float>();
  const int64_t blocks = (sh.N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = H * blocks;
  // Small problems stay on the calling thread, where waking a helper costs more than it saves.
  const bool small = sh.N * K * D * H < (int64_t(1) << 22);
  run_tasks(tasks, small, [&](int64_t t) {
    const int64_t h = t / blocks;
    const int64_t r0 = (t % blocks) * kRowsPerTask;
    const int64_t r1 = std::min(sh.N, r0 + kRowsPerTask);
    F32Search s{x + h * D, H * D, pk + h * panels * D * W, bs + h * panels * W, panels, K, D, idx + h, H};
    kernel.rows(s, r0, r1);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = idx[r * H + h];
      sc[r * H + h] = exact_score(x + (r * H + h) * D, c + (h * K + k) * D, D, sh.l2);
    }
  });
}

// float64: a plainly blocked scalar loop (the compiler vectorises the dot product); same
// objective and tie rule as the float32 kernels, and still O(N + K) memory.
void search_f64(const at::Tensor& xs, const at::Tensor& cb, const NearestCodeShape& sh, at::Tensor& index,
                at::Tensor& score) {
  constexpr int64_t kRowBlock = 64, kCodeBlock = 256;
  const int64_t H = sh.H, K = sh.K, D = sh.D;
  const double* x = xs.data_ptr<double>();
  const double* c = cb.data_ptr<double>();
  at::Tensor norms = sh.l2 ? cb.pow(2).sum(-1).contiguous() : at::zeros({H, K}, cb.options());
  const double* cn = norms.data_ptr<double>();
  int64_t* idx = index.data_ptr<int64_t>();
  double* sc = score.data_ptr<double>();
  const double scale = sh.l2 ? -2.0 : -1.0;
  const int64_t blocks = (sh.N + kRowBlock - 1) / kRowBlock;
  run_tasks(H * blocks, false, [&](int64_t t) {
    double best[kRowBlock];
    int64_t best_k[kRowBlock];
    {
      const int64_t h = t / blocks;
      const int64_t r0 = (t % blocks) * kRowBlock;
      const int64_t r1 = std::min(sh.N, r0 + kRowBlock);
      for (int64_t r = r0; r < r1; ++r) {
        best[r - r0] = std::numeric_limits<double>::infinity();
        best_k[r - r0] = 0;
      }
      for (int64_t k0 = 0; k0 < K; k0 += kCodeBlock) {
        const int64_t k1 = std::min(K, k0 + kCodeBlock);
        for (int64_t r = r0; r < r1; ++r) {
          const double* xr = x + (r * H + h) * D;
          double bv = best[r - r0];
          int64_t bk = best_k[r - r0];
          for (int64_t k = k0; k < k1; ++k) {
            const double* ck = c + (h * K + k) * D;
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += xr[d] * ck[d];
            const double v = cn[h * K + k] + scale * dot;
            if (v < bv) {
              bv = v;
              bk = k;
            }
          }
          best[r - r0] = bv;
          best_k[r - r0] = bk;
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k = best_k[r - r0];
        idx[r * H + h] = k;
        sc[r * H + h] = exact_score(x + (r * H + h) * D, c + (h * K + k) * D, D, sh.l2);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                    c10::string_view metric) {
  const NearestCodeShape sh = check_nearest_code(x, codebook, metric);
  const auto out_shape = nearest_code_out_shape(x);
  // Half precision on the CPU is searched in float32 (there is no fast half FMA to use here).
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xs = x.reshape({sh.N, sh.H, sh.D}).to(compute).contiguous();
  const at::Tensor cb = codebook.reshape({sh.H, sh.K, sh.D}).to(compute).contiguous();
  at::Tensor index = at::empty({sh.N, sh.H}, x.options().dtype(at::kLong));
  at::Tensor score = at::empty({sh.N, sh.H}, x.options().dtype(compute));
  if (sh.N > 0) {
    if (compute == at::kFloat) {
      search_f32(xs, cb, sh, index, score);
    } else {
      search_f64(xs, cb, sh, index, score);
    }
  }
  return {index.reshape(out_shape), score.to(x.scalar_type()).reshape(out_shape)};
}

}  // namespace
}  // namespace vq
}  // namespace vqext

TORCH_LIBRARY_IMPL(vqext, CPU, m) { m.impl("nearest_code", &vqext::vq::nearest_code_cpu); }
