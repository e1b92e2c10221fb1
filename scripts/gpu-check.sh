#!/usr/bin/env bash
# The one-shot GPU check. Runs ON the GPU machine, from the repository root, with gpu-bundle/
# (made here by scripts/build-gpu-bundle.sh) carried along. No Rust there: python3 with torch,
# triton, numpy, pytest and ml_dtypes.
#
#   bash scripts/gpu-check.sh
#
# Steps, each under its own time limit and all inside GPU_CHECK_BUDGET seconds (default 330, with
# time kept back for the later steps); a failing step is recorded and the next one runs:
#   1. nvidia-smi one-liner
#   2. dk info
#   3. dk bench on CUDA, bf16, N=4096, 4 vocabs, all kinds, fwd+bwd and fwd
#   4. dk bench: one f32 row; N=256 and N=16384 (issue 3); the one-block kernel alone
#      (DK_DIVERGENCE_CLUSTER=0), and the shared-memory and stream cluster variants forced onto
#      N=4096 (=smem, =stream), side by side with the default; version 6, the persistent
#      cluster kernels (=persist, =persist256), at their own cluster size and at 4, 8 and 16;
#      the gradient over the student logits (--passes fwd+bwd,in-place), default and persist
#   5. dk bench --ops moe: route, permute, combine fwd/bwd, 3 ANCHORS shapes, N=16384
#  5b. dk bench --ops attention: fwd, fwd+bwd, ANCHORS shapes + varlen, bf16, TFLOP/s; again with
#      the opt-in kernels (DK_ATTENTION_FWD=wide, DK_ATTENTION_BWD=wide), and with the Hopper
#      wgmma kernels (DK_ATTENTION_FWD=wgmma, DK_ATTENTION_BWD=wgmma)
#  5c. dk bench --ops fused: fused linear JSD (N 4096, H 3072, V 200064; N 16384, H 5120,
#      V 202048) against its four cuBLAS GEMMs alone, measured in the same run (issue 4)
#   6. every Rust test executable (their CUDA variants run here), the divergence reference tests
#      again on each kernel variant, and the attention reference tests on the opt-in kernels
#   7. pip install the carried Liger-Kernel wheel (--target)
#   8. pytest python/tests against the bundled library (attention torch tests vs SDPA here)
#   9. python/bench.py --ops attention: SDPA flash (FA2) and cuDNN vs this crate (--quick when
#      short); again with the opt-in kernels when time is left
#  9b. python/bench.py --ops fused: the fused linear JSD vs torch eager / compile / Liger and the
#      four GEMMs (--quick when short)
#  10. python/bench.py (torch eager, torch.compile, Liger, this crate; --quick when under 150 s
#      are left)
#  10b. optional, when time is left: Nsight Compute (ncu --clock-control none) speed-of-light
#      and compute-workload sections of the key kernels: the cluster divergence kernels (KL, JSD;
#      bf16, N 4096, V 151936) and the attention kernels at the Phi-4-mini shape (forward D 128,
#      backward dK/dV + dQ, dK/dV with atomic dQ): what limits each (DRAM, shared memory,
#      tensor or MUFU pipe)
#  11. optional: compute-sanitizer memcheck of small dk benches (divergence, MoE, attention),
#      racecheck of attention (both with the default and the opt-in kernels)
#
# GPU_CHECK_ONLY=a,b,...: run only the steps whose names start with one of these, or, for a name
# ending in '=', the step of exactly that name (e.g.
# GPU_CHECK_ONLY=ncu for a second call that profiles, or =dk-bench-attention,python-bench-attention);
# the others are listed as not selected. GPU_CHECK_SKIP=a,b,...: leave out the steps whose names
# start with one of these (e.g. the benchmarks of code a run has not changed).
# PYTEST_K: a pytest -k expression for step 8.
# PY_BENCH_OPS: the --ops of step 10 (default: divergence,moe); PY_BENCH_SHAPES: its divergence
# shapes (NxV list); PY_BENCH_IMPLS: its --impls (e.g. distill_kernels,num_items: this crate's
# rows only, with the num_items-tensor rows); PY_BENCH_FULL_SECONDS: the seconds left under which
# step 10 runs --quick (default 150).
#
# Output: logs and JSON in $OUT (when set, as on the device tool; else ./gpu-check-out), at most
# 8 files, written as the steps end (a run stopped at the device tool's limit still returns the
# steps it finished): summary.txt (rewritten after every step), gpu-check.log (every step's
# output, appended as it ends), dk-bench.json, dk-bench-f32.json,
# dk-bench-moe.json, dk-bench-attention.json, python-bench-attention.json, python-bench.json.
# Printed last: the summary table (step, status, seconds), then the dk bench tables (divergence,
# f32, MoE, attention) and the python bench tables (attention, then the rest). Exit status: 0
# when every required step passed, else 1.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bundle=${GPU_BUNDLE:-$root/gpu-bundle}
out=${OUT:-$root/gpu-check-out}
budget=${GPU_CHECK_BUDGET:-330}
GPU_CHECK_SKIP=${GPU_CHECK_SKIP:-}
mkdir -p "$out"
logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
t0=$(date +%s.%N)

now() { date +%s.%N; }
elapsed() { awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }
left() { awk -v a="$t0" -v b="$(now)" -v t="$budget" 'BEGIN { printf "%d", t - (b - a) }'; }

if [ ! -x "$bundle/bin/dk" ]; then
  echo "gpu-check: $bundle/bin/dk not found: run scripts/build-gpu-bundle.sh on the build machine" >&2
  echo "and carry gpu-bundle (device tool: carry=[\"gpu-bundle\"])" >&2
  exit 2
