#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh needs, HERE (Rust, no GPU), into gpu-bundle/ (git-ignored),
# for a GPU machine that has python3 + torch but no Rust:
#
#   gpu-bundle/bin/dk                        the dk command (kernels embedded)
#   gpu-bundle/lib/libdistill_kernels.so     the C ABI library (kernels embedded), for Python and C
#   gpu-bundle/packed.tar.xz                 tests/<name>: every Rust test executable with a CUDA part
#                                            (hash suffix stripped; the host-only simulators and
#                                            layout probe stay), and lib/libdistill_kernels.a when
#                                            the C test links it statically: one solid xz archive,
#                                            unpacked by gpu-check.sh (each executable embeds the
#                                            same kernels; solid, they are stored about once)
#   gpu-bundle/tests/MANIFEST.tsv            name, target kind, source, original executable
#   gpu-bundle/include/                      the public C header
#   gpu-bundle/python/                       the Python package source (and its tests, bench.py)
#   gpu-bundle/c-tests/                      C sources under tests/ and capi/tests/ (if any)
#   gpu-bundle/wheels/                       the Liger-Kernel wheel (its deps are on the GPU machine)
#   gpu-bundle/BUILD-INFO                    commit, dirty state, date, toolchain, build root
#
# The kernels MUST compile (DISTILL_KERNELS_REQUIRE_NVCC=1, zero spills) with the pinned nvcc from
# scripts/install-cuda-toolchain.sh (or $NVCC when set). Binaries are stripped; the bundle must stay
# well under the 64 MiB the device tool carries.
#
# usage: bash scripts/build-gpu-bundle.sh
# env:   NVCC (skip the install), LIGER_VERSION (default 0.8.5, the version of ANCHORS.md;
#        'latest' for the newest), BUNDLE_STATIC=1 (also carry libdistill_kernels.a),
#        NO_LIGER=1 (skip the wheel)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bundle="$root/gpu-bundle"
liger_version=${LIGER_VERSION:-0.8.5}
max_mib=56

say() { echo "== $*" >&2; }

# ---- the pinned compiler ------------------------------------------------------------------------
if [ -z "${NVCC:-}" ]; then
  NVCC=$(bash scripts/install-cuda-toolchain.sh | tail -n 1)
fi
export NVCC DISTILL_KERNELS_REQUIRE_NVCC=1
say "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*' || echo '?'))"

# ---- build ----------------------------------------------------------------------------------------
say "cargo build --release (kernels required)"
cargo build --release
release="$(bash scripts/cargo-target-dir.sh)/release"

# The test command's profile (release without cross-crate LTO, whose link step ran once per test
# executable): the same kernels, the same optimisation of the code under test, minutes less.
say "cargo test --profile release-tests --no-run (collecting the test executables)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo test --profile release-tests --no-run --message-format=json-render-diagnostics >"$tmp/build.json"

python3 - "$tmp/build.json" >"$tmp/tests.tsv" <<'PY'
import json, os, sys

seen = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg.get("profile", {}).get("test"):
        continue
    t = msg["target"]
    kinds = t["kind"]
    name = t["name"]
    if "test" in kinds:
        kind, out = "test", name
    elif "bench" in kinds:
        kind, out = "bench", "bench-" + name
    elif "bin" in kinds:
        kind, out = "bin", "unit-bin-" + name
    else:
        # The C ABI crate's library is named distill_kernels too: its unit tests are unit-capi-*.
        member = os.path.relpath(os.path.dirname(msg.get("manifest_path", "")), os.getcwd())
        prefix = "unit-capi-" if member == "capi" else "unit-"
        kind, out = "lib", prefix + name
    src = os.path.relpath(t["src_path"], os.getcwd())
    if out in seen and seen[out][3] != msg["executable"]:
        sys.exit(f"two test executables would be carried as {out}: {seen[out][2]} and {src}")
    seen[out] = (out, kind, src, msg["executable"])
for out in sorted(seen):
    print("\t".join(seen[out]))
PY

if [ ! -s "$tmp/tests.tsv" ]; then
  echo "no test executables found in the cargo output" >&2
  exit 1
fi

# ---- assemble -------------------------------------------------------------------------------------
say "assembling $bundle"
rm -rf "$bundle"
mkdir -p "$bundle"/{bin,lib,tests,include,wheels}
strip_into() { # src dst
  cp "$1" "$2"
  if command -v strip >/dev/null; then strip --strip-unneeded "$2" 2>/dev/null || strip "$2" || true; fi
  chmod +x "$2"
}
strip_into "$release/dk" "$bundle/bin/dk"
strip_into "$release/libdistill_kernels.so" "$bundle/lib/libdistill_kernels.so"
chmod -x "$bundle/lib/libdistill_kernels.so"
if [ "${BUNDLE_STATIC:-0}" = 1 ] || grep -rqs -e 'distill_kernels\.a' -e 'static=distill_kernels' tests/ capi/tests/; then
  # Debug sections of the archive are not needed to link the C test (30 MB instead of 39 MB).
  cp "$release/libdistill_kernels.a" "$tmp/libdistill_kernels.a"
  command -v strip >/dev/null && strip --strip-debug "$tmp/libdistill_kernels.a"
  cp "$tmp/libdistill_kernels.a" "$bundle/lib/libdistill_kernels.a" # packed below
