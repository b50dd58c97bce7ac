// CUDA kernels of the ROI ops (schemas in roi.cpp, contract in INTERFACES.md).
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
// [K, C, S, S] tensor. The forward uses one block per roi (the scalar gate needs all of r_k);
// the backward one block per (roi, channel chunk), each recomputing dL/da over all channels
// (3 reads of C values) and scattering one atomicAdd per (pixel, channel).
//
// All arithmetic is in at::opmath_type (float for half/bfloat16/float, double for double).
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

namespace regionmed::roi_cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kSmemLimit = 48 * 1024;

// Correctly rounded division: setup.py compiles with --use_fast_math, whose approximate float
// division could turn the ceil() of an exact quotient such as 14 / 7 into 3.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

// torchvision's per-roi sampling geometry.
template <typename T>
struct Geom {
  int64_t batch;
  T start_h, start_w, bin_h, bin_w;
  int grid_h, grid_w;
  T count;
};

template <typename T>
__device__ __forceinline__ Geom<T> make_geom(const T* roi, T scale, int ph, int pw, int sampling_ratio,
                                             bool aligned) {
  const T off = aligned ? T(0.5) : T(0);
  Geom<T> g;
  g.batch = static_cast<int64_t>(roi[0]);
  g.start_w = roi[1] * scale - off;
  g.start_h = roi[2] * scale - off;
  T roi_w = roi[3] * scale - off - g.start_w;
  T roi_h = roi[4] * scale - off - g.start_h;
  if (!aligned) {  // legacy mode forces malformed rois to 1x1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = div_rn(roi_h, static_cast<T>(ph));
  g.bin_w = div_rn(roi_w, static_cast<T>(pw));
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int>(ceil(g.bin_h));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int>(ceil(g.bin_w));
  g.grid_h = g.grid_h > 0 ? g.grid_h : 0;
  g.grid_w = g.grid_w > 0 ? g.grid_w : 0;
  const int n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Sample coordinate of sample s of bin p along one axis (torchvision's operation order).
template <typename T>
__device__ __forceinline__ T sample_pos(T start, T bin, int p, int s, int grid) {
  return start + static_cast<T>(p) * bin + div_rn(static_cast<T>(s + T(0.5)) * bin, static_cast<T>(grid));
}

// The two pixels a sample at `pos` touches along an axis of length `size`, and their weights;
// false when the sample lies beyond one pixel outside the map (it then contributes 0).
template <typename T>
__device__ __forceinline__ bool axis_taps(T pos, int size, int& lo, int& hi, T& w_lo, T& w_hi) {
  if (pos < T(-1) || pos > static_cast<T>(size)) return false;
  if (pos <= T(0)) pos = T(0);
  lo = static_cast<int>(pos);
  if (lo >= size - 1) {
    lo = hi = size - 1;
    pos = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  w_hi = pos - static_cast<T>(lo);
  w_lo = T(1) - w_hi;
  return true;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 33 values.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T t = lane < nwarps ? scratch[lane] : T(0);
    t = warp_sum(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  return scratch[32];
}

// ------------------------------------------------------------------------------ roi_align

template <typename scalar_t, typename acc_t>
__global__ void roi_align_fwd_kernel(const scalar_t* __restrict__ feat, const acc_t* __restrict__ rois,
                                     scalar_t* __restrict__ out, acc_t scale, int C, int H, int W,
                                     int PH, int PW, int sampling_ratio, bool aligned,
                                     bool channels_last, int chunk) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * chunk;
  const int ct = min(chunk, C - c0);
  const int NB = PH * PW;
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, PH, PW, sampling_ratio, aligned);
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t s_c = channels_last ? 1 : HW;
  const int64_t s_y = channels_last ? static_cast<int64_t>(W) * C : W;
  const int64_t s_x = channels_last ? C : 1;
  const scalar_t* fb = feat + g.batch * HW * C;
  for (int t = threadIdx.x; t < ct * NB; t += blockDim.x) {
    const int cl = channels_last ? t % ct : t / NB;
    const int bin = channels_last ? t / ct : t % NB;
    const int ph = bin / PW, pw = bin % PW;
    const scalar_t* fc = fb + (c0 + cl) * s_c;
    acc_t val = acc_t(0);
    for (int iy = 0; iy < g.grid_h; ++iy) {
      int ylo, yhi;
      acc_t wylo, wyhi;
      if (!axis_taps(sample_pos(g.start_h, g.bin_h, ph, iy, g.grid_h), H, ylo, yhi, wylo, wyhi)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        int xlo, xhi;
        acc_t wxlo, wxhi;
        if (!axis_taps(sample_pos(g.start_w, g.bin_w, pw, ix, g.grid_w), W, xlo, xhi, wxlo, wxhi)) continue;
        val += wylo * wxlo * static_cast<acc_t>(fc[ylo * s_y + xlo * s_x]) +
               wylo * wxhi * static_cast<acc_t>(fc[ylo * s_y + xhi * s_x]) +
               wyhi * wxlo * static_cast<acc_t>(fc[yhi * s_y + xlo * s_x]) +
               wyhi * wxhi * static_cast<acc_t>(fc[yhi * s_y + xhi * s_x]);
      }
    }
    tile[cl * NB + bin] = val / g.count;
  }
  __syncthreads();
  // out[k, c0:c0+ct, :, :] is one contiguous range: write it coalesced.
  scalar_t* ob = out + (k * C + c0) * NB;
  for (int t = threadIdx.x; t < ct * NB; t += blockDim.x) ob[t] = static_cast<scalar_t>(tile[t]);
}

template <typename scalar_t, typename acc_t>
__global__ void roi_align_bwd_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ rois,
                                     acc_t* __restrict__ gfeat, acc_t scale, int C, int H, int W,
                                     int PH, int PW, int sampling_ratio, bool aligned,
                                     bool channels_last, int chunk) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * chunk;
  const int ct = min(chunk, C - c0);
  const int NB = PH * PW;
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, PH, PW, sampling_ratio, aligned);
  const scalar_t* gb = grad + (k * C + c0) * NB;
  for (int t = threadIdx.x; t < ct * NB; t += blockDim.x) tile[t] = static_cast<acc_t>(gb[t]) / g.count;
  __syncthreads();
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t s_c = channels_last ? 1 : HW;
  const int64_t s_y = channels_last ? static_cast<int64_t>(W) * C : W;
  const int64_t s_x = channels_last ? C : 1;
  acc_t* fb = gfeat + g.batch * HW * C;
  for (int t = threadIdx.x; t < ct * NB; t += blockDim.x) {
    const int cl = channels_last ? t % ct : t / NB;
    const int bin = channels_last ? t / ct : t % NB;
    const int ph = bin / PW, pw = bin % PW;
    const acc_t gv = tile[cl * NB + bin];
    if (gv == acc_t(0)) continue;
    acc_t* fc = fb + (c0 + cl) * s_c;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      int ylo, yhi;
      acc_t wylo, wyhi;
      if (!axis_taps(sample_pos(g.start_h, g.bin_h, ph, iy, g.grid_h), H, ylo, yhi, wylo, wyhi)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        int xlo, xhi;
        acc_t wxlo, wxhi;
        if (!axis_taps(sample_pos(g.start_w, g.bin_w, pw, ix, g.grid_w), W, xlo, xhi, wxlo, wxhi)) continue;
        atomicAdd(fc + ylo * s_y + xlo * s_x, gv * wylo * wxlo);
        atomicAdd(fc + ylo * s_y + xhi * s_x, gv * wylo * wxhi);
        atomicAdd(fc + yhi * s_y + xlo * s_x, gv * wyhi * wxlo);
        atomicAdd(fc + yhi * s_y + xhi * s_x, gv * wyhi * wxhi);
      }
    }
  }
}

