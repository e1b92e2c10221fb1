"""Where the package looks for the library (``distill_kernels._lib``): the folder cargo builds
into comes before any ``target/`` that may hold an older build."""

from pathlib import Path

from distill_kernels import _lib


def test_cargo_target_dir_comes_before_the_checkouts_target(monkeypatch, tmp_path):
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path))
    candidates = _lib._candidates()
    assert candidates[0] == tmp_path / "release" / _lib._lib_names()[0]
    repo = Path(_lib.__file__).resolve().parent.parent.parent
    in_tree = repo / "target" / "release" / _lib._lib_names()[0]
    if in_tree in candidates:
        assert candidates.index(in_tree) > 0


def test_without_cargo_target_dir_the_checkout_comes_first(monkeypatch):
    monkeypatch.delenv("CARGO_TARGET_DIR", raising=False)
    candidates = _lib._candidates()
    repo = Path(_lib.__file__).resolve().parent.parent.parent
    if (repo / "Cargo.toml").is_file():
        assert candidates[0] == repo / "target" / "release" / _lib._lib_names()[0]
    assert all(p.name == _lib._lib_names()[0] for p in candidates)


def test_a_library_built_from_another_header_is_refused_as_stale():
    import ctypes

    import pytest

    header = Path(_lib.__file__).resolve().parent.parent.parent / "include" / "distill_kernels.h"
    if not header.is_file():
        pytest.skip(f"no header at {header} (an installed package has no header to compare)")
    real = _lib.lib()
    # The library in use was built from this very header (Python's FNV-1a equals the Rust one).
    real.dk_header_hash.restype = ctypes.c_uint64
    assert real.dk_header_hash() == _lib._fnv1a(header.read_bytes())
    _lib._check_header(real, Path("real"))

    class Stale:
        """A library of the same version built from another header."""

        def __init__(self, value):
            self.dk_header_hash = lambda: value

    with pytest.raises(_lib.LibraryNotFoundError, match="stale build"):
        _lib._check_header(Stale(real.dk_header_hash() ^ 1), Path("stale"))

    class Older:
        """A library from before dk_header_hash existed."""

    with pytest.raises(_lib.LibraryNotFoundError, match="cargo build --release"):
        _lib._check_header(Older(), Path("older"))
