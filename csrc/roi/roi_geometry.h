// RoIAlign sampling geometry, shared by the C++ CPU kernels (roi_cpu.cpp) and the CUDA kernels
// (roi_cuda_kernels.cuh): one definition of where torchvision's RoIAlign samples and how a
// sample splits over pixels. Plain inline functions on the host, __host__ __device__ under nvcc.
// (The Triton kernels, kernels/roi.py, and the PyTorch reference, ops/roi_reference.py, write the
// same rules in their own languages; docs/roi.md lists where they differ in rounding.)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define REGIONMED_HD __host__ __device__ __forceinline__
#else
#define REGIONMED_HD inline
#endif

namespace regionmed::roi {

#if !defined(__CUDACC__)
using std::ceil;
#endif

// Correctly rounded division: the CUDA build uses --use_fast_math, whose approximate float
// division could turn the ceil() of an exact quotient such as 14 / 7 into 3.
REGIONMED_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
REGIONMED_HD double div_rn(double a, double b) { return a / b; }

// Finite test by the exponent bits: immune to fast-math assumptions on either compiler.
REGIONMED_HD bool is_finite(float v) {
#if defined(__CUDA_ARCH__)
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
#else
  return std::isfinite(v);
#endif
}
REGIONMED_HD bool is_finite(double v) {
#if defined(__CUDA_ARCH__)
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) !=
         0x7ff0000000000000ull;
#else
  return std::isfinite(v);
#endif
}

// Samples per bin side are ints (as in torchvision); a larger adaptive grid is clamped so the
// conversion stays defined. 2^30 samples per side is far beyond any grid that finishes.
constexpr int kMaxGrid = 1 << 30;

// One roi's sampling geometry. `valid` is false when a coordinate is not finite or the batch
// index is not an integer in [0, batch): the kernels then write NaN for the roi and take no
// gradient from it (the unchecked-box result documented in docs/roi.md).
template <typename T>
struct Geom {
  int64_t batch;
  bool valid;
  T start_h, start_w, bin_h, bin_w;
  int grid_h, grid_w;
  T count;  // samples per bin, at least 1 (torchvision divides each bin's sum by it)
};

template <typename T>
REGIONMED_HD int grid_size(T roi_len, int pooled, int sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const T g = ceil(div_rn(roi_len, static_cast<T>(pooled)));
  if (!(g > T(0))) return 0;  // also NaN
  return g < static_cast<T>(kMaxGrid) ? static_cast<int>(g) : kMaxGrid;
}

// The image of roi [batch index, x1, y1, x2, y2], or -1 when the roi is invalid (a coordinate is
// not finite, or the index is not an integer in [0, batch)).
template <typename T>
REGIONMED_HD int64_t roi_batch(const T* roi, int64_t batch) {
  bool finite = true;
  for (int i = 0; i < 5; ++i) finite = finite && is_finite(roi[i]);
  const T b = roi[0];
  if (!(finite && b >= T(0) && b < static_cast<T>(batch))) return -1;
  const auto i = static_cast<int64_t>(b);
  return static_cast<T>(i) == b ? i : -1;
}

// torchvision's per-roi geometry for rois [batch index, x1, y1, x2, y2] in input coordinates.
template <typename T>
REGIONMED_HD Geom<T> make_geom(const T* roi, T scale, int pooled_h, int pooled_w, int sampling_ratio,
                               bool aligned, int64_t batch) {
  Geom<T> g;
  const int64_t b = roi_batch(roi, batch);
  g.valid = b >= 0;
  g.batch = g.valid ? b : 0;
  const T off = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * scale - off;
  g.start_h = roi[2] * scale - off;
  T roi_w = roi[3] * scale - off - g.start_w;
  T roi_h = roi[4] * scale - off - g.start_h;
  if (!aligned) {  // torchvision's legacy mode forces malformed rois to 1x1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = div_rn(roi_h, static_cast<T>(pooled_h));
  g.bin_w = div_rn(roi_w, static_cast<T>(pooled_w));
  g.grid_h = g.valid ? grid_size(roi_h, pooled_h, sampling_ratio) : 0;
  g.grid_w = g.valid ? grid_size(roi_w, pooled_w, sampling_ratio) : 0;
  const T n = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = n > T(1) ? n : T(1);
  return g;
}

// Coordinate of sample s of bin p along one axis, in torchvision's operation order so that
// float32 coordinates round identically.
template <typename T>
REGIONMED_HD T sample_pos(T start, T bin, int p, int s, int grid) {
  return start + static_cast<T>(p) * bin + div_rn(static_cast<T>(s + T(0.5)) * bin, static_cast<T>(grid));
}

// The two pixels a sample at `pos` touches along an axis of length `size`, and their weights
// (torchvision's bilinear_interpolate, one axis at a time); false when the sample lies more than
// one pixel outside the map, where it contributes 0.
template <typename T>
REGIONMED_HD bool axis_taps(T pos, int64_t size, int64_t& lo, int64_t& hi, T& w_lo, T& w_hi) {
  if (pos < T(-1) || pos > static_cast<T>(size)) return false;
  if (pos <= T(0)) pos = T(0);
  lo = static_cast<int64_t>(pos);
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

}  // namespace regionmed::roi
