#!/usr/bin/env bash
# The one-shot GPU check. Runs ON the GPU machine, from the repository root, with gpu-bundle/
# (made here by scripts/build-gpu-bundle.sh) carried along. No Rust there: python3 with torch,
# triton, numpy, pytest and ml_dtypes.
#
#   bash scripts/gpu-check.sh
#
# Steps, each under its own time limit and all inside GPU_CHECK_BUDGET seconds (default 330); a
# failing step is recorded and the next one runs. A step may use its cap but not the time the
# selected steps after it are expected to need (expected_seconds), except that it may always use
# half of what is left. A benchmark or test that runs into its own cap (a hang) skips the later
# benchmarks, profiles and sanitizer runs of its variant (persist, persist256, staged, mma, wide,
# smem, stream); a test's also skips the variant's later tests. A full run goes in the order below; a
# call that names its steps (GPU_CHECK_ONLY) runs the card steps, then the tests (6), then the
# benchmarks (3-5c), then the rest: code that never ran on a card is checked before it is timed.
#   1. nvidia-smi one-liner
#   2. dk info
#   3. dk bench on CUDA, bf16, N=4096, 4 vocabs, all kinds, fwd+bwd and fwd
#   4. dk bench: f32 (every kind, 3 vocabs); N=256; N=16384 (3 vocabs); the one-block kernel alone
#      (DK_DIVERGENCE_CLUSTER=0), and the shared-memory and stream cluster variants forced onto
#      N=4096 (=smem, =stream), side by side with the default; version 6, the persistent
#      cluster kernels (=persist, =persist256), at their own cluster size and at 4, 8 and 16;
#      version 9, the staged cluster kernels (=staged), also at N=256 and at C=16, and their
#      JSD without the stash (version 10's A/B) and with the kept exponentials (version 11);
#      the gradient over the student logits (--passes fwd+bwd,in-place), default, persist, staged
#   5. dk bench --ops moe: route, permute, combine fwd/bwd, 3 ANCHORS shapes, N=16384; the bwd
#      rows again as two primitive kernels each (DK_MOE_BACKWARD=primitives, A/B of the fused ones)
#  5b. dk bench --ops attention: fwd, fwd+bwd, ANCHORS shapes + varlen, bf16, TFLOP/s; again with
#      the opt-in kernels (DK_ATTENTION_FWD=wide, DK_ATTENTION_BWD=wide), and with the mma.sync
#      kernels (DK_ATTENTION_FWD=mma, DK_ATTENTION_BWD=mma) beside the Hopper default, wgmma
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
#      are left; the divergence's kinds, logits dtypes and passes as PY_BENCH_* below say)
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
# the others are counted as not selected. GPU_CHECK_SKIP=a,b,...: leave out the steps whose names
# start with one of these (e.g. the benchmarks of code a run has not changed).
# GPU_CHECK_LIST=1: print the steps in the order this call would run them (selected or not, with
# their expected seconds) and run nothing; GPU_CHECK_ONLY / _SKIP entries that name no step are
# reported there, at the start of a run and in the summary.
# GPU_CHECK_PLAN=1|2|3a|3b|3c|3d|3e: the step lists of BENCHMARKS.md's "The next session's plan"
# (below).
# PYTEST_K: a pytest -k expression for step 8.
# PY_BENCH_OPS: the --ops of step 10 (default: divergence,moe); PY_BENCH_SHAPES: its divergence
# shapes (NxV list); PY_BENCH_IMPLS: its --impls (e.g. distill_kernels,num_items: this crate's
# rows only, with the num_items-tensor rows); PY_BENCH_KINDS / PY_BENCH_DTYPES / PY_BENCH_PASSES:
# its --kinds (forward_kl, reverse_kl, jsd), --dtypes (bf16, f32) and --passes (fwd+bwd, fwd),
# default bench.py's own (forward_kl,jsd; bf16; fwd+bwd); PY_BENCH_CAP: its time cap in seconds
# (default 240), PY_BENCH_EXPECTED the seconds it is expected to take (default 100);
# PY_BENCH_FULL_SECONDS: the seconds left under which step 10 runs --quick (default 150).
#
# Output: logs and JSON in $OUT (when set, as on the device tool; else ./gpu-check-out), at most
# 8 files, written as the steps end (a run stopped at the device tool's limit still returns the
# steps it finished): summary.txt (rewritten after every step), gpu-check.log (every step's
# output, appended as it ends), dk-bench.json, dk-bench-f32.json,
# dk-bench-moe.json, dk-bench-attention.json, python-bench-attention.json, python-bench.json.
# Printed last: the summary table of the selected steps (step, status, seconds), then their dk
# bench tables (divergence, f32, MoE, attention) and python bench tables (attention, then the
# rest). Exit status: 0 when every required step passed, else 1. The bundle's packed executables
# are unpacked into target/gpu-bundle-unpacked/ (not into gpu-bundle/, which must stay small
# enough to carry: scripts/gpu-bundle-ready.sh checks it before a device call).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bundle=${GPU_BUNDLE:-$root/gpu-bundle}
out=${OUT:-$root/gpu-check-out}
budget=${GPU_CHECK_BUDGET:-330}
GPU_CHECK_SKIP=${GPU_CHECK_SKIP:-}
GPU_CHECK_ONLY=${GPU_CHECK_ONLY:-}
# GPU_CHECK_PLAN=1|2|3a|3b|3c|3d|3e: the steps of BENCHMARKS.md's "The next session's plan" (kept here,
# in one place, so a device call names them instead of copying lists): sets GPU_CHECK_ONLY, and
# PYTEST_K / PY_BENCH_* where unset. GPU_CHECK_BUDGET stays the caller's.
case ${GPU_CHECK_PLAN:-} in
  "") ;;
  1) # run 5's failures after their fixes (divergence and fused tests, the atomic-dQ mode on
    # wgmma), the wgmma attention kernels as the Hopper default, the racecheck question
    plan_steps="nvidia-smi,dk-info,test-divergence_reference=,test-divergence_reference-persist="
    plan_steps+=",test-fused_reference=,test-fused_reference-v1,test-attention_reference="
    plan_steps+=",test-attention_reference-mma,racecheck-barrier-repro,racecheck-attention="
    plan_steps+=",memcheck-attention=,dk-bench-attention=,dk-bench-attention-mma,dk-bench-bf16"
    plan_steps+=",test-moe_backward" ;;
  2) # the Python face on CUDA (run 5's pytest was cut off after two failures) and the Python
    # benchmarks against SDPA (FA2, cuDNN), torch eager, torch.compile and Liger, MoE included
    plan_steps="nvidia-smi,liger-install,pytest,python-bench-attention=,python-bench="
    # run 5's subset (both of its failures were in it; the whole suite may not fit 240 s)
    PYTEST_K=${PYTEST_K:-contract or compile or examples or num_items or minus_inf} ;;
  3a) # issue 3's other shapes (N = 16384, f32 logits), the 256-thread persistent variant, the
    # sanitizers on the default attention kernels (issue 6)
    plan_steps="nvidia-smi,test-divergence_reference-persist256,test-fused_reference-persist256"
    plan_steps+=",dk-bench-16k=,dk-bench-f32=,dk-bench-persist256,dk-bench-short-persist256"
    plan_steps+=",dk-bench-inplace-persist,racecheck-attention=,memcheck-attention=,memcheck-persist=" ;;
  3b) # the fused and MoE rows again after any change there (the fused MoE backward kernels
    # beside their two primitives each), the profiles
    plan_steps="nvidia-smi,liger-install,python-bench-fused,dk-bench-fused=,dk-bench-moe="
    plan_steps+=",dk-bench-moe-primitives,memcheck-moe"
    plan_steps+=",ncu-fused,ncu-moe-route,ncu-moe-combine,ncu-attention-fwd=,ncu-attention-bwd=" ;;
  3c) # A/B rows: the wide attention kernels beside the default ones, the persistent cluster sizes
    plan_steps="nvidia-smi,test-attention_reference-wide,dk-bench-attention=,dk-bench-attention-wide"
    plan_steps+=",racecheck-attention-wide,ncu-attention-fwd-wide,ncu-attention-bwd-wide"
    plan_steps+=",dk-bench-persist=,dk-bench-persist-c,memcheck-persist256" ;;
  3e) # issue 3's version 9 (DK_DIVERGENCE_CLUSTER=staged: two rows' slices in shared memory per
    # block, the next copying while the current one is computed): correctness first, then its
    # rows beside the default's in the same run (long, short, in place, f32, the fused chunks),
    # memcheck, and its profile
    plan_steps="nvidia-smi,test-divergence_reference-staged=,test-fused_reference-staged="
    plan_steps+=",test-divergence_reference-staged-exp,test-fused_reference-staged-exp"
    plan_steps+=",dk-bench-bf16,dk-bench-staged=,dk-bench-short=,dk-bench-short-staged"
    plan_steps+=",dk-bench-inplace-staged,dk-bench-staged-c16,dk-bench-staged-nostash"
    plan_steps+=",dk-bench-staged-exp"
    plan_steps+=",dk-bench-staged-f32,dk-bench-fused="
    plan_steps+=",dk-bench-fused-staged"
    plan_steps+=",memcheck-staged,ncu-divergence-staged" ;;
  3d) # issue 3's rows beside the baselines that no other plan has: reverse KL, forward only and
    # f32 logits, against torch eager, torch.compile (a compile per kind, dtype and pass: most of
    # the step's time) and Liger, at one shape; first the jsdx kernels (JSD at β = 1e-3) beside
    # the ordinary JSD kernels in the same call
    plan_steps="nvidia-smi,dk-bench-jsdx,dk-bench-jsdx-base,liger-install,python-bench="
    PY_BENCH_OPS=${PY_BENCH_OPS:-divergence}
    PY_BENCH_SHAPES=${PY_BENCH_SHAPES:-4096x151936}
    PY_BENCH_KINDS=${PY_BENCH_KINDS:-forward_kl,reverse_kl,jsd}
    PY_BENCH_DTYPES=${PY_BENCH_DTYPES:-bf16,f32}
    PY_BENCH_PASSES=${PY_BENCH_PASSES:-fwd+bwd,fwd}
    PY_BENCH_CAP=${PY_BENCH_CAP:-480}
    PY_BENCH_EXPECTED=${PY_BENCH_EXPECTED:-300} ;;
  *) echo "gpu-check: GPU_CHECK_PLAN=$GPU_CHECK_PLAN: the plan's steps are 1, 2, 3a, 3b, 3c, 3d, 3e" >&2
     exit 2 ;;
