// CPU kernels of the ROI ops (schemas in roi.cpp, raw-kernel contract in docs/roi.md; the
// sampling geometry is roi_geometry.h, shared with the CUDA kernels).
//
// RoIAlign output bins and the fused region mean r_k are weighted sums of feature pixels: each
// bin (or each whole roi, for roi_pool_fuse) is first reduced to a list of distinct
// (pixel, weight) "taps" by summing the bilinear weights of all its samples per pixel. The
// channel loops then touch each pixel once, forward and backward, and the fused op never forms
// the [K, C, S, S] tensor.
//
// Parallelism (ATen's OpenMP pool): forward over (roi, bin) or (roi, channel block); backward
// over channel blocks, each thread owning its slice of grad_features and visiting rois and taps
// in a fixed order, so the backward is bitwise deterministic whatever the thread count.
// Low-precision inputs accumulate in float32 (float64 for float64 inputs). A roi that
// roi_geometry.h calls invalid (non-finite coordinate, batch index not an integer in [0, B))
// gives NaN outputs and no gradient; nothing else about the boxes is checked here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "roi/roi_cpu.h"
#include "roi/roi_geometry.h"

namespace regionmed::roi_cpu {

namespace {
// Work (multiply-adds) below which a loop stays on the calling thread: waking a second thread
// costs more than it saves on small problems, and on a loaded machine a descheduled thread
// stalls every barrier. Settable (set_parallel_min_work) so tests can force the threaded paths
// on small shapes.
std::atomic<double> g_parallel_min_work{static_cast<double>(1 << 17)};
}  // namespace

double set_parallel_min_work(double work) { return g_parallel_min_work.exchange(work); }

namespace {

using at::Tensor;
using roi::axis_taps;
using roi::Geom;
using roi::sample_pos;

// Grain for at::parallel_for over `n` items that cost `work` multiply-adds in total: each chunk
// holds about half the threshold's work.
inline int64_t grain_for(int64_t n, double work) {
  const double min_work = g_parallel_min_work.load(std::memory_order_relaxed);
  if (n <= 1 || work < min_work) return std::max<int64_t>(n, 1);
  if (!(min_work > 0) || !(work > 0)) return 1;  // threshold 0 (tests): one item per chunk
  return std::clamp<int64_t>(static_cast<int64_t>(static_cast<double>(n) * (min_work / 2) / work), 1, n);
}

template <typename T>
Geom<T> geom_of(const T* roi, T scale, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned,
                int64_t batch) {
  return roi::make_geom<T>(roi, scale, static_cast<int>(ph), static_cast<int>(pw),
                           static_cast<int>(sampling_ratio), aligned, batch);
}

template <typename T>
size_t total_taps(const std::vector<std::vector<T>>& taps) {
  size_t n = 0;
  for (const auto& t : taps) n += t.size();
  return n;
}

template <typename T>
struct Tap {
  int32_t idx;  // y * W + x inside one image plane
  T w;
};

// Sums weights per pixel; emits taps in first-touch order (deterministic) and resets itself.
template <typename T>
struct Merger {
  std::vector<T> acc;
  std::vector<uint8_t> mark;
  std::vector<int32_t> touched;
  explicit Merger(int64_t n) : acc(n, T(0)), mark(n, 0) { touched.reserve(256); }
  inline void add(int64_t i, T w) {
    if (!mark[i]) {
      mark[i] = 1;
      touched.push_back(static_cast<int32_t>(i));
    }
    acc[i] += w;
  }
  void flush(std::vector<Tap<T>>& out) {
    for (int32_t i : touched) {
      if (acc[i] != T(0)) out.push_back({i, acc[i]});
      acc[i] = T(0);
      mark[i] = 0;
    }
    touched.clear();
  }
};

// One sample's bilinear weights (torchvision's bilinear_interpolate: the outside test and the
// clamping act per axis), scaled by `scale`.
template <typename T>
inline void add_sample(T y, T x, int64_t H, int64_t W, T scale, Merger<T>& m) {
  int64_t y_lo, y_hi, x_lo, x_hi;
  T wy_lo, wy_hi, wx_lo, wx_hi;
  if (!axis_taps(y, H, y_lo, y_hi, wy_lo, wy_hi) || !axis_taps(x, W, x_lo, x_hi, wx_lo, wx_hi)) return;
  m.add(y_lo * W + x_lo, wy_lo * wx_lo * scale);
  m.add(y_lo * W + x_hi, wy_lo * wx_hi * scale);
  m.add(y_hi * W + x_lo, wy_hi * wx_lo * scale);
  m.add(y_hi * W + x_hi, wy_hi * wx_hi * scale);
}

// Adds every sample of bin (ph, pw) with weight `scale` / (samples per bin).
template <typename T>
inline void add_bin(const Geom<T>& g, int64_t ph, int64_t pw, int64_t H, int64_t W, T scale,
                    Merger<T>& m) {
  const T w = scale / g.count;
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const T y = sample_pos(g.start_h, g.bin_h, static_cast<int>(ph), iy, g.grid_h);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      add_sample(y, sample_pos(g.start_w, g.bin_w, static_cast<int>(pw), ix, g.grid_w), H, W, w, m);
    }
  }
}

