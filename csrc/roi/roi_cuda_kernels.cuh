// Device code of the ROI CUDA kernels (host wrappers and registration: roi_cuda.cu). Kept free
// of ATen so that it depends only on CUDA; see roi_cuda.cu for the design notes. The sampling
// geometry is roi_geometry.h, shared with the CPU kernels. A roi that it calls invalid gets NaN
// outputs and contributes no gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "roi_geometry.h"

namespace regionmed::roi_cuda {

using roi::axis_taps;
using roi::Geom;
using roi::make_geom;
using roi::roi_batch;
using roi::sample_pos;

constexpr int kThreads = 256;
constexpr int64_t kSmemLimit = 48 * 1024;

// A small per-image or per-channel input (global_feat, gate_weight, gate_bias) read in its own
// dtype: the features' dtype or the accumulation dtype, so that the host casts nothing in the
// common cases (other dtypes are cast to the accumulation dtype by the host).
struct Param {
  const void* ptr;
  bool low;  // true: scalar_t (the features' dtype), false: acc_t
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t ld(const Param& p, int64_t i) {
  return p.low ? static_cast<acc_t>(static_cast<const scalar_t*>(p.ptr)[i])
               : static_cast<const acc_t*>(p.ptr)[i];
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
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
                                     scalar_t* __restrict__ out, acc_t scale, int B, int C, int H, int W,
                                     int PH, int PW, int sampling_ratio, bool aligned,
                                     bool channels_last, int chunk) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * chunk;
  const int ct = min(chunk, C - c0);
  const int NB = PH * PW;
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, PH, PW, sampling_ratio, aligned, B);
  if (!g.valid) {  // uniform over the block: no barrier is skipped by part of it
    scalar_t* ob = out + (k * C + c0) * NB;
    for (int t = threadIdx.x; t < ct * NB; t += blockDim.x) ob[t] = static_cast<scalar_t>(quiet_nan<acc_t>());
    return;
  }
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
      int64_t ylo, yhi;
      acc_t wylo, wyhi;
      if (!axis_taps<acc_t>(sample_pos(g.start_h, g.bin_h, ph, iy, g.grid_h), H, ylo, yhi, wylo, wyhi)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        int64_t xlo, xhi;
        acc_t wxlo, wxhi;
        if (!axis_taps<acc_t>(sample_pos(g.start_w, g.bin_w, pw, ix, g.grid_w), W, xlo, xhi, wxlo, wxhi)) continue;
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
                                     acc_t* __restrict__ gfeat, acc_t scale, int B, int C, int H, int W,
                                     int PH, int PW, int sampling_ratio, bool aligned,
                                     bool channels_last, int chunk) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * chunk;
  const int ct = min(chunk, C - c0);
  const int NB = PH * PW;
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, PH, PW, sampling_ratio, aligned, B);
  if (!g.valid) return;  // uniform over the block
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
      int64_t ylo, yhi;
      acc_t wylo, wyhi;
      if (!axis_taps<acc_t>(sample_pos(g.start_h, g.bin_h, ph, iy, g.grid_h), H, ylo, yhi, wylo, wyhi)) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        int64_t xlo, xhi;
        acc_t wxlo, wxhi;
        if (!axis_taps<acc_t>(sample_pos(g.start_w, g.bin_w, pw, ix, g.grid_w), W, xlo, xhi, wxlo, wxhi)) continue;
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
        int64_t lo, hi;
        acc_t wlo, whi;
        if (!axis_taps<acc_t>(sample_pos(start, bin, p, q, grid), size, lo, hi, wlo, whi)) continue;
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

// Channels per block of the fused kernels: 64 channels x 4 pixel groups for channels_last (a warp
// reads 32 consecutive channels of one pixel), 8 warps x 8 channels for NCHW. Small chunks give
// K * C / 64 blocks, enough to fill the GPU even when there are few rois.
constexpr int kFuseChunk = 64;

