// Python module entry of regionmed_fast._C. Importing it runs the TORCH_LIBRARY registrations
// of every op family in csrc/<op>/ (namespace regionmed_fast_C); the Python side wraps those
// raw kernels as custom ops with autograd and fake kernels (regionmed_fast/ops/).
#include <torch/extension.h>

#include "roi/roi_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

bool cuda_compiled() {
#ifdef REGIONMED_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "regionmed-fast compiled kernels (ops live in torch.ops.regionmed_fast_C)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP threads the CPU kernels use");
  m.def("_roi_set_parallel_min_work", &regionmed::roi_cpu::set_parallel_min_work,
        "Work (multiply-adds) from which the CPU ROI loops use threads; returns the previous value");
}
