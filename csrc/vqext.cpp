// Python module vqext._C. Operators are registered with the dispatcher through TORCH_LIBRARY
// (see csrc/*/ *_ops.cpp); this module only carries build facts for `vqext info`.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/cpu_features.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = std::string(VQEXT_TORCH_VERSION);
#ifdef VQEXT_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["omp_max_threads"] = 1;
#endif
  d["avx2"] = vqext::cpu_has_avx2();
  d["avx512"] = vqext::cpu_has_avx512();
  // Kernels in use: VQEXT_CPU_ISA caps the available set (an unknown value raises ValueError here).
  d["cpu_isa_available"] = std::string(vqext::cpu_isa_name(vqext::cpu_isa_available()));
  d["cpu_isa"] = std::string(vqext::cpu_isa_name(vqext::cpu_isa()));
  d["compiler"] = std::string(__VERSION__);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqext native kernels";
  m.def("build_info", &build_info, "Compile-time and run-time facts about the native build");
}