// Fused forward, phase 1: r_k for one channel chunk and that chunk's part of the gate logit
// (<w0, r_k> + <w1, g_k>), written to part[k, chunk]. Grid (K, ceil(C / kFuseChunk)).
template <typename scalar_t, typename acc_t>
__global__ void roi_pool_fuse_r_kernel(const scalar_t* __restrict__ feat, const acc_t* __restrict__ rois,
                                       Param glob, Param wgt, acc_t* __restrict__ r, acc_t* __restrict__ part,
                                       acc_t scale, int B, int C, int H, int W, int S, int sampling_ratio,
                                       bool aligned, bool channels_last) {
  extern __shared__ unsigned char smem_raw[];
  const Support<acc_t> sp = carve<acc_t>(smem_raw, H, W);
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw + support_smem_bytes(H, W, sizeof(acc_t)));  // [blockDim]
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * kFuseChunk;
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, S, S, sampling_ratio, aligned, B);
  build_support(g, S, H, W, sp);
  const int nr = sp.counts[0], nc = sp.counts[1], npix = nr * nc;
  // An invalid roi has no support (r sums to 0); the NaN norm makes r, its logit part, and so the
  // gate and z NaN.
  const acc_t inv_norm = g.valid ? acc_t(1) / (g.count * static_cast<acc_t>(S * S)) : quiet_nan<acc_t>();
  const int64_t HW = static_cast<int64_t>(H) * W;
  const scalar_t* fb = feat + g.batch * HW * C;
  const int64_t gk = g.batch * C;
  acc_t* rk = r + k * C;
  acc_t contrib = acc_t(0);
  if (channels_last) {
    const int groups = blockDim.x / kFuseChunk;
    const int cl = threadIdx.x % kFuseChunk, grp = threadIdx.x / kFuseChunk;
    const int64_t c = c0 + cl;
    acc_t sum = acc_t(0);
    if (c < C && grp < groups) {
      for (int p = grp; p < npix; p += groups) {
        const int ia = p / nc, jb = p % nc;
        const int64_t pix = static_cast<int64_t>(sp.row_i[ia]) * W + sp.col_i[jb];
        sum += sp.row_w[ia] * sp.col_w[jb] * static_cast<acc_t>(fb[pix * C + c]);
      }
    }
    red[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x < kFuseChunk && c < C) {
      acc_t total = acc_t(0);
      for (int q = 0; q < groups; ++q) total += red[q * kFuseChunk + threadIdx.x];  // fixed order
      const acc_t rv = total * inv_norm;
      rk[c] = rv;
      contrib = ld<scalar_t, acc_t>(wgt, c) * rv + ld<scalar_t, acc_t>(wgt, C + c) * ld<scalar_t, acc_t>(glob, gk + c);
    }
  } else {
    // Warp per channel: lanes walk the support pixels of one channel plane.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int cl = warp; cl < kFuseChunk && c0 + cl < C; cl += nwarps) {
      const int64_t c = c0 + cl;
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
        contrib += ld<scalar_t, acc_t>(wgt, c) * rv +
                   ld<scalar_t, acc_t>(wgt, C + c) * ld<scalar_t, acc_t>(glob, gk + c);
      }
    }
  }
  const acc_t total = block_sum(contrib, sp.scratch);
  if (threadIdx.x == 0) part[k * gridDim.y + blockIdx.y] = total;
}

// Fused forward, phase 2: the gate a_k = sigmoid(bias + sum of the logit parts) and
// z_k = a_k r_k + (1 - a_k) g_k. Grid (K).
template <typename scalar_t, typename acc_t>
__global__ void roi_pool_fuse_gate_kernel(const acc_t* __restrict__ rois, Param glob, Param bias,
                                          const acc_t* __restrict__ r, const acc_t* __restrict__ part,
                                          scalar_t* __restrict__ z, acc_t* __restrict__ a_out, int B, int C,
                                          int nparts) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);  // 33 values (dynamic: see fuse_small_smem)
  const int64_t k = blockIdx.x;
  const int64_t bk = roi_batch(rois + k * 5, static_cast<int64_t>(B));
  const int64_t b = bk >= 0 ? bk : 0;  // an invalid roi's parts are NaN: z is NaN whatever b
  acc_t s = acc_t(0);
  for (int j = threadIdx.x; j < nparts; j += blockDim.x) s += part[k * nparts + j];
  const acc_t logit = block_sum(s, scratch) + ld<scalar_t, acc_t>(bias, 0);
  const acc_t a = acc_t(1) / (acc_t(1) + exp(-logit));
  if (threadIdx.x == 0) a_out[k] = a;
  const acc_t* rk = r + k * C;
  scalar_t* zk = z + k * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    zk[c] = static_cast<scalar_t>(a * rk[c] + (acc_t(1) - a) * ld<scalar_t, acc_t>(glob, b * C + c));
  }
}

// Buffers the fused backward accumulates into with atomics (grad_features and the global / gate
// gradients): zeroed by phase 1, so no memset launches precede it.
template <typename acc_t>
struct ZeroList {
  acc_t* ptr[4];
  int64_t n[4];
};

// Fused backward, phase 1: zeroes the accumulation buffers (grid-stride over all blocks) and
// computes ds_k = dL/d(gate logit) for the rois of the first K blocks. Grid (max(K, zeroing blocks)).
template <typename scalar_t, typename acc_t>
__global__ void roi_pool_fuse_ds_kernel(const scalar_t* __restrict__ gz, const acc_t* __restrict__ rois,
                                        Param glob, const acc_t* __restrict__ r, const acc_t* __restrict__ a_in,
                                        acc_t* __restrict__ ds_out, ZeroList<acc_t> zero, int K, int B, int C) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);  // 33 values (dynamic: see fuse_small_smem)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int j = 0; j < 4; ++j) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < zero.n[j]; i += stride) {
      zero.ptr[j][i] = acc_t(0);
    }
  }
  const int64_t k = blockIdx.x;
  if (k >= K) return;  // a zeroing-only block (uniform over the block)
  const int64_t b = roi_batch(rois + k * 5, static_cast<int64_t>(B));
  if (b < 0) {  // invalid roi: no gradient
    if (threadIdx.x == 0) ds_out[k] = acc_t(0);
    return;
  }
  const scalar_t* gzk = gz + k * C;
  const acc_t* rk = r + k * C;
  const int64_t gk = b * C;
  acc_t da = acc_t(0);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    da += static_cast<acc_t>(gzk[c]) * (rk[c] - ld<scalar_t, acc_t>(glob, gk + c));
  }
  da = block_sum(da, scratch);
  const acc_t a = a_in[k];
  if (threadIdx.x == 0) ds_out[k] = da * a * (acc_t(1) - a);
}

