"""Argument arrays of the numpy face: one conversion rule for every function."""

from __future__ import annotations

import numbers

import numpy as np


def as_array(name: str, x, tensor_face: str = "distill_kernels.torch",
             numbers_ok: bool = False) -> np.ndarray:
    """``x`` as a numpy array: arrays (subclasses included) as they are, lists, tuples, objects
    with ``__array__`` and, with ``numbers_ok``, plain numbers through ``np.asarray``. Refused
    with a TypeError that names the argument: torch tensors (pointing to ``tensor_face``),
    masked arrays (the library would read the masked values) and anything else."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array, whose mask the library would not see: pass "
            f"{name}.filled(value) (or {name}.data to use the masked values)"
        )
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        raise TypeError(f"{name} is a torch tensor: use {tensor_face} for tensors, or pass "
                        "tensor.numpy()")
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)) or (
        numbers_ok and isinstance(x, numbers.Number)
    ):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
