// Shared by the divergence emulator drivers: fails the run unless dk_math.cuh was compiled with
// its host versions (exact exp2 with the device's flush to zero; see the drivers' comments on
// __CUDACC__ and __CUDA_ARCH__), so no inline PTX and no error model slipped in.
#pragma once

#include "dk_math.cuh"
#include "sim_core.h"

inline void check_host_math() {
  if (dk::fast_exp2(0.5f) != exp2f(0.5f) || dk::fast_exp2(-126.5f) != 0.f)
    sim::fail("dk_math.cuh: fast_exp2 is not the host version (exact exp2, flush below 2^-126)");
}