// Fused backward, phase 2, per (roi, 64-channel chunk): the chunk's share of the global / gate
// gradients (atomics: rois of one image share global_feat[b]), then the scatter of
// dr = (a gz + ds w0) / (count S^2) through the roi's separable weights, one atomicAdd per
// (support pixel, channel). Grid (K, ceil(C / kFuseChunk)).
template <typename scalar_t, typename acc_t>
__global__ void roi_pool_fuse_scatter_kernel(const scalar_t* __restrict__ gz, const acc_t* __restrict__ rois,
                                             Param glob, Param wgt, const acc_t* __restrict__ r,
                                             const acc_t* __restrict__ a_in, const acc_t* __restrict__ ds_in,
                                             acc_t* __restrict__ gfeat, acc_t* __restrict__ gglob,
                                             acc_t* __restrict__ gw, acc_t* __restrict__ gbias, acc_t scale, int B,
                                             int C, int H, int W, int S, int sampling_ratio, bool aligned,
                                             bool channels_last) {
  extern __shared__ unsigned char smem_raw[];
  const Support<acc_t> sp = carve<acc_t>(smem_raw, H, W);
  acc_t* dr_tile = reinterpret_cast<acc_t*>(smem_raw + support_smem_bytes(H, W, sizeof(acc_t)));  // [chunk]
  const int64_t k = blockIdx.x;
  const int c0 = blockIdx.y * kFuseChunk;
  const int ct = min(kFuseChunk, C - c0);
  const Geom<acc_t> g = make_geom<acc_t>(rois + k * 5, scale, S, S, sampling_ratio, aligned, B);
  if (!g.valid) return;  // no gradient from an invalid roi (uniform over the block)
  const acc_t a = a_in[k], ds = ds_in[k];
  const int64_t gk = g.batch * C;
  if (blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(gbias, ds);
  const acc_t inv_norm = acc_t(1) / (g.count * static_cast<acc_t>(S * S));
  for (int t = threadIdx.x; t < ct; t += blockDim.x) {
    const int64_t c = c0 + t;
    const acc_t gzc = static_cast<acc_t>(gz[k * C + c]);
    atomicAdd(gglob + gk + c, (acc_t(1) - a) * gzc + ds * ld<scalar_t, acc_t>(wgt, C + c));
    atomicAdd(gw + c, ds * r[k * C + c]);
    atomicAdd(gw + C + c, ds * ld<scalar_t, acc_t>(glob, gk + c));
    dr_tile[t] = (a * gzc + ds * ld<scalar_t, acc_t>(wgt, c)) * inv_norm;
  }
  build_support(g, S, H, W, sp);  // its barriers also publish dr_tile to the whole block
  const int nr = sp.counts[0], nc = sp.counts[1];
  const int npix = nr * nc;
  const int64_t HW = static_cast<int64_t>(H) * W;
  acc_t* fb = gfeat + g.batch * HW * C;
  // Consecutive threads take consecutive channels (channels_last) or consecutive pixels of one
  // plane (NCHW).
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

// ------------------------------------------------------------------------------ launch geometry
// (shared by the host wrappers and the CPU emulation harness)

// Channels per roi_align block: its [chunk, bins] tile must fit in shared memory; 0 if even
// one channel does not fit.
inline int64_t align_chunk(int64_t C, int64_t NB, int64_t acc_size) {
  const int64_t by_smem = kSmemLimit / (NB * acc_size);
  if (by_smem < 1) return 0;
  int64_t c = C < 64 ? C : 64;
  c = c < by_smem ? c : by_smem;
  return c > 1 ? c : 1;
}

// Shared memory of the fused kernels: the roi's Support plus a per-thread (phase-1 forward) or
// per-channel (backward scatter) tile.
inline int64_t fuse_smem(int64_t H, int64_t W, int64_t acc_size) {
  return support_smem_bytes(H, W, acc_size) + static_cast<int64_t>(kThreads) * acc_size;
}

// Shared memory of the per-roi gate / ds kernels: the block reduction's scratch.
inline int64_t fuse_small_smem(int64_t acc_size) { return 33 * acc_size; }

// Blocks of the fused backward's phase 1: one per roi, and enough for its grid-stride zeroing of
// `zero_elems` values to run at memset speed (at most 2048 blocks for that).
inline int64_t ds_blocks(int64_t K, int64_t zero_elems) {
  const int64_t for_zeroing = std::min<int64_t>((zero_elems + kThreads * 8 - 1) / (kThreads * 8), 2048);
  return std::max<int64_t>(K, for_zeroing);
}

}  // namespace regionmed::roi_cuda
