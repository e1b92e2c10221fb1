// Stand-in for CUDA's cuda_fp16.h in the host emulator: the types and conversions live in
// sim_core.h.
#pragma once
#include "sim_core.h"
