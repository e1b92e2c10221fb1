"""Puts the built library into the wheel, so an installed package needs no DISTILL_KERNELS_LIB.

``pip install ./python`` (after ``cargo build --release`` in the repository root) copies
``libdistill_kernels.so`` and ``include/distill_kernels.h`` into the package. The library is taken
from, in order: ``$DISTILL_KERNELS_LIB`` (the file itself), ``$CARGO_TARGET_DIR/release/``, the
repository's ``target/release/``. Without one the install stops with what to do, unless
``DISTILL_KERNELS_NO_BUNDLE=1`` asks for the bindings alone (the library is then found at run
time: python/README.md). An editable install (``pip install -e``) bundles nothing: it uses the
checkout's ``target/release/``.

The wheel carrying the library is tagged ``py3-none-<platform>``: the library is native code, but
it does not depend on the Python version.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 has its own
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # older setuptools: the wheel package's
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAME = {"darwin": "libdistill_kernels.dylib", "win32": "distill_kernels.dll"}.get(
    sys.platform, "libdistill_kernels.so"
)
HEADER = REPO / "include" / "distill_kernels.h"
NO_BUNDLE = os.environ.get("DISTILL_KERNELS_NO_BUNDLE") == "1"


def built_library():
    """The library to bundle, or None."""
    env = os.environ.get("DISTILL_KERNELS_LIB")
    if env:
        if not Path(env).is_file():
            sys.exit(f"DISTILL_KERNELS_LIB={env!r} does not name an existing file")
        return Path(env)
    target = os.environ.get("CARGO_TARGET_DIR")
    for d in ([Path(target)] if target else []) + [REPO / "target"]:
        if (d / "release" / NAME).is_file():
            return d / "release" / NAME
    return None


LIBRARY = None if NO_BUNDLE else built_library()


class BuildPy(build_py):
    """build_py that copies the library and its header into the package."""

    def run(self):
        super().run()
        package = Path(self.build_lib) / "distill_kernels"
        # python/build/ outlives a pip run: a library bundled by an earlier run must not slip
        # into a wheel that should have none (or be mistaken for this run's).
        (package / NAME).unlink(missing_ok=True)
        shutil.rmtree(package / "include", ignore_errors=True)
        if NO_BUNDLE or getattr(self, "editable_mode", False):
            return
        if LIBRARY is None:
            sys.exit(
                f"{NAME} not found: run `cargo build --release` in {REPO} first (it writes "
                f"target/release/{NAME}), set DISTILL_KERNELS_LIB to the library's path, or set "
                "DISTILL_KERNELS_NO_BUNDLE=1 to install the bindings without it"
            )
        shutil.copy2(LIBRARY, package / NAME)
        if HEADER.is_file():
            (package / "include").mkdir(exist_ok=True)
            shutil.copy2(HEADER, package / "include" / HEADER.name)
        print(f"distill_kernels: bundled {LIBRARY}")


class BdistWheel(bdist_wheel):
    """A platform wheel when it carries the library, for any Python 3."""

    def finalize_options(self):
        super().finalize_options()
        if LIBRARY is not None:
            self.root_is_pure = False

    def get_tag(self):
        if LIBRARY is None:
            return super().get_tag()
        return "py3", "none", super().get_tag()[2]


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel})
