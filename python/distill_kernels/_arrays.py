"""Argument arrays of the numpy face: one conversion rule for every function."""

from __future__ import annotations

import numpy as np


def refuse_masked(name: str, x) -> None:
    """TypeError for a masked array, whose mask the library would not see."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array, whose mask the library would not see: pass "
            f"{name}.filled(value) (or {name}.data to use the masked values)"
        )


def as_array(name: str, x, tensor_face: str = "distill_kernels.torch",
             anything: bool = False) -> np.ndarray:
    """``x`` as a numpy array: arrays (subclasses included) as they are, lists, tuples and
    objects with ``__array__`` through ``np.asarray`` — with ``anything``, whatever else
    ``np.asarray`` takes (numbers, ranges, buffers) but strings. Refused with a TypeError that
    names the argument: torch tensors (pointing to ``tensor_face``), masked arrays (the library
    would read the masked values) and anything else."""
    refuse_masked(name, x)
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        raise TypeError(f"{name} is a torch tensor: use {tensor_face} for tensors, or pass "
                        "tensor.numpy()")
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)) or (
        anything and not isinstance(x, (str, bytes))
    ):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
