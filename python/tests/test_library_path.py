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