esac
if [ -n "${GPU_CHECK_PLAN:-}" ]; then
  if [ -n "$GPU_CHECK_ONLY" ]; then
    echo "gpu-check: GPU_CHECK_PLAN and GPU_CHECK_ONLY both set: name the steps one way" >&2
    exit 2
  fi
  GPU_CHECK_ONLY=$plan_steps
fi
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
# archive. It is unpacked OUTSIDE the bundle (target/ is git-ignored and not carried): unpacked in
# place it made gpu-bundle/ ~84 MB, over what the device tool carries, after any dry run here.
# Unpacked again whenever the bundle's BUILD-INFO differs from the one it was unpacked from.
unpacked=${GPU_CHECK_UNPACKED:-$root/target/gpu-bundle-unpacked}
unpack_bundle() {
  if [ ! -f "$bundle/packed.tar.xz" ]; then
    rm -rf "$unpacked" # an older bundle's files must not stand in for this loose one's
    return 0
  fi
  if [ -f "$unpacked/BUILD-INFO" ] && cmp -s "$unpacked/BUILD-INFO" "$bundle/BUILD-INFO"; then
    return 0
  fi
  rm -rf "$unpacked" && mkdir -p "$unpacked" || return 1
  python3 - "$bundle/packed.tar.xz" "$unpacked" <<'PY' && cp "$bundle/BUILD-INFO" "$unpacked/BUILD-INFO"
import sys, tarfile

with tarfile.open(sys.argv[1]) as t:
    if hasattr(tarfile, "data_filter"):
        t.extractall(sys.argv[2], filter="data")
    else:
        t.extractall(sys.argv[2])
PY
}
# An executable or the static library: from the unpacked archive, or loose in an older bundle.
bundled() { # RELATIVE-PATH
  if [ -e "$unpacked/$1" ]; then echo "$unpacked/$1"; else echo "$bundle/$1"; fi
}

