// Schemas of the raw ROI kernels (the raw-kernel contract in docs/roi.md). They are defined once here;
// each backend registers its implementation under its dispatch key in its own file
// (roi_cpu.cpp: CPU, roi_cuda.cu: CUDA). Autograd, validation and fake kernels live in Python
// (regionmed_fast/ops/roi.py), which wraps these as torch.library custom ops.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(regionmed_fast_C, m) {
  m.def(
      "roi_align_forward(Tensor features, Tensor rois, float spatial_scale, int pooled_h, "
      "int pooled_w, int sampling_ratio, bool aligned, bool channels_last) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_h, "
      "int pooled_w, int batch, int channels, int height, int width, int sampling_ratio, "
      "bool aligned, bool channels_last) -> Tensor");
  m.def(
      "roi_pool_fuse_forward(Tensor features, Tensor rois, Tensor global_feat, "
      "Tensor gate_weight, Tensor gate_bias, float spatial_scale, int output_size, "
      "int sampling_ratio, bool aligned, bool channels_last) -> (Tensor z, Tensor r, Tensor a)");
  m.def(
      "roi_pool_fuse_backward(Tensor grad_z, Tensor rois, Tensor global_feat, "
      "Tensor gate_weight, Tensor r, Tensor a, float spatial_scale, int output_size, "
      "int sampling_ratio, bool aligned, bool channels_last, int batch, int height, int width) "
      "-> (Tensor grad_features, Tensor grad_global, Tensor grad_gate_weight, "
      "Tensor grad_gate_bias)");
}
