// Host-side knobs of the CPU ROI kernels (roi_cpu.cpp), exposed to Python by csrc/module.cpp.
#pragma once

namespace regionmed::roi_cpu {

// Sets the work (multiply-adds) from which a CPU loop is split over threads; returns the
// previous value. Tests set it to 0 to run the threaded code on small shapes.
double set_parallel_min_work(double work);

}  // namespace regionmed::roi_cpu