# ---- environment ----------------------------------------------------------------------------------
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
export DISTILL_KERNELS_LIB="$bundle/lib/libdistill_kernels.so"
# dk bench --json records it (the bundle's commit: no git on the GPU machine).
DK_BENCH_COMMIT=$(sed -n 's/^commit=//p' "$bundle/BUILD-INFO" 2>/dev/null || true)
export DK_BENCH_COMMIT
export CARGO_MANIFEST_DIR="$root"
dk="$bundle/bin/dk"
py=${PYTHON:-python3}

# Test executables carry paths of the build machine (env!("CARGO_MANIFEST_DIR")) and look for the
# library in the folder above their own (cargo's target/release/deps layout): point the build
# root at this checkout, and lay out target/release as a build would (the executables are copied,
# not linked, as the tests resolve their own path). Files are replaced where they differ (a warm
# machine keeps an older bundle's copies), by a new file: cargo's outputs in target/release are
# hard links into deps/, which a copy over them would rewrite. In a cargo build tree (a dry run
# on the build machine: target/release/.cargo-lock) the files cargo built are left alone.
setup_notes=""
copy_if_changed() { # SRC DEST
  [ -e "$1" ] || return 0
  if [ -e target/release/.cargo-lock ] && [ -e "$2" ]; then
    return 0
  fi
  cmp -s "$1" "$2" 2>/dev/null && return 0
  rm -f "$2" && cp "$1" "$2"
}
setup_tree() {
  local build_root name kind
  if ! unpack_bundle; then
    setup_notes+="could not unpack $bundle/packed.tar.xz (the test steps will fail); "
  fi
  build_root=$(sed -n 's/^build_root=//p' "$bundle/BUILD-INFO" 2>/dev/null)
  if [ -n "$build_root" ] && [ "$build_root" != "$root" ] && [ ! -e "$build_root" ]; then
    if mkdir -p "$(dirname "$build_root")" 2>/dev/null && ln -s "$root" "$build_root" 2>/dev/null; then
      setup_notes+="linked build root $build_root -> $root; "
    else
      setup_notes+="could not link build root $build_root (tests using it may fail); "
    fi
  fi
  mkdir -p target/release/deps target/tmp
  copy_if_changed "$bundle/lib/libdistill_kernels.so" target/release/libdistill_kernels.so
  # Its SONAME (libdistill_kernels.so.<DK_ABI_VERSION>, capi/build.rs): what the C programs
  # linked against it look for at run time.
  local abi
  abi=$(sed -n 's/^#define DK_ABI_VERSION \([0-9]*\)$/\1/p' include/distill_kernels.h)
  [ -n "$abi" ] && ln -sfn libdistill_kernels.so "target/release/libdistill_kernels.so.$abi"
  copy_if_changed "$dk" target/release/dk
  copy_if_changed "$(bundled lib/libdistill_kernels.a)" target/release/libdistill_kernels.a
  # The C ABI test links the bundle's libraries instead of building them (no cargo here).
  export DK_CAPI_TEST_LIB_DIR="$root/target/release"
  while IFS=$'\t' read -r name kind _; do
    [ "$name" = name ] || [ "$kind" = bench ] || copy_if_changed "$(bundled "tests/$name")" "target/release/deps/$name"
  done <"$bundle/tests/MANIFEST.tsv"
  if [ -d "$bundle/c-tests" ]; then
    cp -rn "$bundle/c-tests/." ./ 2>/dev/null || true
  fi
  # A bundle built from other sources than this tree's: its library would be refused by the
  # Python package (another header) or measure other code.
  if ! cmp -s "$bundle/include/distill_kernels.h" include/distill_kernels.h; then
    setup_notes+="STALE BUNDLE: gpu-bundle/include/distill_kernels.h differs from this tree's; "
  fi
  if [ -d "$bundle/python/distill_kernels" ] &&
    ! diff -rq -x __pycache__ "$bundle/python/distill_kernels" python/distill_kernels >/dev/null 2>&1; then
    setup_notes+="STALE BUNDLE: its python/distill_kernels differs from this tree's; "
  fi
}

# ---- step runner -----------------------------------------------------------------------------------
# Steps are listed first (LISTING=1: run_step / skip_step only record the name), then run. The
# listing gives every step's position, so a step knows the selected steps still to come: it may
# use its own cap, but not the time those are expected to need (expected_seconds), except that it
# may always use half of what is left (earlier steps come first).
names=()
statuses=()
seconds=()
required_failed=0
LISTING=0
all_steps=()       # every step, in the order of this call (listing pass)
declare -A pos=()  # step -> index in all_steps
hung=""            # variant words of steps that ran into their own cap (see run_step)
declare -A optional=() # step -> 1 when it is optional (listing pass)
declare -A cannot=()   # step -> 1 when it cannot run here (a tool or file missing: listing pass)
unmatched=""       # GPU_CHECK_ONLY / _SKIP entries that name no step
site=""            # where step 7 installs Liger (made before the steps run)
not_selected=0