// Taps of every roi: per bin (offsets[k] has PH*PW+1 entries) or, with whole_roi, one list per
// roi holding the mean over the bins (offsets[k] = {0, n}).
template <typename T>
struct RoiTaps {
  std::vector<int64_t> batch;
  std::vector<uint8_t> valid;
  std::vector<std::vector<Tap<T>>> taps;
  std::vector<std::vector<int32_t>> offsets;
};

template <typename T>
RoiTaps<T> build_taps(const T* rois, int64_t K, T scale, int64_t PH, int64_t PW, int64_t sr,
                      bool aligned, int64_t B, int64_t H, int64_t W, bool whole_roi) {
  RoiTaps<T> out;
  out.batch.resize(K);
  out.valid.resize(K);
  out.taps.resize(K);
  out.offsets.resize(K);
  at::parallel_for(0, K, grain_for(K, 16.0 * K * PH * PW), [&](int64_t begin, int64_t end) {
    Merger<T> m(H * W);
    const T bin_scale = whole_roi ? T(1) / static_cast<T>(PH * PW) : T(1);
    for (int64_t k = begin; k < end; ++k) {
      const Geom<T> g = geom_of(rois + k * 5, scale, PH, PW, sr, aligned, B);
      out.batch[k] = g.batch;
      out.valid[k] = g.valid;
      auto& taps = out.taps[k];
      auto& offs = out.offsets[k];
      offs.push_back(0);
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          add_bin(g, ph, pw, H, W, bin_scale, m);
          if (!whole_roi) {
            m.flush(taps);
            offs.push_back(static_cast<int32_t>(taps.size()));
          }
        }
      }
      if (whole_roi) {
        m.flush(taps);
        offs.push_back(static_cast<int32_t>(taps.size()));
      }
    }
  });
  return out;
}

// Whole-roi weights in separable form, for NCHW maps: the samples of a roi form a Cartesian grid
// and torchvision's outside test and clamps act per axis, so the weight of pixel (y, x) in the
// mean over bins is ay[y] * ax[x]. Channel loops then run along contiguous rows.
template <typename T>
struct SepRoi {
  int64_t batch = 0, y0 = 0, y1 = 0, x0 = 0, x1 = 0;  // nonzero support [y0, y1) x [x0, x1)
  bool valid = true;
  std::vector<T> ay, ax;                                // dense, length H and W
};

template <typename T>
inline void add_axis(T v, int64_t n, std::vector<T>& acc) {
  int64_t lo, hi;
  T w_lo, w_hi;
  if (!axis_taps(v, n, lo, hi, w_lo, w_hi)) return;
  acc[lo] += w_lo;
  acc[hi] += w_hi;
}