// ------------------------------------------------------------------------------ roi_pool_fuse

// Shared-memory layout of the separable roi weights: non-zero rows (index, weight) and columns.
template <typename acc_t>
struct Support {
  acc_t* row_w;
  acc_t* col_w;
  int* row_i;
  int* col_i;
  int* counts;  // [0] = rows, [1] = columns
  acc_t* scratch;  // 33 values for block reductions
};

template <typename acc_t>
__device__ Support<acc_t> carve(unsigned char* raw, int H, int W) {
  Support<acc_t> s;
  s.row_w = reinterpret_cast<acc_t*>(raw);
  s.col_w = s.row_w + H;
  s.scratch = s.col_w + W;
  s.row_i = reinterpret_cast<int*>(s.scratch + 33);
  s.col_i = s.row_i + H;
  s.counts = s.col_i + W;
  return s;
}

// Bytes of the Support arrays, rounded up to acc_size so that a per-block tile can follow them.
__host__ __device__ inline int64_t support_smem_bytes(int64_t H, int64_t W, int64_t acc_size) {
  const int64_t n = (H + W + 33) * acc_size + (H + W + 2) * static_cast<int64_t>(sizeof(int));
  return (n + acc_size - 1) / acc_size * acc_size;
}

// Per-axis weight of every pixel summed over the roi's S bins and their samples, compacted to
// the non-zero pixels (in increasing order, so the work is deterministic).
template <typename acc_t>
__device__ void build_support(const Geom<acc_t>& g, int S, int H, int W, Support<acc_t> s) {
  for (int i = threadIdx.x; i < H + W; i += blockDim.x) {
    const bool is_row = i < H;
    const int pix = is_row ? i : i - H;
    const int size = is_row ? H : W, grid = is_row ? g.grid_h : g.grid_w;
    const acc_t start = is_row ? g.start_h : g.start_w, bin = is_row ? g.bin_h : g.bin_w;
    acc_t w = acc_t(0);
    for (int p = 0; p < S; ++p) {
      for (int q = 0; q < grid; ++q) {
        int lo, hi;
        acc_t wlo, whi;
        if (!axis_taps(sample_pos(start, bin, p, q, grid), size, lo, hi, wlo, whi)) continue;
        if (lo == pix) w += wlo;
        if (hi == pix) w += whi;
      }
    }
    (is_row ? s.row_w[pix] : s.col_w[pix]) = w;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int n = 0;
    for (int i = 0; i < H; ++i) {
      if (s.row_w[i] != acc_t(0)) {
        s.row_w[n] = s.row_w[i];
        s.row_i[n++] = i;
      }
    }
    s.counts[0] = n;
  }
  // Columns are compacted by a thread of the second warp (the first one when there is none).
  if (threadIdx.x == (blockDim.x > 32 ? 32 : 0)) {
    int n = 0;
    for (int j = 0; j < W; ++j) {
      if (s.col_w[j] != acc_t(0)) {
        s.col_w[n] = s.col_w[j];
        s.col_i[n++] = j;
      }
    }
    s.counts[1] = n;
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void roi_pool_fuse_fwd_kernel(const scalar_t* __restrict__ feat, const acc_t* __restrict__ rois,
                                         const acc_t* __restrict__ glob, const acc_t* __restrict__ wgt,
                                         const acc_t* __restrict__ bias, scalar_t* __restrict__ z,
                                         acc_t* r, acc_t* __restrict__ a_out, acc_t scale, int C, int H,
                                         int W, int S, int sampling_ratio, bool aligned,
                                         bool channels_last) {
  extern __shared__ unsigned char smem_raw[];
  const Support<acc_t> sp = carve<acc_t>(smem_raw, H, W);
  const int64_t k = blockIdx.x;
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, S, S, sampling_ratio, aligned);
  build_support(g, S, H, W, sp);
  const int nr = sp.counts[0], nc = sp.counts[1];
  const acc_t inv_norm = acc_t(1) / (g.count * static_cast<acc_t>(S * S));
  const int64_t HW = static_cast<int64_t>(H) * W;
  const scalar_t* fb = feat + g.batch * HW * C;
  const acc_t* gk = glob + g.batch * C;
  acc_t* rk = r + k * C;
  acc_t partial = acc_t(0);
  if (channels_last) {
    // Thread per channel: a warp reads 32 consecutive channels of each support pixel.
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t sum = acc_t(0);
      for (int ia = 0; ia < nr; ++ia) {
        const scalar_t* row = fb + (static_cast<int64_t>(sp.row_i[ia]) * W) * C + c;
        acc_t rs = acc_t(0);
#pragma unroll 4
        for (int jb = 0; jb < nc; ++jb) {
          rs += sp.col_w[jb] * static_cast<acc_t>(row[static_cast<int64_t>(sp.col_i[jb]) * C]);
        }
        sum += sp.row_w[ia] * rs;
      }
      const acc_t rv = sum * inv_norm;
      rk[c] = rv;
      partial += wgt[c] * rv + wgt[C + c] * gk[c];
    }
  } else {
    // Warp per channel: lanes walk the support pixels of one channel plane.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int npix = nr * nc;
    for (int c = warp; c < C; c += nwarps) {
      const scalar_t* plane = fb + c * HW;
      acc_t sum = acc_t(0);
      for (int p = lane; p < npix; p += 32) {
        const int ia = p / nc, jb = p % nc;
        sum += sp.row_w[ia] * sp.col_w[jb] * static_cast<acc_t>(plane[sp.row_i[ia] * W + sp.col_i[jb]]);
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const acc_t rv = sum * inv_norm;
        rk[c] = rv;
        partial += wgt[c] * rv + wgt[C + c] * gk[c];
      }
    }
  }
  // block_sum's barriers also make this block's writes of r_k visible to all its threads.
  const acc_t logit = block_sum(partial, sp.scratch) + bias[0];
  const acc_t a = acc_t(1) / (acc_t(1) + exp(-logit));
  if (threadIdx.x == 0) a_out[k] = a;
  scalar_t* zk = z + k * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    zk[c] = static_cast<scalar_t>(a * rk[c] + (acc_t(1) - a) * gk[c]);  // rk: plain load, written above
  }
}