# Written as the run goes, under $OUT (whose files come back even when the device tool stops the
# command at its limit): summary.txt after every step, and each step's output appended to
# gpu-check.log as soon as it ends. (At most 8 files come back: these two and the JSON files.)
# Only the selected steps are listed (GPU_CHECK_LIST=1 lists them all).
write_summary() {
  {
    echo "gpu-check of $(sed -n 's/^commit=//p' "$bundle/BUILD-INFO") ($(sed -n 's/^built_utc=//p' "$bundle/BUILD-INFO")), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    [ -s "$logs/nvidia-smi.out" ] && echo "card: $(head -n 1 "$logs/nvidia-smi.out")"
    [ -n "$setup_notes" ] && echo "setup: $setup_notes"
    [ -n "$unmatched" ] && echo "WARNING: GPU_CHECK_ONLY / _SKIP entries that name no step:$unmatched"
    printf '%-34s %-40s %8s\n' step status seconds
    for i in "${!names[@]}"; do
      printf '%-34s %-40s %8s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"
    done
    [ "$not_selected" -gt 0 ] && echo "($not_selected steps not selected by GPU_CHECK_ONLY / _SKIP)"
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

# What a step is expected to take on an H100 / H200 (runs 1-5; guesses for steps that never ran):
# the time kept for it while earlier steps run. Not a limit: each step has its own cap.
expected_seconds() {
  case $1 in
    nvidia-smi | dk-info | liger-install) echo 5 ;;
    dk-bench-bf16 | dk-bench-persist | dk-bench-persist256 | dk-bench-staged) echo 45 ;;
    dk-bench-16k) echo 75 ;;
    dk-bench-f32) echo 40 ;;
    dk-bench-staged-exp) echo 32 ;;  # both passes at two vocabularies (guess)
    dk-bench-short | dk-bench-short-* | dk-bench-moe-nopdl | dk-bench-jsdx*) echo 12 ;;
    dk-bench-*) echo 25 ;;
    test-divergence_reference*) echo 35 ;;
    test-fused_reference* | test-attention_reference*) echo 12 ;;  # run 5: 4.5-5.7 s
    test-moe*) echo 8 ;;  # a few small calls per device (guess; CPU part ~0.2 s)
    test-*) echo 15 ;;
    pytest) echo 200 ;;
    python-bench-fused) echo 110 ;;
    python-bench-attention*) echo 45 ;;
    python-bench) echo "${PY_BENCH_EXPECTED:-100}" ;;
    ncu-*) echo 30 ;;
    memcheck*) echo 12 ;;  # run 5: 4.7-5.8 s
    racecheck*) echo 30 ;;  # run 5: 17-24 s
    *) echo 20 ;;
  esac
}
# Seconds the selected steps after NAME are expected to take: those that can run (no tool
# missing, no hung variant), the optional ones counting for 60 s at most together.
expected_after() {
  local i n total=0 opt=0
  for ((i = ${pos[$1]:-${#all_steps[@]}} + 1; i < ${#all_steps[@]}; i++)); do
    n=${all_steps[$i]}
    want "$n" || continue
    [ -n "${cannot[$n]:-}" ] && continue
    skipped_as_hung "$n" >/dev/null && continue
    if [ -n "${optional[$n]:-}" ]; then
      opt=$((opt + $(expected_seconds "$n")))
    else
      total=$((total + $(expected_seconds "$n")))
    fi
  done
  [ "$opt" -gt 60 ] && opt=60
  echo $((total + opt))
}

# A benchmark or test that ran into its own cap (at least 5 s past its expected time: a hang,
# or far slower than planned) marks its variant (the word in its name: persist, persist256,
# staged, mma, wide, smem, stream): the later benchmarks, profiles and sanitizer runs of that variant
# are skipped, so one stuck kernel cannot eat the budget of every step after it. A test's mark
# skips the variant's later tests too; a benchmark's does not (tests are the evidence, each
# under its own cap). Profiler and sanitizer steps mark nothing (their instrumentation makes
# them slow).
variant_words="persist persist256 staged mma wide smem stream"
hung_tests=""      # variant words marked by a test
skipped_as_hung() { # STEP: the hung variant that skips it, if any
  local w marks=$hung
  case $1 in test-*) marks=$hung_tests ;; esac
  for w in $marks; do
    case "-$1-" in *"-$w-"*) echo "$w"; return 0 ;; esac
  done
  return 1
}
mark_hung() { # STEP CAP
  local v
  case $1 in ncu-* | memcheck* | racecheck*) return 0 ;; esac
  [ "$2" -ge $(($(expected_seconds "$1") + 5)) ] || return 0
  for v in $variant_words; do
    case "-$1-" in
      *"-$v-"*)
        hung+=" $v"
        case $1 in test-*) hung_tests+=" $v" ;; esac
        ;;
    esac
  done
}

record_skip() { # NAME STATUS
  names+=("$1"); statuses+=("$2"); seconds+=("0")
  echo "[$(elapsed)s] $1: $2"
  write_summary
}

# run_step NAME CAP_SECONDS REQUIRED(1|0) CMD...: stdout -> $logs/NAME.out, stderr -> $logs/NAME.err
run_step() {
  local name=$1 cap=$2 required=$3
  shift 3
  local l t status rc s1 s2 v half
  if [ "$LISTING" = 1 ]; then
    pos[$name]=${#all_steps[@]}
    all_steps+=("$name")
    [ "$required" = 1 ] || optional[$name]=1
    return 0
  fi
  if ! want "$name"; then
    not_selected=$((not_selected + 1))
    return 0
  fi
  if v=$(skipped_as_hung "$name"); then
    record_skip "$name" "skipped (a $v step hit its cap)"
    [ "$required" = 1 ] && required_failed=$((required_failed + 1))
    return 0
  fi
  l=$(left)
  half=$((l / 2))
  t=$((l - $(expected_after "$name")))
  [ "$t" -lt "$half" ] && t=$half
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 8 ]; then
    record_skip "$name" "skipped (out of time)"
    [ "$required" = 1 ] && required_failed=$((required_failed + 1))
    return 0
  fi
  echo "[$(elapsed)s] $name (limit ${t}s) ..."
  s1=$(now)
  # GPU_CHECK_STEP_LIMIT: the step's limit, for commands that pace themselves (python/bench.py
  # skips its baselines past it, this crate's rows still run).
  GPU_CHECK_STEP_LIMIT=$t timeout -k 5 "$t" "$@" >"$logs/$name.out" 2>"$logs/$name.err" </dev/null
  rc=$?
  s2=$(now)
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${t}s)" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  if { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "$t" = "$cap" ]; then
    mark_hung "$name" "$cap"
  fi
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

skip_step() { # NAME REASON (a selected step that cannot run here)
  if [ "$LISTING" = 1 ]; then
    run_step "$1" 0 0 true
    cannot[$1]=1
  elif ! want "$1"; then
    not_selected=$((not_selected + 1))
  else
    record_skip "$1" "skipped ($2)"
  fi
}

# A test executable of the bundle (MANIFEST.tsv), whether or not it is unpacked yet.
has_test() { grep -q "^$1	" "$bundle/tests/MANIFEST.tsv" 2>/dev/null; }