fi

# ---- the packed executables ---------------------------------------------------------------------------
# build-gpu-bundle.sh carries the test executables (and the static library) as one solid xz
# archive; unpacked here once, with their modes.
if [ -f "$bundle/packed.tar.xz" ] && [ ! -e "$bundle/.unpacked" ]; then
  if python3 - "$bundle" <<'PY'
import sys, tarfile

b = sys.argv[1]
with tarfile.open(f"{b}/packed.tar.xz") as t:
    if hasattr(tarfile, "data_filter"):
        t.extractall(b, filter="data")
    else:
        t.extractall(b)
PY
  then
    touch "$bundle/.unpacked"
  else
    echo "gpu-check: could not unpack $bundle/packed.tar.xz (the test steps will fail)" >&2
  fi
fi

# ---- environment ----------------------------------------------------------------------------------
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
export DISTILL_KERNELS_LIB="$bundle/lib/libdistill_kernels.so"
# The C ABI test links the bundle's .so / .a instead of building them (no cargo here).
export DK_CAPI_TEST_LIB_DIR="$bundle/lib"
export CARGO_MANIFEST_DIR="$root"
dk="$bundle/bin/dk"
py=${PYTHON:-python3}

# Test executables carry paths of the build machine (env!("CARGO_MANIFEST_DIR")) and look for the
# library in the folder above their own (cargo's target/release/deps layout): point the build
# root at this checkout, and lay out target/release as a build would (the executables are copied,
# not linked, as the tests resolve their own path).
build_root=$(sed -n 's/^build_root=//p' "$bundle/BUILD-INFO" 2>/dev/null)
setup_notes=""
if [ -n "$build_root" ] && [ "$build_root" != "$root" ] && [ ! -e "$build_root" ]; then
  if mkdir -p "$(dirname "$build_root")" 2>/dev/null && ln -s "$root" "$build_root" 2>/dev/null; then
    setup_notes+="linked build root $build_root -> $root; "
  else
    setup_notes+="could not link build root $build_root (tests using it may fail); "
  fi
fi
mkdir -p target/release/deps target/tmp
for f in libdistill_kernels.so; do
  [ -e "target/release/$f" ] || cp "$bundle/lib/$f" "target/release/$f"
done
[ -e target/release/dk ] || cp "$dk" target/release/dk
if [ -e "$bundle/lib/libdistill_kernels.a" ] && [ ! -e target/release/libdistill_kernels.a ]; then
  cp "$bundle/lib/libdistill_kernels.a" target/release/libdistill_kernels.a
elif [ -e "$bundle/lib/libdistill_kernels.a.gz" ] && [ ! -e target/release/libdistill_kernels.a ]; then
  gunzip -c "$bundle/lib/libdistill_kernels.a.gz" >target/release/libdistill_kernels.a
fi
while IFS=$'\t' read -r name kind _; do
  [ "$name" = name ] || [ "$kind" = bench ] || cp -f "$bundle/tests/$name" "target/release/deps/$name"
done <"$bundle/tests/MANIFEST.tsv"
if [ -d "$bundle/c-tests" ]; then
  cp -rn "$bundle/c-tests/." ./ 2>/dev/null || true
fi

# ---- step runner -----------------------------------------------------------------------------------
names=()
statuses=()
seconds=()
required_failed=0

