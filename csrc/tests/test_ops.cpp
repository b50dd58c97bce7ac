// C++-side test of the CMake-built library: loads libregionmed_fast_C.so, finds the ops through
// the dispatcher (as a C++ user would) and checks them against each other and ATen math:
//   * NHWC and NCHW inputs give the same RoIAlign result;
//   * roi_pool_fuse's r equals the mean over bins of roi_align, and z, a follow the gate formula;
//   * a constant feature map pools to that constant.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const char* what, double tol = 1e-5) {
  const double err = (a - b).abs().max().item<double>();
  if (!(err <= tol)) {
    std::printf("FAIL %s: max abs err %.3e > %.1e\n", what, err, tol);
    ++failures;
  } else {
    std::printf("ok   %s (max abs err %.2e)\n", what, err);
  }
}

}  // namespace

int main() {
  if (dlopen(REGIONMED_LIB, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::printf("FAIL cannot load %s: %s\n", REGIONMED_LIB, dlerror());
    return 1;
  }
  auto align = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("regionmed_fast_C::roi_align_forward", "")
                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t,
                                     int64_t, int64_t, bool, bool)>();
  auto fuse = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("regionmed_fast_C::roi_pool_fuse_forward", "")
                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, double, int64_t, int64_t, bool, bool)>();

  at::manual_seed(0);
  const int64_t B = 2, C = 5, H = 9, W = 11, S = 3;
  auto feats = at::randn({B, C, H, W});
  auto rois = at::tensor({0.f, 1.2f, 0.5f, 7.3f, 6.1f, 1.f, 0.f, 0.f, 10.f, 8.f, 1.f, 3.f, 3.f, 3.f,
                          3.f, 0.f, -4.f, -2.f, 5.f, 20.f})
                  .view({4, 5});
  for (bool aligned : {false, true}) {
    auto nchw = align.call(feats, rois, 0.75, S, S, 2, aligned, false);
    auto nhwc = align.call(feats.permute({0, 2, 3, 1}).contiguous(), rois, 0.75, S, S, 2, aligned, true);
    expect_close(nhwc, nchw, aligned ? "roi_align nhwc == nchw (aligned)" : "roi_align nhwc == nchw");

    auto global = at::randn({B, C});
    auto gw = at::randn({2, C}) * 0.5;
    auto gb = at::randn({1});
    auto [z, r, a] = fuse.call(feats, rois, global, gw, gb, 0.75, S, 2, aligned, false);
    expect_close(r, nchw.mean({2, 3}), "roi_pool_fuse r == mean of roi_align bins");
    auto g = global.index_select(0, rois.select(1, 0).to(at::kLong));
    auto a_ref = at::sigmoid((r * gw[0]).sum(1) + (g * gw[1]).sum(1) + gb);
    expect_close(a, a_ref, "roi_pool_fuse gate a");
    expect_close(z, a_ref.unsqueeze(1) * r + (1 - a_ref.unsqueeze(1)) * g, "roi_pool_fuse z");
  }
  auto constant = at::full({1, C, H, W}, 2.5);
  auto inside = at::tensor({0.f, 1.f, 1.f, 6.f, 5.f}).view({1, 5});
  expect_close(align.call(constant, inside, 1.0, S, S, -1, true, false),
               at::full({1, C, S, S}, 2.5), "constant map pools to the constant");
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