template <typename scalar_t, typename acc_t>
__global__ void roi_pool_fuse_bwd_kernel(const scalar_t* __restrict__ gz, const acc_t* __restrict__ rois,
                                         const acc_t* __restrict__ glob, const acc_t* __restrict__ wgt,
                                         const acc_t* __restrict__ r, const acc_t* __restrict__ a_in,
                                         acc_t* __restrict__ gfeat, acc_t* __restrict__ gglob,
                                         acc_t* __restrict__ gw, acc_t* __restrict__ gbias, acc_t scale,
                                         int C, int H, int W, int S, int sampling_ratio, bool aligned,
                                         bool channels_last, int chunk) {
  extern __shared__ unsigned char smem_raw[];
  const Support<acc_t> sp = carve<acc_t>(smem_raw, H, W);
  acc_t* dr_tile = reinterpret_cast<acc_t*>(smem_raw + support_smem_bytes(H, W, sizeof(acc_t)));  // [chunk]
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * chunk;
  const int ct = min(chunk, C - c0);
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, S, S, sampling_ratio, aligned);
  build_support(g, S, H, W, sp);
  const acc_t* rk = r + k * C;
  const scalar_t* gzk = gz + k * C;
  const acc_t* gk = glob + g.batch * C;
  const acc_t a = a_in[k];
  // dL/da needs every channel; each chunk's block recomputes it (3 reads of C values).
  acc_t da = acc_t(0);
  for (int c = threadIdx.x; c < C; c += blockDim.x) da += static_cast<acc_t>(gzk[c]) * (rk[c] - gk[c]);
  da = block_sum(da, sp.scratch);
  const acc_t ds = da * a * (acc_t(1) - a);
  const acc_t inv_norm = acc_t(1) / (g.count * static_cast<acc_t>(S * S));
  for (int t = threadIdx.x; t < ct; t += blockDim.x) {
    const int c = c0 + t;
    const acc_t gzc = static_cast<acc_t>(gzk[c]);
    atomicAdd(gglob + g.batch * C + c, (acc_t(1) - a) * gzc + ds * wgt[C + c]);
    atomicAdd(gw + c, ds * rk[c]);
    atomicAdd(gw + C + c, ds * gk[c]);
    dr_tile[t] = (a * gzc + ds * wgt[c]) * inv_norm;
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(gbias, ds);
  __syncthreads();
  const int nr = sp.counts[0], nc = sp.counts[1];
  const int npix = nr * nc;
  const int64_t HW = static_cast<int64_t>(H) * W;
  acc_t* fb = gfeat + g.batch * HW * C;
  // One atomicAdd per (support pixel, channel); consecutive threads take consecutive channels
  // (channels_last) or consecutive pixels of one plane (NCHW).
  for (int64_t t = threadIdx.x; t < static_cast<int64_t>(ct) * npix; t += blockDim.x) {
    const int cl = channels_last ? static_cast<int>(t % ct) : static_cast<int>(t / npix);
    const int p = channels_last ? static_cast<int>(t / ct) : static_cast<int>(t % npix);
    const int ia = p / nc, jb = p % nc;
    const int64_t pix = static_cast<int64_t>(sp.row_i[ia]) * W + sp.col_i[jb];
    const int64_t c = c0 + cl;
    const int64_t off = channels_last ? pix * C + c : c * HW + pix;
    atomicAdd(fb + off, dr_tile[cl] * sp.row_w[ia] * sp.col_w[jb]);
  }
}

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

