#!/usr/bin/env bash
# Checks, HERE and right before the device call, that gpu-bundle/ can be carried and measures
# this tree: built from HEAD with nothing modified since, still packed (a bundle unpacked in place
# by an older gpu-check.sh is ~84 MB), and, with the working tree, under what the device tool
# carries (64 MiB in all). Exit 0 and one line when ready; else each problem and exit 1.
#
#   bash scripts/gpu-bundle-ready.sh && <device call>
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bundle=${GPU_BUNDLE:-$root/gpu-bundle}
limit_mib=${GPU_CARRY_LIMIT_MIB:-60} # the tool's 64 MiB, less a margin
problems=()

info="$bundle/BUILD-INFO"
if [ ! -f "$info" ]; then
  echo "gpu-bundle-ready: no $info: run scripts/build-gpu-bundle.sh" >&2
  exit 1
fi
field() { sed -n "s/^$1=//p" "$info"; }
head=$(git rev-parse HEAD)
[ "$(field commit)" = "$head" ] ||
  problems+=("built from $(field commit), HEAD is $head: rebuild (scripts/build-gpu-bundle.sh)")
[ "$(field modified_tracked_files)" = 0 ] && [ "$(field untracked_files)" = 0 ] ||
  problems+=("built from a tree with uncommitted changes (BUILD-INFO): commit, then rebuild")
if [ -n "$(git status --porcelain --untracked-files=normal)" ]; then
  problems+=("the working tree has uncommitted changes: the carried sources would differ from the bundle's")
fi
[ -e "$bundle/.unpacked" ] && problems+=("$bundle/.unpacked: unpacked in place; rebuild it")
extra=$(find "$bundle/tests" "$bundle/lib" -type f ! -name MANIFEST.tsv ! -name libdistill_kernels.so 2>/dev/null)
[ -n "$extra" ] && problems+=("loose files that belong in packed.tar.xz: $(echo "$extra" | tr '\n' ' ')")
[ -f "$bundle/packed.tar.xz" ] || problems+=("$bundle/packed.tar.xz missing")

bundle_bytes=$(du -sb "$bundle" | cut -f1)
# What the tool carries besides: the files git tracks or would track (not the ignored ones).
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)
total_mib=$(( (bundle_bytes + ${tree_bytes:-0} + 1048575) / 1048576 ))
[ "$total_mib" -le "$limit_mib" ] ||
  problems+=("bundle + working tree = ${total_mib} MiB, over ${limit_mib} MiB")

if [ "${#problems[@]}" -gt 0 ]; then
  printf 'gpu-bundle-ready: NOT READY\n' >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "gpu-bundle-ready: ${head:0:7}, bundle $((bundle_bytes / 1048576)) MiB + tree $((${tree_bytes:-0} / 1048576)) MiB = ${total_mib} MiB"
