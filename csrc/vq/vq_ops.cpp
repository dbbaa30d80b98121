// Operator schema of the vq family. Kernels register per backend: cpu/nearest_code_cpu.cpp (CPU)
// and cuda/nearest_code_cuda.cu (CUDA).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqext, m) {
  m.def("nearest_code(Tensor x, Tensor codebook, str metric=\"l2\") -> (Tensor index, Tensor score)");
}
