"""Puts the built library into the wheel, so an installed package needs no DISTILL_KERNELS_LIB.

``pip install ./python`` (after ``cargo build --release`` in the repository root) copies
``libdistill_kernels.so`` into the package. The library is taken from ``$DISTILL_KERNELS_LIB``
(the file itself) when set, else from ``$CARGO_TARGET_DIR/release/`` when that is set, else
from the checkout's ``target/release/``; both variables must be absolute paths (pip runs this
file from ``python/``). It must come from the header and version this package mirrors
(``distill_kernels/_lib.py``: ``HEADER_HASH``, ``PACKAGE_VERSION``), or the install stops and
says why, as it does when no library is built. ``DISTILL_KERNELS_NO_BUNDLE=1`` installs the
bindings alone (the library is then found at run time: python/README.md), as does a build
outside a checkout (from an sdist) with neither variable set. An editable install
(``pip install -e``) bundles nothing: it uses the checkout's ``target/release/``.

The wheel carrying the library is tagged ``py3-none-<platform>``: the library is native code, but
it does not depend on the Python version.
"""

import ctypes
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 has its own
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # older setuptools (--no-build-isolation): the wheel package's
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IN_CHECKOUT = (REPO / "Cargo.toml").is_file() and (REPO / "include" / "distill_kernels.h").is_file()
NAME = {"darwin": "libdistill_kernels.dylib", "win32": "distill_kernels.dll"}.get(
    sys.platform, "libdistill_kernels.so"
)
NO_BUNDLE = os.environ.get("DISTILL_KERNELS_NO_BUNDLE") == "1"
HOW = (
    "run `cargo build --release` in the repository root, set DISTILL_KERNELS_LIB to the "
    "library's absolute path, or set DISTILL_KERNELS_NO_BUNDLE=1 to install the bindings "
    "without it"
)


def _absolute(variable):
    value = os.environ.get(variable)
    if value and not os.path.isabs(value):
        sys.exit(f"{variable}={value!r} must be an absolute path here (pip builds in python/)")
    return Path(value) if value else None


def find_library():
    """(the library to bundle or None, where it was looked for or None where none was expected)."""
    lib = _absolute("DISTILL_KERNELS_LIB")
    if lib is not None:
        if not lib.is_file():
            sys.exit(f"DISTILL_KERNELS_LIB={str(lib)!r} does not name an existing file")
        return lib, lib
    target = _absolute("CARGO_TARGET_DIR")
    if target is not None:  # where cargo builds: never fall back to an older target/
        lib = target / "release" / NAME
        return (lib if lib.is_file() else None), lib
    if not IN_CHECKOUT:
        return None, None
    lib = REPO / "target" / "release" / NAME
    return (lib if lib.is_file() else None), lib


def mirrored(name):
    """A constant of distill_kernels/_lib.py (the package version, the header hash)."""
    text = (HERE / "distill_kernels" / "_lib.py").read_text()
    return re.search(rf"^{name} = ([^\s#]+)", text, re.M).group(1).strip('"')


def check(lib):
    """Refuses a library this package cannot call: another version or another header."""
    loaded = ctypes.CDLL(str(lib))
    loaded.dk_version.restype = ctypes.c_char_p
    version = loaded.dk_version().decode()
    if version != mirrored("PACKAGE_VERSION"):
        sys.exit(f"{lib} is version {version}, this package {mirrored('PACKAGE_VERSION')}: {HOW}")
    try:
        loaded.dk_header_hash.restype = ctypes.c_uint64
        built = loaded.dk_header_hash()
    except AttributeError:
        built = None
    if built != int(mirrored("HEADER_HASH"), 16):
        sys.exit(
            f"{lib} was built from another include/distill_kernels.h than this package mirrors "
            f"(a stale build?): {HOW}"
        )


LIBRARY, LOOKED_AT = (None, None) if NO_BUNDLE else find_library()


class BuildPy(build_py):
    """build_py that copies the library into the package."""

    def run(self):
        super().run()
        package = Path(self.build_lib) / "distill_kernels"
        # python/build/ outlives a pip run: a library bundled by an earlier run must not slip
        # into a wheel that should have none (or be mistaken for this run's).
        (package / NAME).unlink(missing_ok=True)
        if NO_BUNDLE or getattr(self, "editable_mode", False):
            return
        if LIBRARY is None:
            if LOOKED_AT is not None:
                sys.exit(f"{LOOKED_AT} not found: {HOW}")
            print("distill_kernels: not built from a checkout; installing the bindings alone")
            return
        check(LIBRARY)
        shutil.copy2(LIBRARY, package / NAME)
        print(f"distill_kernels: bundled {LIBRARY}")


class BinaryDistribution(Distribution):
    """Native code inside: a platform wheel, its files in platlib."""

    def has_ext_modules(self):
        return LIBRARY is not None


class BdistWheel(bdist_wheel):
    """Any Python 3 on the platform: the library does not link Python."""

    def get_tag(self):
        if LIBRARY is None:
            return super().get_tag()
        return "py3", "none", super().get_tag()[2]


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel})