ncu_bin=$(command -v ncu || true)
sanitizer=$(command -v compute-sanitizer || true)

phase_card() {
  # ---- 1. the card --------------------------------------------------------------------------------------
  run_step nvidia-smi 15 1 nvidia-smi \
    --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader

  # ---- 2. dk info ------------------------------------------------------------------------------------------
  run_step dk-info 30 1 "$dk" info
}

phase_benches() {
  # ---- 3./4. dk bench on CUDA (first: the numbers this check is for) -------------------------
  run_step dk-bench-bf16 120 1 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 \
    --vocab 151936,200064,202048,262144 --kinds forward_kl,reverse_kl,jsd --json "$out/dk-bench.json"
  # Issue 3's f32 logits: every kind, vocabulary and pass at N = 4096 (8.6 GB of inputs at most).
  run_step dk-bench-f32 90 1 "$dk" bench --device cuda --ops divergence --dtype f32 --rows 4096 \
    --vocab 151936,202048,262144 --kinds forward_kl,reverse_kl,jsd --json "$out/dk-bench-f32.json"
  # Issue 3's other targets: a short batch (N = 256, rows split over a cluster), N = 16384, and
  # version 1 (one block per row, DK_DIVERGENCE_CLUSTER=0) side by side with the cluster kernel.
  # No JSON files for these (the device tool returns at most 8 files): their tables are printed
  # below and kept in gpu-check.log.
  run_step dk-bench-short 30 1 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 256 \
    --vocab 151936 --kinds forward_kl,jsd
  # JSD at an extreme β runs the jsdx kernels (series tails: cuda/DIVERGENCE.md, version 8),
  # never timed on a GPU; the base row is the ordinary JSD kernel at the same shape and call.
  run_step dk-bench-jsdx 30 0 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 \
    --vocab 151936 --kinds jsd --beta 0.001
  run_step dk-bench-jsdx-base 30 0 "$dk" bench --device cuda --ops divergence --dtype bf16 \
    --rows 4096 --vocab 151936 --kinds jsd --beta 0.5
  # N = 16384 on issue 3's three vocabularies, both passes (10 G input pairs made on the host).
  run_step dk-bench-16k 150 1 "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 16384 \
    --vocab 151936,202048,262144 --kinds forward_kl,reverse_kl,jsd --iters 5
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
  # Version 9 (issue 3): the staged cluster kernels (each block holds its slice of two rows in
  # shared memory and copies the next row while it computes the current one: DRAM traffic at the
  # floor, loads in flight through the reductions and barriers), issue 3's bf16 shapes, both
  # passes; then f32 logits (two rows of 262144 f32 pairs fit no cluster: the one-block kernel
  # serves them, and the output says so).
  run_step dk-bench-staged 90 1 env DK_DIVERGENCE_CLUSTER=staged "$dk" bench --device cuda \
    --ops divergence --dtype bf16 --rows 4096 --vocab 151936,202048,262144 \
    --kinds forward_kl,reverse_kl,jsd
  run_step dk-bench-staged-f32 45 0 env DK_DIVERGENCE_CLUSTER=staged "$dk" bench --device cuda \
    --ops divergence --dtype f32 --rows 4096 --vocab 151936,202048 --kinds forward_kl,jsd
  # Its cluster size 16 at V = 151936 (76 KB per buffer; the default is 8, one block of 152 KB
  # per SM): more, shorter slices per row.
  run_step dk-bench-staged-c16 30 0 env DK_DIVERGENCE_CLUSTER=staged DK_DIVERGENCE_CLUSTER_SIZE=16 \
    "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 --vocab 151936 \
    --kinds forward_kl,jsd --passes fwd+bwd
  # Version 10 (issue 3): the staged JSD kernels keep log2(q/m) from the mixture pass for the
  # gradient (9.25 -> 7.25 MUFU and 66 -> 53 instructions per element); here without it, beside
  # dk-bench-staged's rows (at 202048 the stash's slice takes the cluster from 8 to 16 blocks).
  run_step dk-bench-staged-nostash 30 0 env DK_DIVERGENCE_CLUSTER=staged DK_DIVERGENCE_JSD_STASH=0 \
    "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 --vocab 151936,202048 \
    --kinds jsd --passes fwd+bwd
  # Versions 11-12 (opt-in): the statistics pass keeps the exponentials too (4 MUFU and ~45
  # instructions per element; C = 16 at both vocabularies, 16 bytes per slice element), forward
  # only too (~39 instructions and 4 MUFU per element, against version 9's 43 and 6.25).
  run_step dk-bench-staged-exp 40 0 env DK_DIVERGENCE_CLUSTER=staged DK_DIVERGENCE_JSD_STASH=exp \
    "$dk" bench --device cuda --ops divergence --dtype bf16 --rows 4096 --vocab 151936,202048 \
    --kinds jsd --passes fwd+bwd,fwd
  # Issue 3's short batch (N = 256, default: stream clusters at 32.8 % on the H200) on each variant.
  for p in persist persist256 staged; do
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
  run_step dk-bench-inplace-staged 40 0 env DK_DIVERGENCE_CLUSTER=staged "$dk" bench \
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
  # The backward passes with the weights' gradient as their two primitive kernels each (A/B for
  # the fused combine-dot / permute-dot kernels of the default: compare the "bwd" rows).
  run_step dk-bench-moe-primitives 45 0 env DK_MOE_BACKWARD=primitives "$dk" bench --device cuda \
    --ops moe --dtype bf16 --tokens 16384 --moe-shapes scout,maverick,qwen3

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
  # A/B: the mma.sync kernels (the default off Hopper) against the default wgmma kernels of an
  # H100 / H200 (cuda/ATTENTION.md, "Forward on wgmma", "Backward on wgmma"; run 5: 1.45-1.67x).
  run_step dk-bench-attention-mma 60 0 env DK_ATTENTION_FWD=mma DK_ATTENTION_BWD=mma "$dk" \
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
  # A/B: the chunks' f32 rows on the staged cluster kernel (version 9: 16 blocks of 197 KB at
  # V 200064, each logit read once), which writes G over S's own row (cuda/FUSED.md, version 4).
  run_step dk-bench-fused-staged 45 0 env DK_DIVERGENCE_CLUSTER=staged "$dk" bench --device cuda \
    --ops fused --dtype bf16 --iters 5 --check-rows 2
}