# Written as the run goes, under $OUT (whose files come back even when the device tool stops the
# command at its limit): summary.txt after every step, and each step's output appended to
# gpu-check.log as soon as it ends. (At most 8 files come back: these two and the JSON files.)
write_summary() {
  {
    echo "gpu-check of $(sed -n 's/^commit=//p' "$bundle/BUILD-INFO") ($(sed -n 's/^built_utc=//p' "$bundle/BUILD-INFO")), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    [ -s "$logs/nvidia-smi.out" ] && echo "card: $(head -n 1 "$logs/nvidia-smi.out")"
    [ -n "$setup_notes" ] && echo "setup: $setup_notes"
    printf '%-30s %-40s %8s\n' step status seconds
    for i in "${!names[@]}"; do
      printf '%-30s %-40s %8s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"
    done
    echo "after ${1:-$(elapsed)}s; required steps failed: $required_failed"
  } >"$out/summary.txt"
}
log_step() { # NAME: its status line and output tails, appended to gpu-check.log
  local n=$1 i=$((${#names[@]} - 1)) s f
  {
    echo
    echo "======== $n: ${statuses[$i]} (${seconds[$i]} s)"
    for s in out err; do
      f="$logs/$n.$s"
      [ -s "$f" ] || continue
      echo "-------- $n std$s (last 400 kB)"
      tail -c 400000 "$f"
    done
  } >>"$out/gpu-check.log"
  write_summary
}
{
  cat "$bundle/BUILD-INFO"
  echo "(each step's output follows as it ends; the summary is in summary.txt and at the end)"
} >"$out/gpu-check.log"

# Seconds kept back for the steps after the current one (set per phase below).
reserve=0

# run_step NAME CAP_SECONDS REQUIRED(1|0) CMD...: stdout -> $logs/NAME.out, stderr -> $logs/NAME.err
# The step gets min(CAP, budget left - reserve) seconds.
# GPU_CHECK_ONLY: a comma-separated list of step-name prefixes; unset = every step. A name ending
# in '=' matches that step only (test-divergence_reference= is not test-divergence_reference-v1).
matches() { # STEP PATTERN
  case $2 in
    *=) [ "$1" = "${2%=}" ] ;;
    *) case $1 in "$2"*) return 0 ;; *) return 1 ;; esac ;;
  esac
}
want() {
  local w
  for w in ${GPU_CHECK_SKIP//,/ }; do
    matches "$1" "$w" && return 1
  done
  [ -z "${GPU_CHECK_ONLY:-}" ] && return 0
  for w in ${GPU_CHECK_ONLY//,/ }; do
    matches "$1" "$w" && return 0
  done
  return 1
}

# The steps that come last: Nsight Compute (10b) and compute-sanitizer (11).
ncu_steps="ncu-divergence ncu-divergence-persist ncu-divergence-persist256 ncu-moe-route ncu-fused
  ncu-moe-combine ncu-attention-fwd ncu-attention-bwd ncu-attention-bwd-atomic
  ncu-attention-fwd-wide ncu-attention-bwd-wide ncu-attention-fwd-wgmma ncu-attention-bwd-wgmma"
sanitizer_steps="memcheck memcheck-persist memcheck-persist256 memcheck-moe memcheck-attention
  racecheck-attention memcheck-attention-wide racecheck-attention-wide memcheck-attention-wgmma
  racecheck-attention-wgmma"
py_benches="python-bench-attention python-bench-attention-wide python-bench-attention-wgmma
  python-bench-fused python-bench"

any_wanted() { # STEP...: whether one of them is selected
  local n
  for n in "$@"; do
    want "$n" && return 0
  done
  return 1
}

# reserve_for SECONDS STEP...: keep SECONDS back for the later steps named, but only when one
# of them is selected (GPU_CHECK_ONLY / _SKIP): a call that runs no Python step spends the whole
# budget on the steps it asked for. A call that names its steps (GPU_CHECK_ONLY) and selects an
# ncu or sanitizer step keeps at least 60 s for those, which come last (a full run leaves them
# what the Python benchmarks leave).
reserve_for() {
  local s=$1
  shift
  reserve=0
  if any_wanted "$@"; then
    reserve=$s
  fi
  # shellcheck disable=SC2086 # word lists
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [ "$reserve" -lt 60 ] && any_wanted $ncu_steps $sanitizer_steps; then
    reserve=60
  fi
  return 0
}

run_step() {
  local name=$1 cap=$2 required=$3
  shift 3
  local l t status rc s1 s2
  if ! want "$name"; then
    names+=("$name"); statuses+=("not selected (GPU_CHECK_ONLY / _SKIP)"); seconds+=("0")
    return 0
  fi
  l=$(( $(left) - reserve ))
  if [ "$l" -lt 8 ]; then
    names+=("$name"); statuses+=("skipped (out of time)"); seconds+=("0")
    [ "$required" = 1 ] && required_failed=$((required_failed + 1))
    echo "[$(elapsed)s] $name: skipped (out of time)"
    return 0
  fi
  t=$cap
  [ "$l" -lt "$t" ] && t=$l
  echo "[$(elapsed)s] $name (limit ${t}s) ..."
  s1=$(now)
  timeout -k 5 "$t" "$@" >"$logs/$name.out" 2>"$logs/$name.err" </dev/null
  rc=$?
  s2=$(now)
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${t}s)" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  if [ "$rc" != 0 ]; then
    if [ "$required" = 1 ]; then
      required_failed=$((required_failed + 1))
    else
      status="$status, optional"
    fi
  fi
  names+=("$name"); statuses+=("$status")
  seconds+=("$(awk -v a="$s1" -v b="$s2" 'BEGIN { printf "%.1f", b - a }')")
  echo "[$(elapsed)s] $name: $status"
  log_step "$name"
}

skip_step() { # NAME REASON
  names+=("$1"); statuses+=("skipped ($2)"); seconds+=("0")
  echo "[$(elapsed)s] $1: skipped ($2)"
  write_summary
}

# ---- 1. the card --------------------------------------------------------------------------------------
run_step nvidia-smi 15 1 nvidia-smi \
  --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv,noheader

# ---- 2. dk info ------------------------------------------------------------------------------------------
run_step dk-info 30 1 "$dk" info

# ---- 3./4. dk bench on CUDA (first: the numbers this check is for) -------------------------
run_step dk-bench-bf16 120 1 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 \
  --vocab 151936,200064,202048,262144 --kinds forward_kl,reverse_kl,jsd --json "$out/dk-bench.json"
run_step dk-bench-f32 45 1 "$dk" bench --device cuda --ops divergence --dtype f32 --rows 4096 \
  --vocab 151936 --kinds jsd --passes fwd+bwd --json "$out/dk-bench-f32.json"
# Issue 3's other targets: a short batch (N = 256, rows split over a cluster), N = 16384, and
# version 1 (one block per row, DK_DIVERGENCE_CLUSTER=0) side by side with the cluster kernel.
# No JSON files for these (the device tool returns at most 8 files): their tables are printed
# below and kept in gpu-check.log.
run_step dk-bench-short 30 1 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 256 \
  --vocab 151936 --kinds forward_kl,jsd
run_step dk-bench-16k 45 1 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 16384 \
  --vocab 151936 --kinds forward_kl,jsd --passes fwd+bwd --iters 5
run_step dk-bench-v1 45 1 env DK_DIVERGENCE_CLUSTER=0 "$dk" bench --device cuda --ops divergence \
  --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd
# The Hopper cluster variants forced onto the long batch, side by side with the default (one
# block per row from 512 rows): the shared-memory and the stream cluster kernels.
run_step dk-bench-smem 45 1 env DK_DIVERGENCE_CLUSTER=smem "$dk" bench --device cuda \
  --ops divergence --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd --passes fwd+bwd
run_step dk-bench-stream 45 1 env DK_DIVERGENCE_CLUSTER=stream "$dk" bench --device cuda \
  --ops divergence --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd --passes fwd+bwd
# The stream variant with fewer, longer blocks per row (its 8-block clusters ran at a fixed
# ~2.6 ms on both the H100 and the H200: per-block latency, not bandwidth).
for c in 2 4; do
  run_step "dk-bench-stream-c$c" 30 0 env DK_DIVERGENCE_CLUSTER=stream DK_DIVERGENCE_CLUSTER_SIZE=$c \
    "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 --vocab 151936 \
    --kinds forward_kl --passes fwd+bwd
done

# Version 6 (issue 3): persistent clusters that pipeline rows, forced onto the long batch (bf16
# and f32, fwd+bwd and forward only), at its default cluster size (from L2 and occupancy) and at
# forced sizes. Its results are bitwise
# the stream variant's at the same cluster size (same slices and merges); dk bench checks them
# against f64.
run_step dk-bench-persist 90 1 env DK_DIVERGENCE_CLUSTER=persist "$dk" bench --device cuda \
  --ops divergence --dtype bf16,f32 --rows 4096 --vocab 151936,262144 --kinds forward_kl,jsd
# The 256-thread shape (two steps of loads in flight, twice the chunks per thread per row).
run_step dk-bench-persist256 90 1 env DK_DIVERGENCE_CLUSTER=persist256 "$dk" bench \
  --device cuda --ops divergence --dtype bf16,f32 --rows 4096 --vocab 151936,262144 \
  --kinds forward_kl,jsd
# Issue 3's short batch (N = 256, default: stream clusters at 32.8 % on the H200) on both shapes.
for p in persist persist256; do
  run_step "dk-bench-short-$p" 30 0 env DK_DIVERGENCE_CLUSTER=$p "$dk" bench --device cuda \
    --ops divergence --dtype bf16 --rows 256 --vocab 151936 --kinds forward_kl,jsd
done
for c in 4 8 16; do
  run_step "dk-bench-persist-c$c" 30 0 env DK_DIVERGENCE_CLUSTER=persist \
    DK_DIVERGENCE_CLUSTER_SIZE=$c "$dk" bench --device cuda --ops divergence --dtype bf16 \
    --rows 4096 --vocab 151936 --kinds forward_kl,jsd --passes fwd+bwd
done

# Issue 3: the gradient written over the student logits "at the same speed": the in-place pass
# beside the separate-buffer one in the same call, under the default policy and the persistent
# kernel (whose cluster slices make in place its hardest case).
run_step dk-bench-inplace 40 0 "$dk" bench --device cuda --ops divergence --dtype bf16 \
  --rows 4096 --vocab 151936 --kinds forward_kl,jsd --passes fwd+bwd,in-place
run_step dk-bench-inplace-persist 40 0 env DK_DIVERGENCE_CLUSTER=persist "$dk" bench \
  --device cuda --ops divergence --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd \
  --passes fwd+bwd,in-place

# ---- 5. dk bench MoE: route, permute / combine fwd + bwd for the 3 shapes of ANCHORS.md --------
# 15 results at N = 16384 (bf16 activations, f32 router logits), each checked against the CPU
# backend and run twice for bitwise identity; ~20 s expected (input generation, downloads).
run_step dk-bench-moe 60 1 "$dk" bench --device cuda --ops moe --dtype bf16 --tokens 16384 \
  --moe-shapes scout,maverick,qwen3 --json "$out/dk-bench-moe.json"
# The route's scan and assignment without programmatic dependent launch (A/B for the route time).
run_step dk-bench-moe-nopdl 30 0 env DK_MOE_PDL=0 "$dk" bench --device cuda --ops moe \
  --dtype bf16 --tokens 16384 --moe-shapes qwen3

# ---- 5b. dk bench attention: fwd and fwd+bwd, the ANCHORS shapes and a varlen batch, bf16 --------
# 6 results (TFLOP/s, ratio to ANCHORS.md's FA2 numbers), each checked on sampled rows against an
# f64 computation and run twice for bitwise identity; ~15 s expected (input generation, checks).
run_step dk-bench-attention 60 1 "$dk" bench --device cuda --ops attention --dtype bf16 \
  --attn-shapes phi4-mini,llama4,varlen --json "$out/dk-bench-attention.json"
# A/B: the opt-in kernels (cuda/ATTENTION.md), the same shapes: the D = 128 split forward of 8
# warps (DK_ATTENTION_FWD=wide: the fwd rows) and the 128-key dK/dV kernels of 8 warps
# (DK_ATTENTION_BWD=wide: fwd+bwd minus fwd, both backward modes); the output ends with the
# attention kernels that ran.
run_step dk-bench-attention-wide 60 0 env DK_ATTENTION_FWD=wide DK_ATTENTION_BWD=wide "$dk" \
  bench --device cuda --ops attention --dtype bf16 --attn-shapes phi4-mini,llama4,varlen
# A/B: the forward on wgmma (cuda/attention_forward_wgmma.cu, "Forward on wgmma" in
# cuda/ATTENTION.md; its fwd rows against dk-bench-attention's) and the deterministic backward
# on wgmma ("Backward on wgmma"; fwd+bwd minus fwd against dk-bench-attention-wide's).
run_step dk-bench-attention-wgmma 60 0 env DK_ATTENTION_FWD=wgmma DK_ATTENTION_BWD=wgmma "$dk" \
  bench --device cuda --ops attention --dtype bf16 --attn-shapes phi4-mini,llama4,varlen

# ---- 5c. dk bench fused linear JSD against the four GEMMs alone (issue 4's two shapes) ---------
# No JSON (the device tool returns at most 8 files): the table is printed below and in the log.
# ~15 s expected (inputs made on the host, 2 rows per shape checked in f64 there).
run_step dk-bench-fused 45 1 "$dk" bench --device cuda --ops fused --dtype bf16 --iters 5 \
  --check-rows 2
# A/B: the chunks' f32 rows (1.6 MB pairs at V 200064) on 16-block stream clusters (100 KB slices,
# within L2) instead of the default one block per row (re-reads from DRAM).
run_step dk-bench-fused-stream16 45 0 env DK_DIVERGENCE_CLUSTER=stream \
  DK_DIVERGENCE_CLUSTER_SIZE=16 "$dk" bench --device cuda --ops fused --dtype bf16 --iters 5 \
  --check-rows 2

# A/B: the chunks' f32 rows on the persistent cluster kernel (version 6; re-reads in L2),
# which writes G itself over the row its cluster finished before (cuda/FUSED.md, version 3).
run_step dk-bench-fused-persist 45 0 env DK_DIVERGENCE_CLUSTER=persist "$dk" bench --device cuda \
  --ops fused --dtype bf16 --iters 5 --check-rows 2

# ---- 6. Rust test executables (CUDA variants run when a GPU is present) ------------------------------
# pytest and the Python benchmarks come after
reserve_for 170 pytest $py_benches
while IFS=$'\t' read -r name kind _src _built; do
  [ "$name" = name ] && continue
  [ "$kind" = bench ] && continue
  run_step "test-$name" 90 1 "target/release/deps/$name"
done <"$bundle/tests/MANIFEST.tsv"
# Every path stays correct on Hopper: the default (one block per row from 512 rows, stream
# clusters below), the one-block kernel alone, and each cluster variant on every row count.
if [ -x target/release/deps/divergence_reference ]; then
  run_step test-divergence_reference-v1 90 1 env DK_DIVERGENCE_CLUSTER=0 \
    target/release/deps/divergence_reference
  run_step test-divergence_reference-smem 90 1 env DK_DIVERGENCE_CLUSTER=smem \
    target/release/deps/divergence_reference
  run_step test-divergence_reference-stream 90 1 env DK_DIVERGENCE_CLUSTER=stream \
    target/release/deps/divergence_reference
  run_step test-divergence_reference-persist 90 1 env DK_DIVERGENCE_CLUSTER=persist \
    target/release/deps/divergence_reference
  run_step test-divergence_reference-persist256 90 1 env DK_DIVERGENCE_CLUSTER=persist256 \
    target/release/deps/divergence_reference
fi
# The fused linear divergence with every chunk on one block per row: on Hopper its small test
# shapes otherwise run the cluster row kernels and the separate conversion pass, so this is what
# checks dk_div_fused_* (G written over S by the chunk's divergence, cuda/FUSED.md version 2).
if [ -x target/release/deps/fused_reference ]; then
  run_step test-fused_reference-v1 90 1 env DK_DIVERGENCE_CLUSTER=0 \
    target/release/deps/fused_reference
  # Every chunk on the persistent kernel that writes G over the previous row of its cluster
  # (dk_divcp_fused_*, cuda/FUSED.md version 3).
  run_step test-fused_reference-persist 90 1 env DK_DIVERGENCE_CLUSTER=persist \
    target/release/deps/fused_reference
  run_step test-fused_reference-persist256 90 1 env DK_DIVERGENCE_CLUSTER=persist256 \
    target/release/deps/fused_reference
fi
if [ -x target/release/deps/attention_reference ]; then
  run_step test-attention_reference-wide 90 1 env DK_ATTENTION_FWD=wide DK_ATTENTION_BWD=wide \
    target/release/deps/attention_reference
  run_step test-attention_reference-wgmma 90 1 env DK_ATTENTION_FWD=wgmma DK_ATTENTION_BWD=wgmma \
    target/release/deps/attention_reference
fi
# as pytest: the Python benchmarks come after
reserve_for 140 pytest $py_benches

# ---- 7. Liger-Kernel from the carried wheel ---------------------------------------------------------
site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
if compgen -G "$bundle/wheels/liger*.whl" >/dev/null; then
  run_step liger-install 60 0 "$py" -m pip install -q --no-index --no-deps --no-compile \
    --disable-pip-version-check --target "$site" "$bundle"/wheels/liger*.whl
else
  skip_step liger-install "no wheel in $bundle/wheels"
fi
export PYTHONPATH="$root/python:$site${PYTHONPATH:+:$PYTHONPATH}"

# ---- 8. Python tests (torch tests on CUDA) --------------------------------------------------------
# Kept back for the Python benchmarks: each later step's reserve plus ~40 s for the next one
# (9: 100 + 40; 9b: 60; 10: at least ~60 s, --quick when short).
reserve_for 140 $py_benches # the Python benchmarks
# PYTEST_K: a pytest -k expression to run a subset (a second call after a fix).
run_step pytest 120 1 "$py" -m pytest python/tests -q -rs -p no:cacheprovider \
  ${PYTEST_K:+-k "$PYTEST_K"}

# ---- 9. Python benchmark of attention against SDPA's flash (FA2) and cuDNN backends -------------
reserve_for 100 python-bench-fused python-bench # the fused and the other Python benchmark
if [ -f python/bench.py ]; then
  aquick=()
  [ "$(left)" -lt 150 ] && aquick=(--quick)
  run_step python-bench-attention 60 1 "$py" python/bench.py --ops attention "${aquick[@]}" \
    --json "$out/python-bench-attention.json"
  # The same with the opt-in kernels: this crate's rows and FA2, re-measured in the same run (so
  # the ratios stay same-run ratios; cuDNN left out). In a full run only when time is left.
  if [ -n "${GPU_CHECK_ONLY:-}" ] || [ "$(left)" -gt 200 ]; then
    run_step python-bench-attention-wide 60 0 env DK_ATTENTION_FWD=wide DK_ATTENTION_BWD=wide \
      "$py" python/bench.py --ops attention --impls distill "${aquick[@]}"
  else
    skip_step python-bench-attention-wide "out of time"
  fi
  if [ -n "${GPU_CHECK_ONLY:-}" ] || [ "$(left)" -gt 200 ]; then
    run_step python-bench-attention-wgmma 60 0 env DK_ATTENTION_FWD=wgmma DK_ATTENTION_BWD=wgmma \
      "$py" python/bench.py --ops attention --impls distill "${aquick[@]}"
  else
    skip_step python-bench-attention-wgmma "out of time"
  fi
else
  skip_step python-bench-attention "python/bench.py missing"
  skip_step python-bench-attention-wide "python/bench.py missing"
  skip_step python-bench-attention-wgmma "python/bench.py missing"
fi

# ---- 9b. Python benchmark of the fused linear JSD (issue 4): torch eager, torch.compile, Liger's
# chunked and fused-linear JSD, this crate, and the four GEMMs alone, from one run. No JSON (at
# most 8 files come back): the table is printed below and kept in the log.
reserve_for 60 python-bench # the other Python benchmark
if [ -f python/bench.py ]; then
  fquick=()
  [ "$(left)" -lt 170 ] && fquick=(--quick)
  # 90 s: torch.compile of Liger's chunked loss at two shapes, eager and LigerFusedLinearJSD at
  # ~0.2-1.2 s a call with at least 8 timed calls each (bench.py's MIN_SAMPLES).
  run_step python-bench-fused 90 1 "$py" python/bench.py --ops fused "${fquick[@]}"
else
  skip_step python-bench-fused "python/bench.py missing"
fi

# ---- 10. Python benchmark against torch eager, torch.compile, Liger ------------------------------
reserve_for 0 # only the floor for the ncu / sanitizer steps of a named-steps call
if [ -f python/bench.py ]; then
  quick=()
  [ "$(left)" -lt "${PY_BENCH_FULL_SECONDS:-150}" ] && quick=(--quick)
  # PY_BENCH_SHAPES: NxV list for the divergence rows (issue 3's shapes, e.g.
  # 4096x262144,16384x151936,256x151936); default bench.py's own.
  run_step python-bench 240 1 "$py" python/bench.py --ops "${PY_BENCH_OPS:-divergence,moe}" \
    "${quick[@]}" ${PY_BENCH_SHAPES:+--shapes "$PY_BENCH_SHAPES"} \
    ${PY_BENCH_IMPLS:+--impls "$PY_BENCH_IMPLS"} --json "$out/python-bench.json"
else
  skip_step python-bench "python/bench.py missing"
fi

# ---- 10b. optional: Nsight Compute sections of the key kernels (what limits them) ----------------
# One launch per kernel (the first that matches: a checked run), --clock-control none (the card's
# clocks are left alone). SpeedOfLight gives DRAM / L1+shared / L2 / SM throughput as % of peak;
# ComputeWorkloadAnalysis names the busiest pipe (tensor, FMA, XU = MUFU, LSU) in its rule text.
ncu_bin=$(command -v ncu || true)
# In a named-steps call, 30 s stay for the sanitizer steps after these (plan step 1's racecheck).
reserve=0
# shellcheck disable=SC2086 # a word list
if [ -n "${GPU_CHECK_ONLY:-}" ] && any_wanted $sanitizer_steps; then
  reserve=30
fi
ncu_run() { # NAME CAP KERNEL_REGEX LAUNCHES DK_BENCH_ARGS...
  local name=$1 cap=$2 re=$3 count=$4
  shift 4
  if ! want "$name"; then
    run_step "$name" 0 0 true # listed as not selected
  elif [ -z "$ncu_bin" ]; then
    skip_step "$name" "ncu not found"
  elif want "$name" && [ "$(left)" -lt 25 ]; then
    skip_step "$name" "out of time"
  else
    run_step "$name" "$cap" 0 "$ncu_bin" --clock-control none --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --kernel-name "regex:$re" --launch-count "$count" \
      "$dk" bench --device cuda "$@"
  fi
}
# The default policy's kernel at N = 4096: one block per row (dk_div_*); the cluster kernels
# (dk_divcs_*, dk_divc_*) where a switch forces them.
ncu_run ncu-divergence 40 'dk_div(cs?)?_(fkl|jsd)_bf16_bf16' 4 --ops divergence --dtype bf16 \
  --rows 4096 --vocab 151936 --kinds forward_kl,jsd --passes fwd+bwd --iters 1 --check-rows 2
DK_DIVERGENCE_CLUSTER=persist ncu_run ncu-divergence-persist 40 'dk_divcp_(fkl|jsd)_bf16_bf16' 2 \
  --ops divergence --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd \
  --passes fwd+bwd --iters 1 --check-rows 2
DK_DIVERGENCE_CLUSTER=persist256 ncu_run ncu-divergence-persist256 40 \
  'dk_divcp256_(fkl|jsd)_bf16_bf16' 2 --ops divergence --dtype bf16 --rows 4096 --vocab 151936 \
  --kinds forward_kl,jsd --passes fwd+bwd --iters 1 --check-rows 2
# Route's three launches one by one (issue 5: which of top-k, scan and assign holds the 35 us).
ncu_run ncu-moe-route 40 'dk_moe_(topk|scan|assign)' 3 --ops moe --dtype bf16 --tokens 16384 \
  --moe-shapes qwen3 --iters 1
# Issue 4: where the fused JSD's time beyond its four GEMMs goes. Every kernel of ours (dk_*) in
# the first fused calls (Phi-4-mini shape first) timed alone, summed per kernel name; cuBLAS runs
# unprofiled. One metric, one replay per kernel.
if ! want ncu-fused; then
  run_step ncu-fused 0 0 true # listed as not selected
elif [ -z "$ncu_bin" ]; then
  skip_step ncu-fused "ncu not found"
elif [ "$(left)" -lt 40 ]; then
  skip_step ncu-fused "out of time"
else
  run_step ncu-fused 60 0 "$ncu_bin" --clock-control none --metrics gpu__time_duration.sum \
    --kernel-name 'regex:^dk_' --launch-count 40 --print-summary per-kernel \
    "$dk" bench --device cuda --ops fused --dtype bf16 --iters 1 --check-rows 1
fi
# Issue 5: the combine at H = 5120 (Scout: k = 1) reached only 72 % of its floor on the H200.
# Hypothesis (cuda/MOE.md): one 2 KB segment per warp after a dependent position load leaves too
# little in flight; the stall reasons and DRAM throughput say whether that is it.
if [ -n "$ncu_bin" ] && want ncu-moe-combine && [ "$(left)" -ge 25 ]; then
  run_step ncu-moe-combine 40 0 "$ncu_bin" --clock-control none --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --kernel-name 'regex:dk_moe_combine' \
    --launch-count 1 "$dk" bench --device cuda --ops moe --dtype bf16 --tokens 16384 \
    --moe-shapes scout --iters 1
elif ! want ncu-moe-combine; then
  run_step ncu-moe-combine 0 0 true # listed as not selected
else
  skip_step ncu-moe-combine "ncu not found or out of time"
fi
ncu_run ncu-attention-fwd 40 'dk_attn_fwd_bf16_d128' 1 --ops attention --dtype bf16 \
  --attn-shapes phi4-mini --iters 1 --check-rows 2
ncu_run ncu-attention-bwd 40 'dk_attn_bwd_(dkdv|dq)_bf16_d128' 2 --ops attention --dtype bf16 \
  --attn-shapes phi4-mini --iters 1 --check-rows 2
ncu_run ncu-attention-bwd-atomic 40 'dk_attn_bwd_dkdvdq_bf16_d128' 1 --ops attention \
  --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
DK_ATTENTION_FWD=wide ncu_run ncu-attention-fwd-wide 40 'dk_attn_fwd_bf16_d128w' 1 \
  --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
DK_ATTENTION_BWD=wide ncu_run ncu-attention-bwd-wide 40 'dk_attn_bwd_(dkdvw|dqw)_bf16_d128' 2 \
  --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
DK_ATTENTION_FWD=wgmma ncu_run ncu-attention-fwd-wgmma 40 'dk_attn_fwd_bf16_d128g' 1 \
  --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
DK_ATTENTION_BWD=wgmma ncu_run ncu-attention-bwd-wgmma 40 'dk_attn_bwd_(dkdvg|dqg)_bf16_d128' 2 \
  --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2

# ---- 11. optional: memcheck of small dk benches (divergence, MoE, attention), racecheck ----------
sanitizer=$(command -v compute-sanitizer || true)
reserve=0
if [ -z "$sanitizer" ]; then
  skip_step memcheck "compute-sanitizer not found"
  skip_step memcheck-moe "compute-sanitizer not found"
  skip_step memcheck-attention "compute-sanitizer not found"
  skip_step racecheck-attention "compute-sanitizer not found"
else
  if [ "$(left)" -lt 30 ]; then
    skip_step memcheck "out of time"
  else
    run_step memcheck 60 0 "$sanitizer" --tool memcheck --error-exitcode 3 \
      "$dk" bench --device cuda --ops divergence --rows 64 --vocab 1000,151936 --iters 1 \
      --check-rows 4 --kinds forward_kl,jsd
  fi
  # The persistent cluster kernel (version 6): 300 rows over fewer clusters, so each walks
  # several rows (the reference tests cover ignored, masked and unaligned-tail rows).
  if [ "$(left)" -lt 30 ]; then
    skip_step memcheck-persist "out of time"
    skip_step memcheck-persist256 "out of time"
  else
    for p in persist persist256; do
      run_step "memcheck-$p" 60 0 env DK_DIVERGENCE_CLUSTER=$p "$sanitizer" --tool memcheck \
        --error-exitcode 3 "$dk" bench --device cuda --ops divergence --rows 300 \
        --vocab 1000,151936 --iters 1 --check-rows 4 --kinds forward_kl,jsd
    done
  fi
  # Every MoE kernel (top-k P = 1 and 4, scan, assign, permute, combine, slot-dot) on 300 tokens
  # (not a multiple of the 32-token chunk).
  if [ "$(left)" -lt 30 ]; then
    skip_step memcheck-moe "out of time"
  else
    run_step memcheck-moe 60 0 "$sanitizer" --tool memcheck --error-exitcode 3 \
      "$dk" bench --device cuda --ops moe --tokens 300 --iters 1 --check-rows 8
  fi
  # Every attention kernel (forward, backward; D 64 and 128; padded Sq != Sk, and varlen with an
  # empty sequence, a 1-token one and rows that see no key) on the small shapes.
  # Then the same with the opt-in kernels (DK_ATTENTION_FWD=wide, DK_ATTENTION_BWD=wide), and
  # with the wgmma kernels (DK_ATTENTION_FWD=wgmma, DK_ATTENTION_BWD=wgmma).
  for variant in default wide wgmma; do
    for tool in memcheck racecheck; do
      name="$tool-attention"
      [ "$variant" != default ] && name="$tool-attention-$variant"
      if [ "$(left)" -lt 30 ]; then
        skip_step "$name" "out of time"
      else
        # The default kernels: the switches empty (a value outside README's table is refused).
        value=$variant
        [ "$variant" = default ] && value=
        run_step "$name" 60 0 env DK_ATTENTION_FWD="$value" DK_ATTENTION_BWD="$value" \
          "$sanitizer" --tool "$tool" \
          --error-exitcode 3 "$dk" bench --device cuda --ops attention \
          --attn-shapes small,small-varlen --iters 1 --check-rows 4
      fi
    done
  done
fi

# ---- results --------------------------------------------------------------------------------------------
total=$(elapsed)
write_summary "$total (total)"
{
  echo
  echo "======== summary"
  cat "$out/summary.txt"
} >>"$out/gpu-check.log"

# The dk bench table: from the header line to the end of stdout.
bench_table() { [ -s "$1" ] && sed -n '/^shape /,$p' "$1"; }

echo
echo "================ summary"
cat "$out/summary.txt"
for n in dk-bench-bf16 dk-bench-f32 dk-bench-short dk-bench-16k dk-bench-v1 dk-bench-smem dk-bench-stream dk-bench-persist dk-bench-persist256 dk-bench-short-persist dk-bench-short-persist256 dk-bench-persist-c4 dk-bench-persist-c8 dk-bench-persist-c16 dk-bench-moe dk-bench-moe-nopdl dk-bench-attention dk-bench-attention-wide dk-bench-attention-wgmma dk-bench-fused dk-bench-fused-persist; do
  echo
  echo "================ $n"
  if [ -s "$logs/$n.out" ]; then
    sed -n '2p' "$logs/$n.out"
    bench_table "$logs/$n.out"
  else
    echo "(no output)"
    tail -n 5 "$logs/$n.err" 2>/dev/null
  fi
done
# The variants side by side (the decision of which is the default), from the tables above.
cmp_variants() { # KIND NAME=STEP...: rows of the steps that ran, one column per variant
  local kind=$1 args=() a
  shift
  for a in "$@"; do [ -s "$logs/${a#*=}.out" ] && args+=("${a%%=*}=$logs/${a#*=}.out"); done
  [ "${#args[@]}" -ge 2 ] || return 0
  echo
  echo "================ variants side by side ($kind)"
  python3 "$root/scripts/compare-variants.py" "$kind" "${args[@]}" || true
}
cmp_variants divergence default=dk-bench-bf16 one-block=dk-bench-v1 stream=dk-bench-stream \
  smem=dk-bench-smem persist=dk-bench-persist persist256=dk-bench-persist256
cmp_variants divergence default=dk-bench-short persist=dk-bench-short-persist \
  persist256=dk-bench-short-persist256
cmp_variants attention default=dk-bench-attention wide=dk-bench-attention-wide \
  wgmma=dk-bench-attention-wgmma
echo
py_table() { # STEP FIRST-LINE-REGEX (empty: the last 40 lines): a python bench step's table
  echo "================ ${1//-/ }"
  if [ ! -s "$logs/$1.out" ]; then
    echo "(no stdout: the rows it finished, from its stderr)"
    tail -n 40 "$logs/$1.err" 2>/dev/null
  elif [ -n "$2" ]; then
    sed -n "/$2/,\$p" "$logs/$1.out"
  else
    tail -n 40 "$logs/$1.out"
  fi
  echo
}
py_table python-bench-attention '^Grouped-query attention'
py_table python-bench-attention-wide '^Grouped-query attention'
py_table python-bench-attention-wgmma '^Grouped-query attention'
py_table python-bench-fused '^Fused linear JSD'
py_table python-bench ''
for n in ncu-divergence ncu-divergence-persist ncu-divergence-persist256 ncu-moe-combine ncu-attention-fwd ncu-attention-bwd ncu-attention-bwd-atomic ncu-attention-fwd-wide ncu-attention-bwd-wide ncu-attention-fwd-wgmma ncu-attention-bwd-wgmma; do
  [ -s "$logs/$n.out" ] || continue
  echo
  echo "================ $n (Nsight Compute, clocks untouched)"
  grep -E '^  [a-z_0-9]+ \(|Duration|DRAM Throughput|Memory Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|SM Busy|Issue Slots Busy|highest-utilized|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|stalled' \
    "$logs/$n.out" | cut -c1-160
done
if [ -s "$logs/ncu-fused.out" ]; then
  echo
  echo "================ ncu-fused (our kernels in the first fused calls, per kernel name)"
  sed -n '/dk_/,$p' "$logs/ncu-fused.out" | grep -E 'dk_|gpu__time_duration' | cut -c1-160 | head -40
fi
echo
echo "gpu-check: $( [ "$required_failed" = 0 ] && echo PASSED || echo "FAILED ($required_failed required steps)" ) in ${total}s; logs in $out"
rm -rf "$logs" "$site"
[ "$required_failed" = 0 ]
