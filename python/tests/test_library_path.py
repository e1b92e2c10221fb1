"""Where the package looks for the library (``distill_kernels._lib``): the copy an install
bundled with the package first, then the folder cargo builds into before any ``target/`` that
may hold an older build."""

from pathlib import Path

from distill_kernels import _lib


def _name():
    return _lib._lib_names()[0]


def test_the_bundled_library_comes_first_then_cargo_target_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path))
    candidates = _lib._candidates()
    assert candidates[0] == Path(_lib.__file__).resolve().parent / _name()
    assert candidates[1] == tmp_path / "release" / _name()
    repo = Path(_lib.__file__).resolve().parent.parent.parent
    in_tree = repo / "target" / "release" / _name()
    if in_tree in candidates:
        assert candidates.index(in_tree) > 1


def test_without_cargo_target_dir_the_checkout_comes_next(monkeypatch):
    monkeypatch.delenv("CARGO_TARGET_DIR", raising=False)
    candidates = _lib._candidates()
    assert candidates[0] == Path(_lib.__file__).resolve().parent / _name()
    repo = Path(_lib.__file__).resolve().parent.parent.parent
    if (repo / "Cargo.toml").is_file():
        assert candidates[1] == repo / "target" / "release" / _name()
    assert all(p.name == _name() for p in candidates)


_INSTALLED_PROBE = """
import numpy as np, distill_kernels as dk
print(dk._lib.library_path())
r = dk.divergence(np.ones((2, 8), np.float32), np.zeros((2, 8), np.float32), kind="forward_kl")
print(r.loss)
"""


def _run_installed(site, cwd):
    """Runs the probe with the package imported from ``site`` (an installed layout) and no
    hint of where a library is."""
    import os
    import subprocess
    import sys

    hints = ("DISTILL_KERNELS_LIB", "CARGO_TARGET_DIR")
    env = {k: v for k, v in os.environ.items() if k not in hints}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", _INSTALLED_PROBE], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_an_installed_package_loads_its_bundled_library_and_checks_it(tmp_path):
    """The layout `pip install ./python` makes (setup.py): the library inside the package. It is
    found without DISTILL_KERNELS_LIB from a folder outside any checkout; a library built from
    another header than the package mirrors is refused with what to do; none at all is
    reported."""
    import shutil

    import pytest

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    package = site / "distill_kernels"
    shutil.copytree(
        Path(_lib.__file__).resolve().parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    assert not (package / _name()).exists(), "the source tree holds no library"
    shutil.copy2(_lib.library_path(), package / _name())

    ok = _run_installed(site, elsewhere)
    assert ok.returncode == 0, ok.stderr
    path, loss = ok.stdout.split()
    assert Path(path).resolve() == (package / _name()).resolve()
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # uniform vs uniform

    mirror = package / "_lib.py"
    recorded = f"HEADER_HASH = {_lib.HEADER_HASH:#X}".replace("0X", "0x")
    assert recorded in mirror.read_text()
    mirror.write_text(mirror.read_text().replace(recorded, "HEADER_HASH = 0x1"))
    stale = _run_installed(site, elsewhere)
    assert stale.returncode != 0
    assert "LibraryNotFoundError" in stale.stderr and "reinstall the package" in stale.stderr

    (package / _name()).unlink()
    missing = _run_installed(site, elsewhere)
    assert missing.returncode != 0
    assert "libdistill_kernels was not found" in missing.stderr


def _checkout_header():
    import pytest

    header = Path(_lib.__file__).resolve().parent.parent.parent / "include" / "distill_kernels.h"
    if not header.is_file():
        pytest.skip(f"no header at {header}: the package is not used from a checkout")
    return header


def test_the_recorded_header_hash_is_the_checkouts_header():
    """_lib.HEADER_HASH names the header the ctypes mirror follows: a header change must come
    with a look at the mirror and a new value here."""
    actual = _lib._fnv1a(_checkout_header().read_bytes())
    assert _lib.HEADER_HASH == actual, (
        f"include/distill_kernels.h changed: check the ctypes mirror in _lib.py against it, then "
        f"set HEADER_HASH = {actual:#x}"
    )


class _Stale:
    """A library of the same version that reports ``value`` from dk_header_hash."""

    def __init__(self, value):
        self.dk_header_hash = lambda: value


class _Older:
    """A library from before dk_header_hash existed."""


def test_a_library_built_from_another_header_is_refused_with_what_to_do(monkeypatch):
    import ctypes

    import pytest

    header = _checkout_header()
    real = _lib.lib()
    # The library in use was built from this very header (Python's FNV-1a equals the Rust one).
    real.dk_header_hash.restype = ctypes.c_uint64
    assert real.dk_header_hash() == _lib._fnv1a(header.read_bytes()) == _lib.HEADER_HASH
    _lib._check_header(real, Path("real"))

    monkeypatch.delenv("DISTILL_KERNELS_LIB", raising=False)
    with pytest.raises(_lib.LibraryNotFoundError, match="stale build"):
        _lib._check_header(_Stale(_lib.HEADER_HASH ^ 1), Path("stale"))
    with pytest.raises(_lib.LibraryNotFoundError, match="cargo build --release"):
        _lib._check_header(_Older(), Path("older"))

    # Chosen by the user: the message is about the variable.
    monkeypatch.setenv("DISTILL_KERNELS_LIB", "/elsewhere/libdistill_kernels.so")
    with pytest.raises(_lib.LibraryNotFoundError, match="unset it"):
        _lib._check_header(_Stale(_lib.HEADER_HASH ^ 1), Path("elsewhere"))

    # The header moved on and the library with it, the mirror did not.
    monkeypatch.setattr(_lib, "HEADER_HASH", _lib.HEADER_HASH ^ 1)
    with pytest.raises(_lib.LibraryNotFoundError, match="set HEADER_HASH = "):
        _lib._check_header(real, Path("real"))


def test_python_m_distill_kernels_says_which_library_it_loads(tmp_path):
    """`python -m distill_kernels` names the library and how it was found; without one it says
    why and exits 1."""
    import os
    import subprocess
    import sys

    lib = _lib.library_path()
    src = str(Path(_lib.__file__).resolve().parent.parent)
    env = dict(os.environ, DISTILL_KERNELS_LIB=str(lib), PYTHONPATH=src)
    ok = subprocess.run(
        [sys.executable, "-m", "distill_kernels"], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert f"library: {lib} (DISTILL_KERNELS_LIB), version {_lib.version()}" in ok.stdout
    assert "CUDA devices seen by the library: " in ok.stdout
    archs = _lib.cuda_archs()
    assert all(a.startswith(("sm_", "compute_")) for a in archs), archs
    shown = ", ".join(archs) if archs else "none: built without nvcc"
    assert f"CUDA kernels compiled in: {shown}" in ok.stdout

    env["DISTILL_KERNELS_LIB"] = str(tmp_path / "missing.so")
    bad = subprocess.run(
        [sys.executable, "-m", "distill_kernels"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "library: not loaded: DISTILL_KERNELS_LIB=" in bad.stdout
