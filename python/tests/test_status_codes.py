"""Every status code of the C header has its exception class, exported by the package: a code
added to the header without one would surface as the bare base class."""

import re
from pathlib import Path

import pytest

import distill_kernels as dk
from distill_kernels import _lib

HEADER = Path(__file__).resolve().parents[2] / "include" / "distill_kernels.h"


@pytest.mark.skipif(not HEADER.is_file(), reason=f"no header at {HEADER} (installed package)")
def test_every_header_status_has_its_exception_class():
    codes = {name: int(value) for name, value in
             re.findall(r"#define DK_ERR_(\w+) (\d+)", HEADER.read_text())}
    assert "OUT_OF_MEMORY" in codes and len(codes) >= 10
    for name, value in codes.items():
        cls = _lib._STATUS_ERRORS.get(value)
        assert cls is not None, f"DK_ERR_{name} = {value} has no exception class"
        assert cls.status == value and issubclass(cls, dk.DistillKernelsError)
        assert getattr(dk, cls.__name__) is cls and cls.__name__ in dk.__all__
    assert set(_lib._STATUS_ERRORS) == set(codes.values())
    assert issubclass(dk.OutOfMemoryError, MemoryError)
