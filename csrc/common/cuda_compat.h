#pragma once
// What every .cu file of vqext takes from c10/cuda: the device guard, the current stream, the
// launch check, and launches of any number of blocks.
//
// A CUDA build of torch ships c10/cuda together with its generated header
// c10/cuda/impl/cuda_cmake_macros.h. Without that header the build is against a CPU build of
// torch, where kernels would run on device 0 and on the legacy default stream; that is refused
// here rather than compiled into a silent fallback. The compile-only CI check
// (.ci/compile_cuda.py) supplies a stub of the generated header so that this same code compiles
// against the CPU wheel's headers.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#error "vqext: c10/cuda/impl/cuda_cmake_macros.h not found: CUDA kernels must be built against a CUDA build of torch (pip install a +cuXXX torch, or set VQEXT_CUDA=0)"
#endif

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace vqext {
namespace cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// gridDim.x holds up to 2^31 - 1 blocks (gridDim.y and .z only 65535), so kernels take one flat
// block index and decode batch, head and tile from it. A launch of more blocks than that is split
// into chunks: launch(first_block, blocks) launches `blocks` blocks whose flat index is
// first_block + blockIdx.x. Each chunk's launch is checked.
constexpr int64_t kMaxGridX = 2147483647;

template <typename Launch>
void launch_flat(int64_t nblocks, Launch&& launch) {
  for (int64_t first = 0; first < nblocks; first += kMaxGridX) {
    launch(first, static_cast<unsigned>(std::min<int64_t>(kMaxGridX, nblocks - first)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// This block's flat index within a launch_flat launch.
__device__ __forceinline__ int64_t flat_block(int64_t first_block) {
  return first_block + static_cast<int64_t>(blockIdx.x);
}

}  // namespace cuda
}  // namespace vqext