template <typename T>
std::vector<SepRoi<T>> build_separable(const T* rois, int64_t K, T scale, int64_t S, int64_t sr,
                                       bool aligned, int64_t B, int64_t H, int64_t W) {
  std::vector<SepRoi<T>> out(K);
  at::parallel_for(0, K, grain_for(K, 16.0 * K * S), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Geom<T> g = geom_of(rois + k * 5, scale, S, S, sr, aligned, B);
      SepRoi<T>& s = out[k];
      s.batch = g.batch;
      s.valid = g.valid;
      s.ay.assign(H, T(0));
      s.ax.assign(W, T(0));
      for (int p = 0; p < S; ++p) {
        for (int i = 0; i < g.grid_h; ++i) add_axis(sample_pos(g.start_h, g.bin_h, p, i, g.grid_h), H, s.ay);
        for (int i = 0; i < g.grid_w; ++i) add_axis(sample_pos(g.start_w, g.bin_w, p, i, g.grid_w), W, s.ax);
      }
      const T norm = T(1) / (g.count * static_cast<T>(S * S));
      for (auto& v : s.ay) v *= norm;
      auto bounds = [](const std::vector<T>& v, int64_t& lo, int64_t& hi) {
        lo = 0;
        hi = static_cast<int64_t>(v.size());
        while (lo < hi && v[lo] == T(0)) ++lo;
        while (hi > lo && v[hi - 1] == T(0)) --hi;
      };
      bounds(s.ay, s.y0, s.y1);
      bounds(s.ax, s.x0, s.x1);
    }
  });
  return out;
}

// The fused op's per-roi weights, built once per call and shared by forward and backward:
// merged (pixel, weight) taps for NHWC (contiguous channels), separable row x column weights
// for NCHW (contiguous rows), and the image of each roi either way.
template <typename T>
struct FuseGeometry {
  RoiTaps<T> taps;
  std::vector<SepRoi<T>> sep;
  std::vector<int64_t> batch;
  std::vector<uint8_t> valid;
};

template <typename T>
FuseGeometry<T> build_fuse_geometry(const T* rois, int64_t K, T scale, int64_t S, int64_t sr,
                                    bool aligned, int64_t B, int64_t H, int64_t W,
                                    bool channels_last) {
  FuseGeometry<T> geo;
  if (channels_last) {
    geo.taps = build_taps(rois, K, scale, S, S, sr, aligned, B, H, W, true);
  } else {
    geo.sep = build_separable(rois, K, scale, S, sr, aligned, B, H, W);
  }
  geo.batch.resize(K);
  geo.valid.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    geo.batch[k] = channels_last ? geo.taps.batch[k] : geo.sep[k].batch;
    geo.valid[k] = channels_last ? geo.taps.valid[k] : geo.sep[k].valid;
  }
  return geo;
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_common(const Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "roi cpu kernels: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == dim, "roi cpu kernels: ", name, " must have ", dim, " dims, got ", x.sizes());
}

Tensor prepare_rois(const Tensor& rois, at::ScalarType acc) {
  check_common(rois, "rois", 2);
  TORCH_CHECK(rois.size(1) == 5, "roi cpu kernels: rois must be [K, 5], got ", rois.sizes());
  return rois.to(acc).contiguous();
}

constexpr int64_t kChannelBlock = 64;

// ---------------------------------------------------------------- roi_align

