#!/usr/bin/env bash
# Installs the C library for C and C++ programs: PREFIX/lib/libdistill_kernels.{so,a},
# PREFIX/include/distill_kernels.h and PREFIX/lib/pkgconfig/distill_kernels.pc, so that
#   cc prog.c $(pkg-config --cflags --libs distill_kernels)
# builds against it (with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig for a prefix pkg-config does not
# search; `pkg-config --static --libs` adds what the static library needs).
#
# Usage: bash scripts/install-c-library.sh PREFIX
# Builds the library first (`cargo build --release -p distill-kernels-capi`; set NVCC or
# CUDA_HOME as for any build to embed the CUDA kernels: build.rs says whether it did).
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 PREFIX   (e.g. \$HOME/.local or /usr/local)" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

cargo build --release -p distill-kernels-capi
release="$(bash scripts/cargo-target-dir.sh)/release"
case "$(uname -s)" in
  Darwin) shared=libdistill_kernels.dylib ;;
  *) shared=libdistill_kernels.so ;;
esac
version=$(sed -n 's/^#define DK_VERSION_STRING "\(.*\)"$/\1/p' include/distill_kernels.h)
[ -n "$version" ] || { echo "no DK_VERSION_STRING in include/distill_kernels.h" >&2; exit 1; }

install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$release/$shared" "$prefix/lib/$shared"
install -m 0644 "$release/libdistill_kernels.a" "$prefix/lib/libdistill_kernels.a"
install -m 0644 include/distill_kernels.h "$prefix/include/distill_kernels.h"
# Libs.private: what rustc's --print native-static-libs lists for a std staticlib on Linux.
cat >"$prefix/lib/pkgconfig/distill_kernels.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: distill_kernels
Description: Fused KL / JSD, fused linear divergence, MoE dispatch and GQA kernels for LLM distillation (C ABI)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -ldistill_kernels
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
EOF

echo "installed distill_kernels $version into $prefix:"
echo "  $prefix/lib/$shared, $prefix/lib/libdistill_kernels.a"
echo "  $prefix/include/distill_kernels.h"
echo "  $prefix/lib/pkgconfig/distill_kernels.pc"
echo "build with: cc prog.c \$(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs distill_kernels)"
echo "run with the library on the loader's path (LD_LIBRARY_PATH=$prefix/lib, or -Wl,-rpath,$prefix/lib)"
