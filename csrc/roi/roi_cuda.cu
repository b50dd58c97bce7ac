// CUDA kernels of the ROI ops (schemas in roi.cpp, raw-kernel contract in docs/roi.md; the sampling
// geometry is roi_geometry.h, shared with the CPU kernels).
//
// roi_align: one block per (roi, channel chunk). Work items are (channel, bin) pairs; with
// channels_last the channel is the fastest item index so a warp reads 32 consecutive channels
// of one pixel (coalesced), with NCHW the bin is fastest. The block stages its [chunk, bins]
// output tile in shared memory and writes it as one contiguous range of out[k]; the backward
// stages the gradient tile the same way and scatters with atomicAdd into a float (double for
// double inputs) buffer, coalesced along C for channels_last.
//
// roi_pool_fuse: the bilinear weights are separable (the samples of a roi form a Cartesian grid
// and the "outside the map" test and the clamping are per axis), so the weight of feature pixel
// (i, j) in r_k is wy[i] * wx[j] summed over all bins and samples. A block first builds the
// non-zero row and column weights of its roi in shared memory; r_k then reads each pixel of the
// roi's support once per channel (instead of 4 taps x samples x bins) and never forms the
// [K, C, S, S] tensor. Each op is two launches so that the heavy phase spreads over
// K x C/64 blocks (few rois still fill the GPU): forward = r_k per (roi, 64-channel chunk) plus
// that chunk's part of the gate logit, then a per-roi kernel sums the parts (fixed order) and
// writes a_k and z_k; backward = a per-roi kernel for ds_k = dL/d(logit) and the global / gate
// gradients, then the scatter of dr_k per (roi, chunk), one atomicAdd per (pixel, channel).
//
// All arithmetic is in at::opmath_type (float for half/bfloat16/float, double for double).
//
// Launches per call (docs/roi-gpu-kernels.md counts them): nothing here reads a value back to the
// host, so the ops can be captured in a CUDA graph. global_feat, gate_weight and gate_bias are
// read by the kernels in the features' dtype or in float (no cast launch), and the fused backward's
// first kernel zeroes its accumulation buffers itself (no memset launches).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "roi_cuda_kernels.cuh"

namespace regionmed::roi_cuda {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------ host side

void check_cuda_tensor(const Tensor& t, const char* name, int64_t dim, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "roi cuda kernels: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "roi cuda kernels: ", name, " is on ", t.device(), " but ",
              "the features are on ", ref.device());
  TORCH_CHECK(t.dim() == dim, "roi cuda kernels: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "roi cuda kernels: ", name,
              " must be floating point, got ", t.scalar_type());
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor prepare_rois(const Tensor& rois, at::ScalarType acc, const Tensor& ref) {
  check_cuda_tensor(rois, "rois", 2, ref);
  TORCH_CHECK(rois.size(1) == 5, "roi cuda kernels: rois must be [K, 5], got ", rois.sizes());
  return rois.to(acc).contiguous();
}

void check_int_range(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v < (int64_t{1} << 31), "roi cuda kernels: ", name, " = ", v, " out of range");
}

int64_t checked_align_chunk(int64_t C, int64_t NB, int64_t acc_size) {
  const int64_t chunk = align_chunk(C, NB, acc_size);
  TORCH_CHECK(chunk >= 1, "roi_align (cuda): pooled size ", NB, " bins does not fit in shared memory");
  return chunk;
}

// A small input as the kernels read it: as it is when its dtype is the features' (`low`) or the
// accumulation dtype; otherwise cast to the accumulation dtype (the one case that costs a launch).
// `keep` owns the tensor the pointer refers to.
Param as_param(const Tensor& t, at::ScalarType features_t, at::ScalarType acc, Tensor& keep) {
  keep = t.scalar_type() == features_t || t.scalar_type() == acc ? t.contiguous() : t.to(acc).contiguous();
  return Param{keep.const_data_ptr(), keep.scalar_type() == features_t && features_t != acc};
}