Tensor roi_align_forward(const Tensor& features_in, const Tensor& rois_in, double spatial_scale,
                         int64_t PH, int64_t PW, int64_t sampling_ratio, bool aligned,
                         bool channels_last) {
  check_common(features_in, "features", 4);
  TORCH_CHECK(PH > 0 && PW > 0, "roi_align_forward: pooled size must be positive");
  const Tensor features = features_in.contiguous();
  const Tensor rois = prepare_rois(rois_in, acc_type(features.scalar_type()));
  const int64_t B = features.size(0);
  const int64_t C = channels_last ? features.size(3) : features.size(1);
  const int64_t H = channels_last ? features.size(1) : features.size(2);
  const int64_t W = channels_last ? features.size(2) : features.size(3);
  const int64_t K = rois.size(0);
  Tensor out = at::empty({K, C, PH, PW}, features.options());
  if (K == 0 || C == 0) return out;
  TORCH_CHECK(H * W < INT32_MAX, "roi_align_forward: feature map too large");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "roi_align_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const T* r = rois.const_data_ptr<T>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t nb = PH * PW, HW = H * W;
    const T scale = static_cast<T>(spatial_scale);
    // One roi per step: its bins are accumulated first ([nb, C] for NHWC) so that the
    // [K, C, PH, PW] output is written contiguously, channel by channel.
    at::parallel_for(0, K, grain_for(K, 16.0 * K * nb * C), [&](int64_t begin, int64_t end) {
      Merger<T> m(HW);
      std::vector<Tap<T>> taps;
      std::vector<int32_t> offs;
      std::vector<T> acc(channels_last ? nb * C : 0);
      for (int64_t k = begin; k < end; ++k) {
        const Geom<T> g = geom_of(r + k * 5, scale, PH, PW, sampling_ratio, aligned, B);
        scalar_t* ok = o + k * C * nb;
        if (!g.valid) {
          std::fill(ok, ok + C * nb, static_cast<scalar_t>(std::numeric_limits<T>::quiet_NaN()));
          continue;
        }
        taps.clear();
        offs.assign(1, 0);
        for (int64_t bin = 0; bin < nb; ++bin) {
          add_bin(g, bin / PW, bin % PW, H, W, T(1), m);
          m.flush(taps);
          offs.push_back(static_cast<int32_t>(taps.size()));
        }
        const scalar_t* fb = f + g.batch * C * HW;
        if (channels_last) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t bin = 0; bin < nb; ++bin) {
            T* __restrict__ a = acc.data() + bin * C;
            for (int32_t j = offs[bin]; j < offs[bin + 1]; ++j) {
              const T w = taps[j].w;
              const scalar_t* __restrict__ p = fb + static_cast<int64_t>(taps[j].idx) * C;
              for (int64_t c = 0; c < C; ++c) a[c] += w * static_cast<T>(p[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t bin = 0; bin < nb; ++bin) ok[c * nb + bin] = static_cast<scalar_t>(acc[bin * C + c]);
          }
        } else {
          const Tap<T>* tp = taps.data();
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* p = fb + c * HW;
            for (int64_t bin = 0; bin < nb; ++bin) {
              T s = T(0);
              const int32_t j0 = offs[bin], j1 = offs[bin + 1];
_Pragma("omp simd reduction(+ : s)")
              for (int32_t j = j0; j < j1; ++j) s += tp[j].w * static_cast<T>(p[tp[j].idx]);
              ok[c * nb + bin] = static_cast<scalar_t>(s);
            }
          }
        }
      }
    });
  });
  return out;
}

// NHWC grad_features[b, pixel, :] += w * g(k, bin)[:] for every tap of every roi of image b.
// Threads own channel blocks and visit rois and taps in order: deterministic, no atomics.
template <typename T, typename GRow>
void scatter_taps_nhwc(const RoiTaps<T>& rt, int64_t K, int64_t nb, int64_t C, int64_t HW,
                       T* __restrict__ gf, GRow grow) {
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  const double work = static_cast<double>(total_taps(rt.taps)) * C;
  at::parallel_for(0, nblk, grain_for(nblk, work), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      for (int64_t k = 0; k < K; ++k) {
        T* gb = gf + rt.batch[k] * HW * C;
        const auto& taps = rt.taps[k];
        const auto& offs = rt.offsets[k];
        for (int64_t bin = 0; bin < nb; ++bin) {
          const T* __restrict__ g = grow(k, bin);
          for (int32_t j = offs[bin]; j < offs[bin + 1]; ++j) {
            const T w = taps[j].w;
            T* __restrict__ d = gb + static_cast<int64_t>(taps[j].idx) * C;
            for (int64_t c = c0; c < c1; ++c) d[c] += w * g[c];
          }
        }
      }
    }
  });
}

