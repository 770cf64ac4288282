"""Argument checks shared by every public constructor and the CLI.

They run on every rank with the same arguments and no communication, so a bad value raises
the same ``ValueError`` everywhere *before* any collective is entered: no rank is left
waiting for another that already failed. Each message names the argument and what is allowed.
"""
from __future__ import annotations

import math
from numbers import Integral, Real


def check_int(name: str, value, minimum: int = 1) -> int:
    """An integer (numpy's integers too) of at least ``minimum``; returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number in {_interval(low, high, low_open, high_open)}, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ValueError(f"{name} must lie in {_interval(low, high, low_open, high_open)}, got {value}")
    return value


def check_fraction(name: str, value) -> float:
    """A pull strength: a number in [0, 1]."""
    return check_real(name, value, 0.0, 1.0)


def check_multiple(name: str, value: int, of_name: str, of_value: int) -> int:
    if value % of_value != 0:
        raise ValueError(f"{name}={value} must be a multiple of {of_name}={of_value}")
    return value


def check_choice(name: str, value, choices) -> object:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {sorted(choices)}")
    return value


def _interval(low, high, low_open, high_open) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy's booleans too
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)
