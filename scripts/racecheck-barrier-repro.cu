// Is compute-sanitizer's racecheck report on the wgmma attention kernels a false positive?
//
// Run 5 (H200, 2026-11-28) reported shared-memory hazards between the wgmma kernels' epilogue
// stores (one warpgroup stages its rows) and the loads after the following __syncthreads()
// (the other warpgroup writes them out). Reading the SASS found that barrier on every path;
// the only synchronisation the two warpgroups do differently is the ping-pong on named barrier
// 1: per key tile warpgroup 1 waits (bar.sync 1, 256) and warpgroup 0 only arrives
// (bar.arrive 1, 256). Every flagged pair had its writer in warpgroup 1 and its reader in
// warpgroup 0.
//
// This program has the same pattern without any wgmma: `n` rounds of __syncthreads plus the
// ping-pong in `mode` 0 (as the kernels), both warpgroups waiting on barrier 1 in mode 1, no
// barrier 1 in mode 2; then each thread stores to shared memory, __syncthreads, and reads the
// other warpgroup's entry. The pattern is race-free in every mode; on hardware every value
// must be right. Under racecheck, hazards in mode 0 with n >= 1 only (and none in modes 1, 2)
// confirm the false positive; hazards nowhere mean the kernels' report has another cause.
// With an argument (0, 1 or 2) it runs that mode only, so that racecheck's summary of each
// run belongs to one mode: scripts/gpu-check.sh step `racecheck-barrier-repro` builds it with
// the device's nvcc, runs all modes once plainly (the values), then each under racecheck.
#include <cstdio>
#include <cstdlib>

__global__ void ping_pong_then_exchange(int rounds, int mode, int* out) {
  __shared__ int staged[256];
  const int tid = threadIdx.x, warpgroup = tid >> 7;
  for (int i = 0; i < rounds; ++i) {
    __syncthreads();
    if (mode == 2) continue;
    if (warpgroup == 1 || mode == 1) {
      asm volatile("bar.sync 1, 256;" ::: "memory");
    } else {
      asm volatile("bar.arrive 1, 256;" ::: "memory");
    }
  }
  __syncthreads();
  staged[tid] = tid * 3 + 1;      // warpgroup w stages entries 128 w .. 128 w + 127
  __syncthreads();
  out[tid] = staged[tid ^ 128];   // each thread reads the other warpgroup's entry
}

int main(int argc, char** argv) {
  const int only = argc > 1 ? std::atoi(argv[1]) : -1;
  int* d = nullptr;
  if (cudaMalloc(&d, 256 * sizeof(int)) != cudaSuccess) {
    std::printf("cudaMalloc failed\n");
    return 1;
  }
  int wrong_total = 0;
  for (int mode = 0; mode < 3; ++mode) {
    if (only >= 0 && mode != only) continue;
    for (int rounds : {0, 1, 3}) {
      ping_pong_then_exchange<<<1, 256>>>(rounds, mode, d);
      int h[256];
      cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
      int wrong = 0;
      for (int t = 0; t < 256; ++t) wrong += h[t] != (t ^ 128) * 3 + 1;
      std::printf("mode %d (%s), %d rounds: %d wrong values\n", mode,
                  mode == 0 ? "arrive / sync, as the kernels" : mode == 1 ? "sync / sync" : "no barrier 1",
                  rounds, wrong);
      wrong_total += wrong;
    }
  }
  cudaFree(d);
  return wrong_total == 0 ? 0 : 1;
}