Tensor roi_align_backward(const Tensor& grad_in, const Tensor& rois_in, double spatial_scale,
                          int64_t PH, int64_t PW, int64_t B, int64_t C, int64_t H, int64_t W,
                          int64_t sampling_ratio, bool aligned, bool channels_last) {
  check_common(grad_in, "grad", 4);
  const auto acc = acc_type(grad_in.scalar_type());
  const Tensor rois = prepare_rois(rois_in, acc);
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad_in.size(0) == K && grad_in.size(1) == C && grad_in.size(2) == PH && grad_in.size(3) == PW,
              "roi_align_backward: grad must be [K, C, PH, PW] = [", K, ", ", C, ", ", PH, ", ", PW,
              "], got ", grad_in.sizes());
  const std::vector<int64_t> shape = channels_last ? std::vector<int64_t>{B, H, W, C}
                                                   : std::vector<int64_t>{B, C, H, W};
  Tensor gf = at::zeros(shape, grad_in.options().dtype(acc));
  if (K == 0 || C == 0) return gf.to(grad_in.scalar_type());
  TORCH_CHECK(H * W < INT32_MAX, "roi_align_backward: feature map too large");
  const int64_t nb = PH * PW, HW = H * W;
  AT_DISPATCH_FLOATING_TYPES(acc, "roi_align_backward", [&] {
    using T = scalar_t;
    const RoiTaps<T> rt = build_taps(rois.const_data_ptr<T>(), K, static_cast<T>(spatial_scale),
                                     PH, PW, sampling_ratio, aligned, B, H, W, false);
    if (channels_last) {
      // Rows of the upstream gradient per (roi, bin): [K, nb, C] in acc precision.
      const Tensor g = grad_in.to(acc).reshape({K, C, nb}).transpose(1, 2).contiguous();
      const T* gp = g.const_data_ptr<T>();
      scatter_taps_nhwc<T>(rt, K, nb, C, HW, gf.mutable_data_ptr<T>(),
                      [&](int64_t k, int64_t bin) { return gp + (k * nb + bin) * C; });
    } else {
      // NCHW visits one channel at a time: read [K, C, nb] directly, strided by nb per channel.
      const Tensor gc = grad_in.to(acc).contiguous();
      const T* gcp = gc.const_data_ptr<T>();
      const double work = static_cast<double>(total_taps(rt.taps)) * C;
      at::parallel_for(0, C, grain_for(C, work), [&](int64_t begin, int64_t end) {
        T* gfp = gf.mutable_data_ptr<T>();
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t k = 0; k < K; ++k) {
            T* __restrict__ d = gfp + (rt.batch[k] * C + c) * HW;
            const T* gk = gcp + (k * C + c) * nb;
            const auto& taps = rt.taps[k];
            const auto& offs = rt.offsets[k];
            for (int64_t bin = 0; bin < nb; ++bin) {
              const T gv = gk[bin];
              if (gv == T(0)) continue;
              for (int32_t j = offs[bin]; j < offs[bin + 1]; ++j) d[taps[j].idx] += taps[j].w * gv;
            }
          }
        }
      });
    }
  });
  return gf.scalar_type() == grad_in.scalar_type() ? gf : gf.to(grad_in.scalar_type());
}

// ---------------------------------------------------------------- roi_pool_fuse