phase_tests() {
  # ---- 6. Rust test executables (CUDA variants run when a GPU is present) ------------------------------
  while IFS=$'\t' read -r name kind _src _built; do
    [ "$name" = name ] && continue
    [ "$kind" = bench ] && continue
    run_step "test-$name" 90 1 "target/release/deps/$name"
  done <"$bundle/tests/MANIFEST.tsv"
  # Every path stays correct on Hopper: the default (one block per row from 512 rows, stream
  # clusters below), the one-block kernel alone, and each cluster variant on every row count.
  # test-NAME-STEP for each STEP:VALUE of DK_DIVERGENCE_CLUSTER (v1:0 is the one-block kernel).
  local v
  if has_test divergence_reference; then
    for v in v1:0 smem:smem stream:stream persist:persist persist256:persist256 staged:staged; do
      run_step "test-divergence_reference-${v%%:*}" 90 1 env DK_DIVERGENCE_CLUSTER="${v#*:}" \
        target/release/deps/divergence_reference
    done
    # The staged JSD kernels with the statistics pass's exponentials kept (version 11, opt-in).
    run_step test-divergence_reference-staged-exp 90 1 env DK_DIVERGENCE_CLUSTER=staged \
      DK_DIVERGENCE_JSD_STASH=exp target/release/deps/divergence_reference
  fi
  # The fused linear divergence with every chunk on one block per row (v1): on Hopper its small
  # test shapes otherwise run the cluster row kernels and the separate conversion pass, so this is
  # what checks dk_div_fused_* (G written over S by the chunk's divergence, cuda/FUSED.md version
  # 2); and on the persistent kernels that write G over the previous row of their cluster
  # (dk_divcp_fused_*, cuda/FUSED.md version 3).
  if has_test fused_reference; then
    for v in v1:0 persist:persist persist256:persist256 staged:staged; do
      run_step "test-fused_reference-${v%%:*}" 90 1 env DK_DIVERGENCE_CLUSTER="${v#*:}" \
        target/release/deps/fused_reference
    done
    # Version 11 on the fused chunks (the test's small vocabularies fit its kept exponentials).
    run_step test-fused_reference-staged-exp 90 1 env DK_DIVERGENCE_CLUSTER=staged \
      DK_DIVERGENCE_JSD_STASH=exp target/release/deps/fused_reference
  fi
  if has_test attention_reference; then
    run_step test-attention_reference-wide 90 1 env DK_ATTENTION_FWD=wide DK_ATTENTION_BWD=wide \
      target/release/deps/attention_reference
    run_step test-attention_reference-mma 90 1 env DK_ATTENTION_FWD=mma DK_ATTENTION_BWD=mma \
      target/release/deps/attention_reference
  fi
}

phase_python() {
  # ---- 7. Liger-Kernel from the carried wheel ---------------------------------------------------------
  if compgen -G "$bundle/wheels/liger*.whl" >/dev/null; then
    run_step liger-install 60 0 "$py" -m pip install -q --no-index --no-deps --no-compile \
      --disable-pip-version-check --target "$site" "$bundle"/wheels/liger*.whl
  else
    skip_step liger-install "no wheel in $bundle/wheels"
  fi

  # ---- 8. Python tests (torch tests on CUDA) --------------------------------------------------------
  # PYTEST_K: a pytest -k expression to run a subset (a second call after a fix).
  # -v: each test's verdict as it ends, so a step cut off at its cap still names its failures
  # (run 5, 2026-11-28: two F marks, then the 120 s cap, and no name); --durations: the slow ones.
  run_step pytest 240 1 "$py" -m pytest python/tests -v -rfs --durations=15 -p no:cacheprovider \
    ${PYTEST_K:+-k "$PYTEST_K"}

  # ---- 9. Python benchmark of attention against SDPA's flash (FA2) and cuDNN backends -------------
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
      run_step python-bench-attention-mma 60 0 env DK_ATTENTION_FWD=mma DK_ATTENTION_BWD=mma \
        "$py" python/bench.py --ops attention --impls distill "${aquick[@]}"
    else
      skip_step python-bench-attention-mma "out of time"
    fi
  else
    skip_step python-bench-attention "python/bench.py missing"
    skip_step python-bench-attention-wide "python/bench.py missing"
    skip_step python-bench-attention-mma "python/bench.py missing"
  fi

  # ---- 9b. Python benchmark of the fused linear JSD (issue 4): torch eager, torch.compile, Liger's
  # chunked and fused-linear JSD, this crate, and the four GEMMs alone, from one run. No JSON (at
  # most 8 files come back): the table is printed below and kept in the log.
  if [ -f python/bench.py ]; then
    fquick=()
    [ "$(left)" -lt 170 ] && fquick=(--quick)
    # 150 s (~110 expected): this crate's rows and the GEMMs of both shapes first (~30-40 s), then
    # torch eager, LigerFusedLinearJSD (~1.2 s a call at Scout, 3 samples for calls over 100 ms)
    # and torch.compile of Liger's chunked loss (15-40 s per shape); rows print as they finish.
    run_step python-bench-fused 150 1 "$py" python/bench.py --ops fused "${fquick[@]}"
  else
    skip_step python-bench-fused "python/bench.py missing"
  fi

  # ---- 10. Python benchmark against torch eager, torch.compile, Liger ------------------------------
  if [ -f python/bench.py ]; then
    quick=()
    [ "$(left)" -lt "${PY_BENCH_FULL_SECONDS:-150}" ] && quick=(--quick)
    # PY_BENCH_SHAPES: NxV list for the divergence rows (issue 3's shapes, e.g.
    # 4096x262144,16384x151936,256x151936); default bench.py's own.
    run_step python-bench "${PY_BENCH_CAP:-240}" 1 "$py" python/bench.py \
      --ops "${PY_BENCH_OPS:-divergence,moe}" "${quick[@]}" \
      ${PY_BENCH_SHAPES:+--shapes "$PY_BENCH_SHAPES"} ${PY_BENCH_IMPLS:+--impls "$PY_BENCH_IMPLS"} \
      ${PY_BENCH_KINDS:+--kinds "$PY_BENCH_KINDS"} ${PY_BENCH_DTYPES:+--dtypes "$PY_BENCH_DTYPES"} \
      ${PY_BENCH_PASSES:+--passes "$PY_BENCH_PASSES"} --json "$out/python-bench.json"
  else
    skip_step python-bench "python/bench.py missing"
  fi
}

