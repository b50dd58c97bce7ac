// CPU emulation of the CUDA features the ROI kernels use (for scripts/roi_cuda_emulate/run.py):
// one std::thread per CUDA thread, std::barrier for __syncthreads and warp shuffles, std::atomic_ref for atomicAdd.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __restrict__
#define __launch_bounds__(n)
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
using std::ceil;
using std::exp;
using std::max;
using std::min;
inline std::barrier<>* g_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
inline std::vector<std::array<double, 32>> g_shfl;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __fdiv_rn(float a, float b) { return a / b; }
template <class T>
T __shfl_down_sync(unsigned, T v, int o) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  g_shfl[w][lane] = static_cast<double>(v);
  g_warp_bar[w]->arrive_and_wait();
  T r = lane + o < 32 ? static_cast<T>(g_shfl[w][lane + o]) : v;
  g_warp_bar[w]->arrive_and_wait();
  return r;
}
template <class T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
namespace regionmed::roi_cuda {
alignas(64) unsigned char smem_raw[1 << 17];
}
template <class F>
void emu_launch(dim3 grid, unsigned threads, size_t smem, F body) {
  if (smem > sizeof(regionmed::roi_cuda::smem_raw)) throw std::runtime_error("smem too large");
  if (threads % 32 != 0 || threads > 1024) throw std::runtime_error("bad block size");
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        g_bar = &bar;
        g_warp_bar.clear();
        for (unsigned w = 0; w < threads / 32; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        g_shfl.assign(threads / 32, {});
        std::memset(regionmed::roi_cuda::smem_raw, 0xCD, smem);  // poison: catch unwritten reads
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(x, y, z);
            body();
          });
        for (auto& th : ts) th.join();
      }
}