std::tuple<Tensor, Tensor, Tensor> roi_pool_fuse_forward(
    const Tensor& features_in, const Tensor& rois_in, const Tensor& global_in,
    const Tensor& weight_in, const Tensor& bias_in, double spatial_scale, int64_t S,
    int64_t sampling_ratio, bool aligned, bool channels_last) {
  check_common(features_in, "features", 4);
  check_common(global_in, "global_feat", 2);
  check_common(weight_in, "gate_weight", 2);
  TORCH_CHECK(S > 0, "roi_pool_fuse_forward: output_size must be positive");
  const Tensor features = features_in.contiguous();
  const auto acc = acc_type(features.scalar_type());
  const Tensor rois = prepare_rois(rois_in, acc);
  const int64_t B = features.size(0);
  const int64_t C = channels_last ? features.size(3) : features.size(1);
  const int64_t H = channels_last ? features.size(1) : features.size(2);
  const int64_t W = channels_last ? features.size(2) : features.size(3);
  const int64_t K = rois.size(0);
  TORCH_CHECK(global_in.size(0) == B && global_in.size(1) == C,
              "roi_pool_fuse_forward: global_feat must be [B, C] = [", B, ", ", C, "], got ", global_in.sizes());
  TORCH_CHECK(weight_in.size(0) == 2 && weight_in.size(1) == C,
              "roi_pool_fuse_forward: gate_weight must be [2, ", C, "], got ", weight_in.sizes());
  TORCH_CHECK(bias_in.numel() == 1, "roi_pool_fuse_forward: gate_bias must have one element");
  TORCH_CHECK(H * W < INT32_MAX, "roi_pool_fuse_forward: feature map too large");
  const Tensor gl = global_in.to(acc).contiguous();
  const Tensor wt = weight_in.to(acc).contiguous();
  const Tensor bias = bias_in.to(acc).reshape({1}).contiguous();
  Tensor r = at::zeros({K, C}, features.options().dtype(acc));
  Tensor a = at::empty({K}, features.options().dtype(acc));
  Tensor z = at::empty({K, C}, features.options());
  if (K == 0) return {z, r, a};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "roi_pool_fuse_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const T* rois_p = rois.const_data_ptr<T>();
    const T sc = static_cast<T>(spatial_scale);
    const FuseGeometry<T> geo =
        build_fuse_geometry(rois_p, K, sc, S, sampling_ratio, aligned, B, H, W, channels_last);
    const RoiTaps<T>& rt = geo.taps;
    const std::vector<SepRoi<T>>& sep = geo.sep;
    const std::vector<int64_t>& batch_of = geo.batch;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    T* rp = r.mutable_data_ptr<T>();
    const int64_t HW = H * W;
    const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
    double support = 0;  // pixels read per channel, over all rois
    if (channels_last) {
      support = static_cast<double>(total_taps(rt.taps));
    } else {
      for (const auto& e : sep) support += static_cast<double>((e.y1 - e.y0) * (e.x1 - e.x0));
    }
    at::parallel_for(0, K * nblk, grain_for(K * nblk, support * C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = i / nblk, c0 = (i % nblk) * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
        const scalar_t* fb = f + batch_of[k] * C * HW;
        T* __restrict__ rk = rp + k * C;
        if (channels_last) {
          for (const auto& t : rt.taps[k]) {
            const scalar_t* __restrict__ p = fb + static_cast<int64_t>(t.idx) * C;
            for (int64_t c = c0; c < c1; ++c) rk[c] += t.w * static_cast<T>(p[c]);
          }
        } else {
          const SepRoi<T>& sr_ = sep[k];
          const T* __restrict__ ax = sr_.ax.data();
          for (int64_t c = c0; c < c1; ++c) {
            const scalar_t* p = fb + c * HW;
            T s = T(0);
            for (int64_t y = sr_.y0; y < sr_.y1; ++y) {
              const scalar_t* __restrict__ row = p + y * W;
              T t = T(0);
_Pragma("omp simd reduction(+ : t)")
              for (int64_t x = sr_.x0; x < sr_.x1; ++x) t += ax[x] * static_cast<T>(row[x]);
              s += sr_.ay[y] * t;
            }
            rk[c] = s;
          }
        }
      }
    });
    const T* gp = gl.const_data_ptr<T>();
    const T* w0 = wt.const_data_ptr<T>();
    const T* w1 = w0 + C;
    const T b0 = bias.const_data_ptr<T>()[0];
    T* ap = a.mutable_data_ptr<T>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, K, grain_for(K, 4.0 * K * C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        T* rk = rp + k * C;
        if (!geo.valid[k]) {
          constexpr T nan = std::numeric_limits<T>::quiet_NaN();
          std::fill(rk, rk + C, nan);
          ap[k] = nan;
          std::fill(zp + k * C, zp + (k + 1) * C, static_cast<scalar_t>(nan));
          continue;
        }
        const T* gk = gp + batch_of[k] * C;
        T s = b0;
_Pragma("omp simd reduction(+ : s)")
        for (int64_t c = 0; c < C; ++c) s += w0[c] * rk[c] + w1[c] * gk[c];
        const T ak = T(1) / (T(1) + std::exp(-s));
        ap[k] = ak;
        for (int64_t c = 0; c < C; ++c) zp[k * C + c] = static_cast<scalar_t>(ak * rk[c] + (T(1) - ak) * gk[c]);
      }
    });
  });
  return {z, r, a};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> roi_pool_fuse_backward(
    const Tensor& grad_z_in, const Tensor& rois_in, const Tensor& global_in,
    const Tensor& weight_in, const Tensor& r_in, const Tensor& a_in, double spatial_scale,
    int64_t S, int64_t sampling_ratio, bool aligned, bool channels_last, int64_t B, int64_t H,
    int64_t W) {
  check_common(grad_z_in, "grad_z", 2);
  check_common(global_in, "global_feat", 2);
  const auto acc = acc_type(grad_z_in.scalar_type());
  const Tensor rois = prepare_rois(rois_in, acc);
  const int64_t K = rois.size(0), C = global_in.size(1);
  TORCH_CHECK(grad_z_in.size(0) == K && grad_z_in.size(1) == C,
              "roi_pool_fuse_backward: grad_z must be [K, C] = [", K, ", ", C, "], got ", grad_z_in.sizes());
  TORCH_CHECK(global_in.size(0) == B, "roi_pool_fuse_backward: global_feat must be [B, C] with B = ", B);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == 2 && weight_in.size(1) == C,
              "roi_pool_fuse_backward: gate_weight must be [2, C]");
  TORCH_CHECK(r_in.dim() == 2 && r_in.size(0) == K && r_in.size(1) == C, "roi_pool_fuse_backward: r must be [K, C]");
  TORCH_CHECK(a_in.numel() == K, "roi_pool_fuse_backward: a must be [K]");
  TORCH_CHECK(H * W < INT32_MAX, "roi_pool_fuse_backward: feature map too large");
  const Tensor gz = grad_z_in.to(acc).contiguous();
  const Tensor gl = global_in.to(acc).contiguous();
  const Tensor wt = weight_in.to(acc).contiguous();
  const Tensor r = r_in.to(acc).contiguous();
  const Tensor a = a_in.to(acc).reshape({K}).contiguous();
  const std::vector<int64_t> shape = channels_last ? std::vector<int64_t>{B, H, W, C}
                                                   : std::vector<int64_t>{B, C, H, W};
  Tensor gf = at::zeros(shape, gz.options());
  Tensor g_global = at::zeros({B, C}, gz.options());
  Tensor g_weight = at::zeros({2, C}, gz.options());
  Tensor g_bias = at::zeros({1}, gz.options());
  if (K > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "roi_pool_fuse_backward", [&] {
      using T = scalar_t;
      const T* rois_p = rois.const_data_ptr<T>();
      const T sc = static_cast<T>(spatial_scale);
      const FuseGeometry<T> geo =
          build_fuse_geometry(rois_p, K, sc, S, sampling_ratio, aligned, B, H, W, channels_last);
      const RoiTaps<T>& rt = geo.taps;
      const std::vector<SepRoi<T>>& sep = geo.sep;
      const std::vector<int64_t>& batch_of = geo.batch;
      const T* gzp = gz.const_data_ptr<T>();
      const T* gp = gl.const_data_ptr<T>();
      const T* w0 = wt.const_data_ptr<T>();
      const T* w1 = w0 + C;
      const T* rp = r.const_data_ptr<T>();
      const T* ap = a.const_data_ptr<T>();
      // ds_k = dL/d(gate logit); grad_r = a * gz + ds * w0 (the gradient reaching the taps).
      std::vector<T> ds(K);
      Tensor grad_r = at::empty({K, C}, gz.options());
      T* grp = grad_r.mutable_data_ptr<T>();
      at::parallel_for(0, K, grain_for(K, 4.0 * K * C), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          if (!geo.valid[k]) {  // NaN r and a, no gradient: zero rows leave every sum unchanged
            ds[k] = T(0);
            std::fill(grp + k * C, grp + (k + 1) * C, T(0));
            continue;
          }
          const T* gzk = gzp + k * C;
          const T* rk = rp + k * C;
          const T* gk = gp + batch_of[k] * C;
          T da = T(0);
_Pragma("omp simd reduction(+ : da)")
          for (int64_t c = 0; c < C; ++c) da += gzk[c] * (rk[c] - gk[c]);
          const T ak = ap[k];
          const T d = da * ak * (T(1) - ak);
          ds[k] = d;
          for (int64_t c = 0; c < C; ++c) grp[k * C + c] = ak * gzk[c] + d * w0[c];
        }
      });
      T* ggp = g_global.mutable_data_ptr<T>();
      T* gwp = g_weight.mutable_data_ptr<T>();
      at::parallel_for(0, C, std::max<int64_t>(64, grain_for(C, 3.0 * K * C)), [&](int64_t begin, int64_t end) {
        for (int64_t k = 0; k < K; ++k) {  // rois in order: the scatter-add is deterministic
          if (!geo.valid[k]) continue;
          const T ak = ap[k], d = ds[k];
          const T* gzk = gzp + k * C;
          const T* rk = rp + k * C;
          const T* gk = gp + batch_of[k] * C;
          T* ggk = ggp + batch_of[k] * C;
          for (int64_t c = begin; c < end; ++c) {
            ggk[c] += (T(1) - ak) * gzk[c] + d * w1[c];
            gwp[c] += d * rk[c];
            gwp[C + c] += d * gk[c];
          }
        }
      });
      T db = T(0);
      for (int64_t k = 0; k < K; ++k) db += ds[k];
      g_bias.mutable_data_ptr<T>()[0] = db;
      if (channels_last) {
        scatter_taps_nhwc<T>(rt, K, 1, C, H * W, gf.mutable_data_ptr<T>(),
                        [&](int64_t k, int64_t) { return grp + k * C; });
      } else {
        T* gfp = gf.mutable_data_ptr<T>();
        const int64_t HW = H * W;
        double support = 0;
        for (const auto& e : sep) support += static_cast<double>((e.y1 - e.y0) * (e.x1 - e.x0));
        at::parallel_for(0, C, grain_for(C, support * C), [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            for (int64_t k = 0; k < K; ++k) {  // rois in order: deterministic
              const T g = grp[k * C + c];
              if (g == T(0)) continue;
              const SepRoi<T>& sr_ = sep[k];
              const T* __restrict__ ax = sr_.ax.data();
              T* d = gfp + (sr_.batch * C + c) * HW;
              for (int64_t y = sr_.y0; y < sr_.y1; ++y) {
                const T gy = g * sr_.ay[y];
                T* __restrict__ row = d + y * W;
                for (int64_t x = sr_.x0; x < sr_.x1; ++x) row[x] += gy * ax[x];
              }
            }
          }
        });
      }
    });
  }
  const auto out_t = grad_z_in.scalar_type();
  return {gf.to(out_t), g_global.to(global_in.scalar_type()), g_weight.to(weight_in.scalar_type()),
          g_bias.to(weight_in.scalar_type())};
}

}  // namespace
}  // namespace regionmed::roi_cpu

TORCH_LIBRARY_IMPL(regionmed_fast_C, CPU, m) {
  m.impl("roi_align_forward", &regionmed::roi_cpu::roi_align_forward);
  m.impl("roi_align_backward", &regionmed::roi_cpu::roi_align_backward);
  m.impl("roi_pool_fuse_forward", &regionmed::roi_cpu::roi_pool_fuse_forward);
  m.impl("roi_pool_fuse_backward", &regionmed::roi_cpu::roi_pool_fuse_backward);
}
