// Programmatic dependent launch (compute capability 9.0+): a kernel launched with the
// programmatic stream serialization attribute may be scheduled before the previous kernel in
// its stream has finished, so that launch latency and the previous kernel's tail overlap. It
// must call wait_for_previous_grid() before touching anything that kernel writes (or reads:
// the wait returns only after the previous grid has completed and its memory is visible).
// allow_dependent_launch() in the previous kernel lets the dependent grid be scheduled as soon
// as every block of this one has executed it, instead of as they exit; it orders nothing.
// Both are no-ops below sm_90 and on the host emulator, and wait returns at once when the
// kernel was launched without the attribute, so the kernels stay correct under any launch.
#pragma once

namespace dk {

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace dk