phase_profile() {
  # ---- 10b. optional: Nsight Compute sections of the key kernels (what limits them) ----------------
  # One launch per kernel (the first that matches: a checked run), --clock-control none (the card's
  # clocks are left alone). SpeedOfLight gives DRAM / L1+shared / L2 / SM throughput as % of peak;
  # ComputeWorkloadAnalysis names the busiest pipe (tensor, FMA, XU = MUFU, LSU) in its rule text.
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
  # Launch count 4: each kind's checked run and first timed run (2 would profile forward KL only).
  DK_DIVERGENCE_CLUSTER=persist ncu_run ncu-divergence-persist 40 'dk_divcp_(fkl|jsd)_bf16_bf16' 4 \
    --ops divergence --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd \
    --passes fwd+bwd --iters 1 --check-rows 2
  DK_DIVERGENCE_CLUSTER=persist256 ncu_run ncu-divergence-persist256 40 \
    'dk_divcp256_(fkl|jsd)_bf16_bf16' 4 --ops divergence --dtype bf16 --rows 4096 --vocab 151936 \
    --kinds forward_kl,jsd --passes fwd+bwd --iters 1 --check-rows 2
  # Version 9: is it at the DRAM roofline (DRAM throughput near its peak at the floor's bytes), or
  # issue- / MUFU-bound (the busiest pipe), or waiting at its barriers?
  DK_DIVERGENCE_CLUSTER=staged ncu_run ncu-divergence-staged 40 'dk_divcq_(fkl|jsd)_bf16_bf16' 4 \
    --ops divergence --dtype bf16 --rows 4096 --vocab 151936 --kinds forward_kl,jsd \
    --passes fwd+bwd --iters 1 --check-rows 2
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
  # The default on an H100 / H200: the wgmma kernels (both backward modes run dkdvg + dqg).
  ncu_run ncu-attention-fwd 40 'dk_attn_fwd_bf16_d128g' 1 --ops attention --dtype bf16 \
    --attn-shapes phi4-mini --iters 1 --check-rows 2
  ncu_run ncu-attention-bwd 40 'dk_attn_bwd_(dkdvg|dqg)_bf16_d128' 2 --ops attention --dtype bf16 \
    --attn-shapes phi4-mini --iters 1 --check-rows 2
  # The mma.sync kernels (DK_ATTENTION_*=mma: the default off Hopper), both backward modes.
  DK_ATTENTION_FWD=mma ncu_run ncu-attention-fwd-mma 40 'dk_attn_fwd_bf16_d128' 1 \
    --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
  DK_ATTENTION_BWD=mma ncu_run ncu-attention-bwd-mma 40 'dk_attn_bwd_(dkdv|dq)_bf16_d128' 2 \
    --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
  DK_ATTENTION_BWD=mma ncu_run ncu-attention-bwd-atomic 40 'dk_attn_bwd_dkdvdq_bf16_d128' 1 \
    --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
  DK_ATTENTION_FWD=wide ncu_run ncu-attention-fwd-wide 40 'dk_attn_fwd_bf16_d128w' 1 \
    --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
  DK_ATTENTION_BWD=wide ncu_run ncu-attention-bwd-wide 40 'dk_attn_bwd_(dkdvw|dqw)_bf16_d128' 2 \
    --ops attention --dtype bf16 --attn-shapes phi4-mini --iters 1 --check-rows 2
}

phase_sanitizer() {
  # ---- 11. optional: memcheck of small dk benches (divergence, MoE, attention), racecheck ----------
  # san_step NAME ENV... -- TOOL DK_BENCH_ARGS...: compute-sanitizer over a small dk bench.
  san_step() {
    local name=$1 envs=()
    shift
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    local tool=$1
    shift
    if [ -z "$sanitizer" ]; then
      skip_step "$name" "compute-sanitizer not found"
    elif [ "$LISTING" = 0 ] && want "$name" && [ "$(left)" -lt 30 ]; then
      skip_step "$name" "out of time"
    else
      run_step "$name" 60 0 env "${envs[@]}" "$sanitizer" --tool "$tool" --error-exitcode 3 \
        "$dk" bench --device cuda "$@"
    fi
  }
  san_step memcheck -- memcheck --ops divergence --rows 64 --vocab 1000,151936 --iters 1 \
    --check-rows 4 --kinds forward_kl,jsd
  # The persistent cluster kernels (versions 6 and 9): 300 rows over fewer clusters, so each
  # walks several rows (the reference tests cover ignored, masked and unaligned-tail rows).
  for p in persist persist256 staged; do
    san_step "memcheck-$p" DK_DIVERGENCE_CLUSTER=$p -- memcheck --ops divergence --rows 300 \
      --vocab 1000,151936 --iters 1 --check-rows 4 --kinds forward_kl,jsd
  done
  # Every MoE kernel (top-k P = 1 and 4, scan, assign, permute, combine, slot-dot) on 300 tokens
  # (not a multiple of the 32-token chunk).
  san_step memcheck-moe -- memcheck --ops moe --tokens 300 --iters 1 --check-rows 8
  # Every attention kernel (forward, backward; D 64 and 128; padded Sq != Sk, and varlen with an
  # empty sequence, a 1-token one and rows that see no key) on the small shapes.
  # Then the same with the opt-in kernels (DK_ATTENTION_FWD=wide, DK_ATTENTION_BWD=wide), and
  # with the mma.sync kernels (DK_ATTENTION_FWD=mma, DK_ATTENTION_BWD=mma; the default off an
  # H100 / H200, whose default is the wgmma kernels). The default kernels:
  # the switches empty (a value outside README's table is refused).
  # Whether racecheck's hazards on the wgmma kernels (run 5) come from its model of the
  # bar.arrive / bar.sync ping-pong: a 30-line program with the same barriers and no wgmma
  # (scripts/racecheck-barrier-repro.cu says what each outcome means). Its output is the
  # finding; the step fails only if the program computes wrong values or does not build.
  local dev_nvcc
  dev_nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if [ "$LISTING" = 1 ] || { [ -n "$sanitizer" ] && [ -x "$dev_nvcc" ]; }; then
    # All modes once plainly (every value right, else the step fails), then each mode in its own
    # racecheck process, so that each summary line belongs to one mode.
    run_step racecheck-barrier-repro 40 0 bash -c '"$3" -O2 -arch=sm_90a -o "$1/barrier-repro" \
      scripts/racecheck-barrier-repro.cu && "$1/barrier-repro" || exit 1
      for m in 0 1 2; do
        echo "== racecheck, mode $m"
        "$2" --tool racecheck "$1/barrier-repro" "$m" 2>&1 | grep -E "RACECHECK SUMMARY|Race reported"
      done; exit 0' _ "${TMPDIR:-/tmp}" "$sanitizer" "$dev_nvcc"
  else
    skip_step racecheck-barrier-repro "compute-sanitizer or nvcc not found"
  fi
  local variant tool name value
  for variant in default wide mma; do
    for tool in memcheck racecheck; do
      name="$tool-attention"
      value=
      [ "$variant" != default ] && name="$tool-attention-$variant" && value=$variant
      san_step "$name" DK_ATTENTION_FWD="$value" DK_ATTENTION_BWD="$value" -- "$tool" \
        --ops attention --attn-shapes small,small-varlen --iters 1 --check-rows 4
    done
  done
}

