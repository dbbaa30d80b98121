#pragma once
// Input checks and shape resolution shared by the CPU and CUDA nearest_code kernels. The Python
// API validates first with friendlier errors; these keep a direct torch.ops call from crashing.
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

namespace vqext {
namespace vq {

struct NearestCodeShape {
  int64_t N;  // rows per head (product of the leading dims)
  int64_t H;  // heads (1 for a single (K, D) codebook)
  int64_t K;
  int64_t D;
  bool l2;
};

inline NearestCodeShape check_nearest_code(const at::Tensor& x, const at::Tensor& codebook,
                                           c10::string_view metric) {
  TORCH_CHECK_VALUE(metric == "l2" || metric == "ip", "nearest_code: metric must be 'l2' or 'ip', got '",
                    std::string(metric), "'");
  TORCH_CHECK_VALUE(codebook.dim() == 2 || codebook.dim() == 3,
                    "nearest_code: codebook must be (K, D) or (H, K, D), got shape ", codebook.sizes());
  const bool multi = codebook.dim() == 3;
  TORCH_CHECK_VALUE(x.dim() >= (multi ? 2 : 1), "nearest_code: x must be ", multi ? "(..., H, D)" : "(..., D)",
                    ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == codebook.device(), "nearest_code: x is on ", x.device(), " but codebook is on ",
                    codebook.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "nearest_code: x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(codebook.scalar_type() == x.scalar_type(), "nearest_code: codebook dtype ",
                   codebook.scalar_type(), " must match x dtype ", x.scalar_type());
  NearestCodeShape s;
  s.l2 = metric == "l2";
  s.D = codebook.size(-1);
  s.K = codebook.size(-2);
  s.H = multi ? codebook.size(0) : 1;
  TORCH_CHECK_VALUE(s.K > 0, "nearest_code: codebook has K = 0 entries");
  TORCH_CHECK_VALUE(x.size(-1) == s.D, "nearest_code: x has D = ", x.size(-1), " but codebook has D = ", s.D);
  if (multi) {
    TORCH_CHECK_VALUE(x.size(-2) == s.H, "nearest_code: x has H = ", x.size(-2), " heads (dim -2) but codebook has H = ",
                      s.H);
  }
  TORCH_CHECK_VALUE(s.K <= INT32_MAX, "nearest_code: K = ", s.K, " is too large");
  int64_t n = 1;
  for (int64_t i = 0; i < x.dim() - (multi ? 2 : 1); ++i) n *= x.size(i);
  s.N = n;
  return s;
}

inline std::vector<int64_t> nearest_code_out_shape(const at::Tensor& x) {
  auto sz = x.sizes();
  return std::vector<int64_t>(sz.begin(), sz.end() - 1);
}

}  // namespace vq
}  // namespace vqext