Tensor roi_align_forward(const Tensor& features_in, const Tensor& rois_in, double spatial_scale,
                         int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                         bool channels_last) {
  check_cuda_tensor(features_in, "features", 4, features_in);
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align_forward: pooled size must be positive, got ",
              pooled_h, "x", pooled_w);
  c10::cuda::CUDAGuard guard(features_in.device());
  const Tensor features = features_in.contiguous();
  const auto acc = acc_type(features.scalar_type());
  const Tensor rois = prepare_rois(rois_in, acc, features);
  const int64_t B = features.size(0);
  const int64_t C = channels_last ? features.size(3) : features.size(1);
  const int64_t H = channels_last ? features.size(1) : features.size(2);
  const int64_t W = channels_last ? features.size(2) : features.size(3);
  const int64_t K = rois.size(0);
  for (int64_t v : {B, C, H, W, K, pooled_h * pooled_w, H * W}) check_int_range(v, "size");
  Tensor out = at::empty({K, C, pooled_h, pooled_w}, features.options());
  if (K == 0 || C == 0) return out;
  if (H == 0 || W == 0) return out.zero_();
  const int64_t NB = pooled_h * pooled_w;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunk = checked_align_chunk(C, NB, sizeof(acc_t));
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + chunk - 1) / chunk));
    const size_t smem = static_cast<size_t>(chunk * NB) * sizeof(acc_t);
    roi_align_fwd_kernel<scalar_t, acc_t><<<grid, kThreads, smem, stream>>>(
        features.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
        static_cast<acc_t>(spatial_scale), static_cast<int>(B), static_cast<int>(C), static_cast<int>(H),
        static_cast<int>(W), static_cast<int>(pooled_h), static_cast<int>(pooled_w),
        static_cast<int>(sampling_ratio), aligned, channels_last, static_cast<int>(chunk));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor roi_align_backward(const Tensor& grad_in, const Tensor& rois_in, double spatial_scale,
                          int64_t pooled_h, int64_t pooled_w, int64_t B, int64_t C, int64_t H,
                          int64_t W, int64_t sampling_ratio, bool aligned, bool channels_last) {
  check_cuda_tensor(grad_in, "grad", 4, grad_in);
  c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const auto acc = acc_type(grad.scalar_type());
  const Tensor rois = prepare_rois(rois_in, acc, grad);
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.size(0) == K && grad.size(1) == C && grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "roi_align_backward: grad must be [K, C, PH, PW] = [", K, ", ", C, ", ", pooled_h, ", ",
              pooled_w, "], got ", grad.sizes());
  for (int64_t v : {B, C, H, W, K, H * W}) check_int_range(v, "size");
  const std::vector<int64_t> shape = channels_last ? std::vector<int64_t>{B, H, W, C}
                                                   : std::vector<int64_t>{B, C, H, W};
  Tensor gf = at::zeros(shape, grad.options().dtype(acc));
  if (K > 0 && C > 0 && H > 0 && W > 0) {
    const int64_t NB = pooled_h * pooled_w;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t chunk = checked_align_chunk(C, NB, sizeof(acc_t));
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + chunk - 1) / chunk));
      const size_t smem = static_cast<size_t>(chunk * NB) * sizeof(acc_t);
      roi_align_bwd_kernel<scalar_t, acc_t><<<grid, kThreads, smem, stream>>>(
          grad.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), gf.mutable_data_ptr<acc_t>(),
          static_cast<acc_t>(spatial_scale), static_cast<int>(B), static_cast<int>(C), static_cast<int>(H),
          static_cast<int>(W), static_cast<int>(pooled_h), static_cast<int>(pooled_w),
          static_cast<int>(sampling_ratio), aligned, channels_last, static_cast<int>(chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gf.scalar_type() == grad.scalar_type() ? gf : gf.to(grad.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> roi_pool_fuse_forward(
    const Tensor& features_in, const Tensor& rois_in, const Tensor& global_in, const Tensor& weight_in,
    const Tensor& bias_in, double spatial_scale, int64_t S, int64_t sampling_ratio, bool aligned,
    bool channels_last) {
  check_cuda_tensor(features_in, "features", 4, features_in);
  check_cuda_tensor(global_in, "global_feat", 2, features_in);
  check_cuda_tensor(weight_in, "gate_weight", 2, features_in);
  TORCH_CHECK(bias_in.is_cuda() && bias_in.device() == features_in.device() && bias_in.numel() == 1,
              "roi_pool_fuse_forward: gate_bias must be a 1-element tensor on ", features_in.device());
  TORCH_CHECK(S > 0, "roi_pool_fuse_forward: output_size must be positive, got ", S);
  c10::cuda::CUDAGuard guard(features_in.device());
  const Tensor features = features_in.contiguous();
  const auto ft = features.scalar_type();
  const auto acc = acc_type(ft);
  const Tensor rois = prepare_rois(rois_in, acc, features);
  const int64_t B = features.size(0);
  const int64_t C = channels_last ? features.size(3) : features.size(1);
  const int64_t H = channels_last ? features.size(1) : features.size(2);
  const int64_t W = channels_last ? features.size(2) : features.size(3);
  const int64_t K = rois.size(0);
  TORCH_CHECK(global_in.size(0) == B && global_in.size(1) == C, "roi_pool_fuse_forward: global_feat must be [B, C] = [",
              B, ", ", C, "], got ", global_in.sizes());
  TORCH_CHECK(weight_in.size(0) == 2 && weight_in.size(1) == C, "roi_pool_fuse_forward: gate_weight must be [2, ",
              C, "], got ", weight_in.sizes());
  for (int64_t v : {B, C, H, W, K, H * W, S * S}) check_int_range(v, "size");
  Tensor z = at::empty({K, C}, features.options());
  Tensor r = at::empty({K, C}, features.options().dtype(acc));
  Tensor a = at::empty({K}, features.options().dtype(acc));
  if (K == 0) return {z, r, a};  // an empty map (H or W = 0) runs the kernel: r = 0 there
  Tensor gl, wt, bias;
  const Param p_glob = as_param(global_in, ft, acc, gl);
  const Param p_wgt = as_param(weight_in, ft, acc, wt);
  const Param p_bias = as_param(bias_in, ft, acc, bias);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t nparts = (C + kFuseChunk - 1) / kFuseChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ft, "roi_pool_fuse_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t smem = fuse_smem(H, W, sizeof(acc_t));
    TORCH_CHECK(smem <= kSmemLimit, "roi_pool_fuse_forward (cuda): feature map ", H, "x", W, " too large");
    // Phase 1 writes r and per-chunk parts of the gate logit; phase 2 forms a and z. Two
    // launches let phase 1 spread over K * C / 64 blocks instead of K.
    Tensor part = at::empty({K, std::max<int64_t>(nparts, 1)}, features.options().dtype(acc));
    if (nparts > 0) {
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(nparts));
      roi_pool_fuse_r_kernel<scalar_t, acc_t><<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
          features.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), p_glob, p_wgt,
          r.mutable_data_ptr<acc_t>(), part.mutable_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale),
          static_cast<int>(B), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
          static_cast<int>(S), static_cast<int>(sampling_ratio), aligned, channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    roi_pool_fuse_gate_kernel<scalar_t, acc_t><<<static_cast<unsigned>(K), kThreads,
                                                 static_cast<size_t>(fuse_small_smem(sizeof(acc_t))), stream>>>(
        rois.const_data_ptr<acc_t>(), p_glob, p_bias, r.const_data_ptr<acc_t>(), part.const_data_ptr<acc_t>(),
        z.mutable_data_ptr<scalar_t>(), a.mutable_data_ptr<acc_t>(), static_cast<int>(B), static_cast<int>(C),
        static_cast<int>(nparts));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, r, a};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> roi_pool_fuse_backward(
    const Tensor& grad_z_in, const Tensor& rois_in, const Tensor& global_in, const Tensor& weight_in,
    const Tensor& r_in, const Tensor& a_in, double spatial_scale, int64_t S, int64_t sampling_ratio,
    bool aligned, bool channels_last, int64_t B, int64_t H, int64_t W) {
  check_cuda_tensor(grad_z_in, "grad_z", 2, grad_z_in);
  check_cuda_tensor(global_in, "global_feat", 2, grad_z_in);
  check_cuda_tensor(weight_in, "gate_weight", 2, grad_z_in);
  c10::cuda::CUDAGuard guard(grad_z_in.device());
  const Tensor grad_z = grad_z_in.contiguous();
  const auto gt = grad_z.scalar_type();
  const auto acc = acc_type(gt);
  const Tensor rois = prepare_rois(rois_in, acc, grad_z);
  const int64_t K = rois.size(0), C = global_in.size(1);
  TORCH_CHECK(grad_z.size(0) == K && grad_z.size(1) == C, "roi_pool_fuse_backward: grad_z must be [K, C] = [", K,
              ", ", C, "], got ", grad_z.sizes());
  TORCH_CHECK(global_in.size(0) == B, "roi_pool_fuse_backward: global_feat must be [B, C] with B = ", B);
  TORCH_CHECK(r_in.dim() == 2 && r_in.size(0) == K && r_in.size(1) == C, "roi_pool_fuse_backward: r must be [K, C]");
  TORCH_CHECK(a_in.numel() == K, "roi_pool_fuse_backward: a must be [K]");
  TORCH_CHECK(weight_in.size(0) == 2 && weight_in.size(1) == C, "roi_pool_fuse_backward: gate_weight must be [2, C]");
  for (int64_t v : {B, C, H, W, K, H * W, S * S}) check_int_range(v, "size");
  const std::vector<int64_t> shape = channels_last ? std::vector<int64_t>{B, H, W, C}
                                                   : std::vector<int64_t>{B, C, H, W};
  const auto acc_opts = grad_z.options().dtype(acc);
  const bool run = K > 0 && C > 0;  // an empty map still has global / gate gradients
  // Accumulation buffers: zeroed by the first kernel when it runs, else here.
  auto buffer = [&](at::IntArrayRef size) { return run ? at::empty(size, acc_opts) : at::zeros(size, acc_opts); };
  Tensor gf = buffer(shape), g_global = buffer({B, C}), g_weight = buffer({2, C}), g_bias = buffer({1});
  if (run) {
    const Tensor r = r_in.to(acc).contiguous();
    const Tensor a = a_in.to(acc).reshape({K}).contiguous();
    Tensor gl, wt;
    const Param p_glob = as_param(global_in, gt, acc, gl);
    const Param p_wgt = as_param(weight_in, gt, acc, wt);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gt, "roi_pool_fuse_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t smem = fuse_smem(H, W, sizeof(acc_t));
      TORCH_CHECK(smem <= kSmemLimit, "roi_pool_fuse_backward (cuda): feature map ", H, "x", W, " too large");
      // Phase 1: zero the accumulation buffers, ds_k per roi. Phase 2 (block per roi and 64-channel
      // chunk): the global / gate gradients and the scatter into grad_features.
      Tensor ds = at::empty({K}, acc_opts);
      ZeroList<acc_t> zero{{gf.mutable_data_ptr<acc_t>(), g_global.mutable_data_ptr<acc_t>(),
                            g_weight.mutable_data_ptr<acc_t>(), g_bias.mutable_data_ptr<acc_t>()},
                           {gf.numel(), g_global.numel(), g_weight.numel(), g_bias.numel()}};
      const int64_t blocks = ds_blocks(K, gf.numel() + g_global.numel());
      check_int_range(blocks, "blocks");
      roi_pool_fuse_ds_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads,
                                                 static_cast<size_t>(fuse_small_smem(sizeof(acc_t))), stream>>>(
          grad_z.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), p_glob, r.const_data_ptr<acc_t>(),
          a.const_data_ptr<acc_t>(), ds.mutable_data_ptr<acc_t>(), zero, static_cast<int>(K), static_cast<int>(B),
          static_cast<int>(C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + kFuseChunk - 1) / kFuseChunk));
      roi_pool_fuse_scatter_kernel<scalar_t, acc_t><<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
          grad_z.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), p_glob, p_wgt, r.const_data_ptr<acc_t>(),
          a.const_data_ptr<acc_t>(), ds.const_data_ptr<acc_t>(), gf.mutable_data_ptr<acc_t>(),
          g_global.mutable_data_ptr<acc_t>(), g_weight.mutable_data_ptr<acc_t>(), g_bias.mutable_data_ptr<acc_t>(),
          static_cast<acc_t>(spatial_scale), static_cast<int>(B), static_cast<int>(C), static_cast<int>(H),
          static_cast<int>(W), static_cast<int>(S), static_cast<int>(sampling_ratio), aligned, channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Casts only where a dtype differs from the accumulation dtype (low-precision training).
  auto as = [](const Tensor& t, at::ScalarType d) { return t.scalar_type() == d ? t : t.to(d); };
  return {as(gf, gt), as(g_global, global_in.scalar_type()), as(g_weight, weight_in.scalar_type()),
          as(g_bias, weight_in.scalar_type())};
}

}  // namespace
}  // namespace regionmed::roi_cuda

TORCH_LIBRARY_IMPL(regionmed_fast_C, CUDA, m) {
  m.impl("roi_align_forward", &regionmed::roi_cuda::roi_align_forward);
  m.impl("roi_align_backward", &regionmed::roi_cuda::roi_align_backward);
  m.impl("roi_pool_fuse_forward", &regionmed::roi_cuda::roi_pool_fuse_forward);
  m.impl("roi_pool_fuse_backward", &regionmed::roi_cuda::roi_pool_fuse_backward);
}