# ---- the order; GPU_CHECK_LIST ------------------------------------------------------------------
# A full run measures first (the numbers this check is for). A call that names its steps
# (GPU_CHECK_ONLY) checks first: its tests are of code that has not run on a card yet, and a
# benchmark of a wrong kernel measures nothing.
if [ -n "${GPU_CHECK_ONLY:-}" ]; then
  order=(phase_card phase_tests phase_benches phase_python phase_profile phase_sanitizer)
else
  order=(phase_card phase_benches phase_tests phase_python phase_profile phase_sanitizer)
fi
LISTING=1
for phase in "${order[@]}"; do "$phase"; done
LISTING=0
for w in ${GPU_CHECK_ONLY//,/ } ${GPU_CHECK_SKIP//,/ }; do
  hit=0
  for n in "${all_steps[@]}"; do
    if matches "$n" "$w"; then hit=1; break; fi
  done
  [ "$hit" = 1 ] || unmatched+=" $w"
done
selected=0
planned=0
for n in "${all_steps[@]}"; do
  if want "$n"; then
    selected=$((selected + 1))
    planned=$((planned + $(expected_seconds "$n")))
  fi
done
plan_line="$selected of ${#all_steps[@]} steps selected, expected ~${planned} s against a budget of ${budget} s"
if [ -n "${GPU_CHECK_LIST:-}" ]; then
  # GPU_CHECK_LIST=1: the steps in the order this call would run them; nothing runs.
  printf '%-34s %-9s %s\n' step selected expected_s
  for n in "${all_steps[@]}"; do
    if want "$n"; then
      printf '%-34s %-9s %s\n' "$n" yes "$(expected_seconds "$n")"
    else
      printf '%-34s %-9s %s\n' "$n" - -
    fi
  done
  echo "$plan_line"
  [ -n "$unmatched" ] && echo "WARNING: GPU_CHECK_ONLY / _SKIP entries that name no step:$unmatched"
  rm -rf "$logs"
  exit 0
fi

# ---- run ------------------------------------------------------------------------------------------
setup_tree
site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX") # Liger's wheel (step 7)
export PYTHONPATH="$root/python:$site${PYTHONPATH:+:$PYTHONPATH}"
{
  cat "$bundle/BUILD-INFO"
  [ -n "$setup_notes" ] && echo "setup: $setup_notes"
  [ -n "$unmatched" ] && echo "WARNING: GPU_CHECK_ONLY / _SKIP entries that name no step:$unmatched"
  echo "$plan_line"
  echo "(each step's output follows as it ends; the summary is in summary.txt and at the end)"
} >"$out/gpu-check.log"
echo "gpu-check: $plan_line"
[ -n "$setup_notes" ] && echo "gpu-check setup: $setup_notes"
[ -n "$unmatched" ] && echo "gpu-check WARNING: GPU_CHECK_ONLY / _SKIP entries that name no step:$unmatched"
for phase in "${order[@]}"; do "$phase"; done

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
for n in "${all_steps[@]}"; do
  case $n in dk-bench-*) want "$n" || continue ;; *) continue ;; esac
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
  smem=dk-bench-smem persist=dk-bench-persist persist256=dk-bench-persist256 \
  staged=dk-bench-staged staged-c16=dk-bench-staged-c16 staged-nostash=dk-bench-staged-nostash \
  staged-exp=dk-bench-staged-exp
cmp_variants divergence default=dk-bench-short persist=dk-bench-short-persist \
  persist256=dk-bench-short-persist256 staged=dk-bench-short-staged
cmp_variants attention default=dk-bench-attention wide=dk-bench-attention-wide \
  mma=dk-bench-attention-mma
echo
py_table() { # STEP FIRST-LINE-REGEX (empty: the last 40 lines): a python bench step's table
  want "$1" || return 0
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
py_table python-bench-attention-mma '^Grouped-query attention'
py_table python-bench-fused '^Fused linear JSD'
py_table python-bench ''
for n in ncu-divergence ncu-divergence-persist ncu-divergence-persist256 ncu-divergence-staged ncu-moe-combine ncu-attention-fwd ncu-attention-bwd ncu-attention-bwd-atomic ncu-attention-fwd-wide ncu-attention-bwd-wide ncu-attention-fwd-mma ncu-attention-bwd-mma; do
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
[ -n "$unmatched" ] && echo "gpu-check WARNING: GPU_CHECK_ONLY / _SKIP entries that name no step:$unmatched"
echo "gpu-check: $( [ "$required_failed" = 0 ] && echo PASSED || echo "FAILED ($required_failed required steps)" ) in ${total}s; logs in $out"
rm -rf "$logs" "$site"
[ "$required_failed" = 0 ]