int64_t align_chunk(int64_t C, int64_t NB, size_t acc_size) {
  const int64_t by_smem = kSmemLimit / (NB * static_cast<int64_t>(acc_size));
  TORCH_CHECK(by_smem >= 1, "roi_align (cuda): pooled size ", NB, " bins does not fit in shared memory");
  return std::max<int64_t>(1, std::min<int64_t>({64, C, by_smem}));
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
  const int64_t C = channels_last ? features.size(3) : features.size(1);
  const int64_t H = channels_last ? features.size(1) : features.size(2);
  const int64_t W = channels_last ? features.size(2) : features.size(3);
  const int64_t K = rois.size(0);
  for (int64_t v : {C, H, W, K, pooled_h * pooled_w, H * W}) check_int_range(v, "size");
  Tensor out = at::empty({K, C, pooled_h, pooled_w}, features.options());
  if (K == 0 || C == 0) return out;
  if (H == 0 || W == 0) return out.zero_();
  const int64_t NB = pooled_h * pooled_w;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunk = align_chunk(C, NB, sizeof(acc_t));
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + chunk - 1) / chunk));
    const size_t smem = static_cast<size_t>(chunk * NB) * sizeof(acc_t);
    roi_align_fwd_kernel<scalar_t, acc_t><<<grid, kThreads, smem, stream>>>(
        features.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
        static_cast<acc_t>(spatial_scale), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
        static_cast<int>(pooled_h), static_cast<int>(pooled_w), static_cast<int>(sampling_ratio), aligned,
        channels_last, static_cast<int>(chunk));
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
      const int64_t chunk = align_chunk(C, NB, sizeof(acc_t));
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + chunk - 1) / chunk));
      const size_t smem = static_cast<size_t>(chunk * NB) * sizeof(acc_t);
      roi_align_bwd_kernel<scalar_t, acc_t><<<grid, kThreads, smem, stream>>>(
          grad.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), gf.mutable_data_ptr<acc_t>(),
          static_cast<acc_t>(spatial_scale), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
          static_cast<int>(pooled_h), static_cast<int>(pooled_w), static_cast<int>(sampling_ratio), aligned,
          channels_last, static_cast<int>(chunk));
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
  const auto acc = acc_type(features.scalar_type());
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
  for (int64_t v : {C, H, W, K, H * W, S * S}) check_int_range(v, "size");
  const Tensor gl = global_in.to(acc).contiguous();
  const Tensor wt = weight_in.to(acc).contiguous();
  const Tensor bias = bias_in.to(acc).reshape({1}).contiguous();
  Tensor z = at::empty({K, C}, features.options());
  Tensor r = at::empty({K, C}, features.options().dtype(acc));
  Tensor a = at::empty({K}, features.options().dtype(acc));
  if (K == 0) return {z, r, a};  // an empty map (H or W = 0) runs the kernel: r = 0 there
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "roi_pool_fuse_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t smem = support_smem_bytes(H, W, static_cast<int64_t>(sizeof(acc_t)));
    TORCH_CHECK(smem <= kSmemLimit, "roi_pool_fuse_forward (cuda): feature map ", H, "x", W, " too large");
    const int threads = channels_last ? static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(64, (C + 31) / 32 * 32)))
                                      : kThreads;
    roi_pool_fuse_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(K), threads, static_cast<size_t>(smem), stream>>>(
        features.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(),
        wt.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(), z.mutable_data_ptr<scalar_t>(),
        r.mutable_data_ptr<acc_t>(), a.mutable_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale),
        static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), static_cast<int>(S),
        static_cast<int>(sampling_ratio), aligned, channels_last);
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
  const auto acc = acc_type(grad_z.scalar_type());
  const Tensor rois = prepare_rois(rois_in, acc, grad_z);
  const int64_t K = rois.size(0), C = global_in.size(1);
  TORCH_CHECK(grad_z.size(0) == K && grad_z.size(1) == C, "roi_pool_fuse_backward: grad_z must be [K, C] = [", K,
              ", ", C, "], got ", grad_z.sizes());
  TORCH_CHECK(r_in.dim() == 2 && r_in.size(0) == K && r_in.size(1) == C, "roi_pool_fuse_backward: r must be [K, C]");
  TORCH_CHECK(a_in.numel() == K, "roi_pool_fuse_backward: a must be [K]");
  TORCH_CHECK(weight_in.size(0) == 2 && weight_in.size(1) == C, "roi_pool_fuse_backward: gate_weight must be [2, C]");
  for (int64_t v : {B, C, H, W, K, H * W, S * S}) check_int_range(v, "size");
  const Tensor gl = global_in.to(acc).contiguous();
  const Tensor wt = weight_in.to(acc).contiguous();
  const Tensor r = r_in.to(acc).contiguous();
  const Tensor a = a_in.to(acc).reshape({K}).contiguous();
  const std::vector<int64_t> shape = channels_last ? std::vector<int64_t>{B, H, W, C}
                                                   : std::vector<int64_t>{B, C, H, W};
  Tensor gf = at::zeros(shape, grad_z.options().dtype(acc));
  Tensor g_global = at::zeros({B, C}, grad_z.options().dtype(acc));
  Tensor g_weight = at::zeros({2, C}, grad_z.options().dtype(acc));
  Tensor g_bias = at::zeros({1}, grad_z.options().dtype(acc));
  if (K > 0 && C > 0) {  // an empty map still has global / gate gradients
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_z.scalar_type(), "roi_pool_fuse_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t chunk = std::min<int64_t>(C, 256);
      const int64_t smem = support_smem_bytes(H, W, static_cast<int64_t>(sizeof(acc_t))) +
                           chunk * static_cast<int64_t>(sizeof(acc_t));  // + dr_tile
      TORCH_CHECK(smem <= kSmemLimit, "roi_pool_fuse_backward (cuda): feature map ", H, "x", W, " too large");
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + chunk - 1) / chunk));
      roi_pool_fuse_bwd_kernel<scalar_t, acc_t><<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
          grad_z.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(),
          wt.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
          gf.mutable_data_ptr<acc_t>(), g_global.mutable_data_ptr<acc_t>(), g_weight.mutable_data_ptr<acc_t>(),
          g_bias.mutable_data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale), static_cast<int>(C),
          static_cast<int>(H), static_cast<int>(W), static_cast<int>(S), static_cast<int>(sampling_ratio), aligned,
          channels_last, static_cast<int>(chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto out_t = grad_z_in.scalar_type();
  return {gf.to(out_t), g_global.to(global_in.scalar_type()), g_weight.to(weight_in.scalar_type()),
          g_bias.to(weight_in.scalar_type())};
}

}  // namespace
}  // namespace regionmed::roi_cuda

TORCH_LIBRARY_IMPL(regionmed_fast_C, CUDA, m) {
  m.impl("roi_align_forward", &regionmed::roi_cuda::roi_align_forward);
  m.impl("roi_align_backward", &regionmed::roi_cuda::roi_align_backward);
  m.impl("roi_pool_fuse_forward", &regionmed::roi_cuda::roi_pool_fuse_forward);
  m.impl("roi_pool_fuse_backward", &regionmed::roi_cuda::roi_pool_fuse_backward);
}
