// cuda/divergence.cu for the host emulator (tests/attention_sim/sim_core.h), as the drivers
// divergence_fused_sim.cpp and divergence_prepare_sim.cpp include it: the file staged by the
// test (tests/common: divergence_cu_simulator, static __shared__ arrays rewritten to
// SIM_SHARED). The headers come first, with __CUDACC__ defined and __CUDA_ARCH__ not, so
// dk_math.cuh keeps its host versions (exact exp2 / log2, the device's flush to zero), as in
// divergence_persistent_sim.cpp; the kernel file then sees __CUDA_ARCH__ 900.
#pragma once

#include "sim_impl.h"

#define __CUDACC__ 1
#include "dk_math.cuh"
#include "dk_divergence_math.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"
#include "dk_divergence_passes.cuh"
#include "dk_divergence_args.h"
#include "host_math_check.h"

#define __CUDA_ARCH__ 900
#include "divergence.cu"
#undef __CUDA_ARCH__
#undef __CUDACC__
