#!/usr/bin/env bash
# Installs the C library for C and C++ programs (Linux): PREFIX/lib/libdistill_kernels.so.<ABI>
# (with the link libdistill_kernels.so) and libdistill_kernels.a,
# PREFIX/include/distill_kernels.h and two pkg-config files, so that
#   cc prog.c $(pkg-config --cflags --libs distill_kernels)          # the shared library
#   cc prog.c $(pkg-config --cflags --libs distill_kernels-static)   # the static one
# build against it (with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig for a prefix pkg-config does not
# search). A program linked with the shared library finds it at run time through an rpath
# (-Wl,-rpath,PREFIX/lib) or LD_LIBRARY_PATH, where the loader does not look already.
#
# Usage: bash scripts/install-c-library.sh PREFIX   (absolute or relative to where it is run)
# Builds the library first (`cargo build --release -p distill-kernels-capi`; set NVCC or
# CUDA_HOME as for any build to embed the CUDA kernels: build.rs says whether it did), unless
# DK_INSTALL_FROM names a folder holding a library built already (libdistill_kernels.so and .a
# of this checkout's header, e.g. a CUDA build made on another machine): no cargo then.
# DESTDIR (packaging): files go under DESTDIR/PREFIX, the pkg-config files name PREFIX (then
# absolute).
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 PREFIX   (e.g. \$HOME/.local or /usr/local)" >&2
  exit 2
fi
if [ "$(uname -s)" != Linux ]; then
  echo "$0: Linux only (the static library's system libraries and the loader paths differ)" >&2
  exit 1
fi
case "$1" in
  *[[:space:]]*) echo "$0: PREFIX must not contain white space (pkg-config splits it)" >&2; exit 2 ;;
esac
# A missing DK_INSTALL_FROM fails before anything is created under PREFIX.
if [ -n "${DK_INSTALL_FROM:-}" ]; then
  release=$(cd "$DK_INSTALL_FROM" 2>/dev/null && pwd) ||
    { echo "$0: DK_INSTALL_FROM=$DK_INSTALL_FROM is not a folder" >&2; exit 1; }
fi
destdir=${DESTDIR:-}
if [ -n "$destdir" ]; then
  case "$1" in
    /*) prefix=${1%/} ;;
    *) echo "$0: with DESTDIR, PREFIX must be absolute (it is what the installed files name)" >&2; exit 2 ;;
  esac
  mkdir -p "$destdir"
  destdir=$(cd "$destdir" && pwd)
else
  mkdir -p "$1"
  prefix=$(cd "$1" && pwd)  # before leaving the caller's directory: PREFIX may be relative
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ -z "${DK_INSTALL_FROM:-}" ]; then
  cargo build --release -p distill-kernels-capi
  release="$(bash scripts/cargo-target-dir.sh)/release"
fi
for f in libdistill_kernels.so libdistill_kernels.a; do
  [ -f "$release/$f" ] || { echo "$0: $release/$f not found" >&2; exit 1; }
done
shared=libdistill_kernels.so
version=$(sed -n 's/^#define DK_VERSION_STRING "\(.*\)"$/\1/p' include/distill_kernels.h)
[ -n "$version" ] || { echo "no DK_VERSION_STRING in include/distill_kernels.h" >&2; exit 1; }
abi=$(sed -n 's/^#define DK_ABI_VERSION \([0-9]*\)$/\1/p' include/distill_kernels.h)
[ -n "$abi" ] || { echo "no DK_ABI_VERSION in include/distill_kernels.h" >&2; exit 1; }

# The library must carry the SONAME of this header's ABI (capi/build.rs): one built before it
# had none, one of another ABI another, and either installed under this name would defeat it.
if command -v readelf >/dev/null; then
  soname=$(readelf -d "$release/$shared" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p') ||
    soname=""
  if [ "$soname" != "$shared.$abi" ]; then
    echo "$0: $release/$shared has SONAME '${soname:-none}', not $shared.$abi (DK_ABI_VERSION" \
      "of include/distill_kernels.h): built from other sources; rebuild it" >&2
    exit 1
  fi
else
  echo "$0: readelf not found: the library's SONAME is not checked" >&2
fi
dest=$destdir$prefix
install -d "$dest/lib/pkgconfig" "$dest/include"
# The file has its SONAME's name (capi/build.rs: libdistill_kernels.so.<DK_ABI_VERSION>), which
# programs linked against it look for; the unversioned name is the link -ldistill_kernels finds.
install -m 0755 "$release/$shared" "$dest/lib/$shared.$abi"
ln -sfn "$shared.$abi" "$dest/lib/$shared"
install -m 0644 "$release/libdistill_kernels.a" "$dest/lib/libdistill_kernels.a"
install -m 0644 include/distill_kernels.h "$dest/include/distill_kernels.h"
# The system libraries of the static library: what rustc's --print native-static-libs lists for
# a std staticlib on Linux. -ldistill_kernels would take the .so where both are installed, so
# the static file names the archive itself.
system_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
what="Fused KL / JSD, fused linear divergence, MoE dispatch and GQA kernels for LLM distillation (C ABI)"
pc() { # name description libs [private libs]
  {
    printf 'prefix=%s\nlibdir=${prefix}/lib\nincludedir=${prefix}/include\n' "$prefix"
    # pkg-config --variable=abi_version distill_kernels: DK_ABI_VERSION of the installed header.
    printf 'abi_version=%s\n\n' "$abi"
    printf 'Name: %s\nDescription: %s\nVersion: %s\n' "$1" "$2" "$version"
    printf 'Cflags: -I${includedir}\nLibs: %s\n' "$3"
    [ -z "${4:-}" ] || printf 'Libs.private: %s\n' "$4"
  } >"$dest/lib/pkgconfig/$1.pc"
}
pc distill_kernels "$what" '-L${libdir} -ldistill_kernels' "$system_libs"
pc distill_kernels-static "$what, static" "\${libdir}/libdistill_kernels.a $system_libs"

echo "installed distill_kernels $version (C ABI version $abi) into $dest:"
echo "  $prefix/lib/$shared.$abi (and the link $shared), $prefix/lib/libdistill_kernels.a"
echo "  $prefix/include/distill_kernels.h"
echo "  $prefix/lib/pkgconfig/distill_kernels.pc, distill_kernels-static.pc"
echo "build with: cc prog.c \$(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs distill_kernels)"
echo "  (distill_kernels-static for the static library); a program linked with the shared one"
echo "  runs with -Wl,-rpath,$prefix/lib or LD_LIBRARY_PATH=$prefix/lib"
