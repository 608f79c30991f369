"""One validation helper per rule: each returns the value or raises a ValueError naming the parameter.

Dtypes and devices have theirs beside what they check: :func:`flatquant_lab.dtypes.as_dtype`,
:func:`flatquant_lab.dtypes.check_half`, :func:`flatquant_lab.devices.check_device`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_float(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(value, name: str, what: str = ""):
    """``value`` if it is an int >= 1; ``what`` says more in the message (e.g. what the int counts)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int{what}, got {value!r}")
    return value


def non_negative_int(value, name: str, what: str = ""):
    """``value`` if it is an int >= 0."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0{what}, got {value!r}")
    return value


def positive_float(value, name: str, what: str = ""):
    """``value`` if it is a finite float (or int) > 0."""
    if not (is_finite_float(value) and value > 0):
        raise ValueError(f"{name}: expected a finite float > 0{what}, got {value!r}")
    return value


def float_in(value, name: str, low: float = 0.0, high: float = 1.0):
    """``value`` if it is a finite float in ``[low, high]`` (a probability by default)."""
    if not (is_finite_float(value) and low <= value <= high):
        raise ValueError(f"{name}: expected a float in [{low:g}, {high:g}], got {value!r}")
    return value


def one_of(value, name: str, choices: Iterable):
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def boolean(value, name: str):
    """``value`` if it is a bool (not 0/1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return value