fi

# Host-only tests (no CUDA part: the kernel arithmetic / emulators and the C layout probe) run in
# CI; carrying them would only take room from the 64 MiB the device tool carries.
host_only="kernel_sim moe_kernel_sim attention_kernel_sim divergence_persistent_sim"
host_only+=" divergence_fused_sim divergence_prepare_sim moe_kernels_emulated"

printf 'name\tkind\tsource\tbuilt_as\n' >"$bundle/tests/MANIFEST.tsv"
while IFS=$'\t' read -r name kind src exe; do
  case " $host_only " in *" $name "*) continue ;; esac
  strip_into "$exe" "$bundle/tests/$name"
  printf '%s\t%s\t%s\t%s\n' "$name" "$kind" "$src" "$exe" >>"$bundle/tests/MANIFEST.tsv"
done <"$tmp/tests.tsv"

cp -r include/. "$bundle/include/"
mkdir -p "$bundle/python"
(cd python && find . -type f \
  ! -path '*/__pycache__/*' ! -path '*/.pytest_cache/*' ! -path './build/*' ! -name '*.egg-info' \
  -print0 | while IFS= read -r -d '' f; do
    mkdir -p "$bundle/python/$(dirname "$f")"
    cp "$f" "$bundle/python/$f"
  done)
c_sources=$(find tests capi/tests -type f \( -name '*.c' -o -name '*.cpp' -o -name '*.h' \) 2>/dev/null || true)
if [ -n "$c_sources" ]; then
  mkdir -p "$bundle/c-tests"
  for f in $c_sources; do
    mkdir -p "$bundle/c-tests/$(dirname "$f")"
    cp "$f" "$bundle/c-tests/$f"
  done
fi

# ---- Liger-Kernel wheel (pure Python; torch and triton are on the GPU machine) ------------------
if [ "${NO_LIGER:-0}" != 1 ]; then
  spec=liger-kernel
  [ "$liger_version" != latest ] && spec="liger-kernel==$liger_version"
  say "pip download $spec"
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --python-version 3.12 -d "$bundle/wheels" "$spec"; then
    echo "warning: could not download $spec; gpu-check.sh will run without Liger" >&2
  fi
fi

# ---- build info -------------------------------------------------------------------------------------
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -vc '^??' || true)
untracked=$(git status --porcelain 2>/dev/null | grep -c '^??' || true)
{
  echo "commit=$commit"
  echo "modified_tracked_files=$dirty"
  echo "untracked_files=$untracked"
  echo "built_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "build_root=$root"
  echo "rustc=$(rustc --version)"
  echo "nvcc=$("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo unknown)"
  echo "archs=$("$release/dk" info | sed -n 's/^GPU archs: *//p')"
  echo "crate_version=$("$release/dk" --version | awk '{print $2}')"
  echo "liger_wheel=$(cd "$bundle/wheels" && ls 2>/dev/null | tr '\n' ' ')"
} >"$bundle/BUILD-INFO"

# ---- checks -------------------------------------------------------------------------------------------
info=$("$bundle/bin/dk" info)
grep -q 'compiled with nvcc' <<<"$info" || { echo "bundle dk has no kernels:" >&2; echo "$info" >&2; exit 1; }
for f in bin/dk lib/libdistill_kernels.so include/distill_kernels.h python/distill_kernels/__init__.py; do
  [ -e "$bundle/$f" ] || { echo "bundle incomplete: $f missing" >&2; exit 1; }
done
echo
cat "$bundle/BUILD-INFO"
echo
echo "test executables:"
tail -n +2 "$bundle/tests/MANIFEST.tsv" | while IFS=$'\t' read -r name kind src _; do
  printf '  %-36s %-5s %s (%s KiB)\n' "$name" "$kind" "$src" $(( $(stat -c %s "$bundle/tests/$name") / 1024 ))
done

# ---- one solid xz archive of the test executables and the static library ------------------------
# Every test executable embeds the same fatbin and much of the same code: a solid archive (xz's
# 64 MiB window) stores that about once, where separate files carry it once per executable.
say "packing the test executables and the static library (xz, solid)"
python3 - "$bundle" <<'PY'
import lzma, os, sys, tarfile

b = sys.argv[1]
members = sorted(os.path.join("tests", n) for n in os.listdir(os.path.join(b, "tests"))
                 if n != "MANIFEST.tsv")
if os.path.exists(os.path.join(b, "lib", "libdistill_kernels.a")):
    members.append(os.path.join("lib", "libdistill_kernels.a"))
with tarfile.open(os.path.join(b, "packed.tar.xz"), "w:xz", preset=9 | lzma.PRESET_EXTREME) as t:
    for m in members:
        t.add(os.path.join(b, m), arcname=m)
for m in members:
    os.remove(os.path.join(b, m))
PY
bytes=$(du -sb "$bundle" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo
du -sh "$bundle"/* | sed 's/^/  /'
echo "gpu-bundle: $bytes bytes (${mib} MiB; the device tool carries at most 64 MiB with the working tree)"
if [ "$mib" -gt "$max_mib" ]; then
  echo "gpu-bundle is over ${max_mib} MiB: too big to carry alongside the working tree" >&2
  exit 1
fi
