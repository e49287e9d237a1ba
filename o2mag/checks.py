"""Argument checks shared by every layer: each raises ``TypeError`` or ``ValueError`` naming the
argument, so a bad call fails before any work. :func:`is_int` and :func:`is_number` are o2mag's
one answer to "is this an int / a number" (Python or numpy scalars, never a bool)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = [
    "is_int",
    "is_number",
    "check_int",
    "check_range",
    "check_fraction",
    "check_shape",
    "sample_indices",
]


_INTS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


def is_int(value: Any) -> bool:
    """An integer (``int`` or a numpy integer), not a bool."""
    return isinstance(value, _INTS) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (``int``, ``float`` or a numpy integer or float), not a bool."""
    return isinstance(value, _NUMBERS) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 positive: bool = False) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (min, max), got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        raise ValueError(f"{name} must be a finite pair with min <= max, got {value!r}")
    if positive and a <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if (low is not None and a < low) or (high is not None and b > high):
        raise ValueError(f"{name} must lie within [{low}, {high}], got {value!r}")
    return a, b


def check_fraction(name: str, value: Any) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_shape(name: str, shape: Any) -> tuple[int, int]:
    try:
        h, w = shape
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (height, width), got {shape!r}") from None
    h = check_int(f"{name}[0]", h, minimum=1)
    w = check_int(f"{name}[1]", w, minimum=1)
    return h, w


def sample_indices(n: int | Sequence[int]) -> list[int]:
    if is_int(n):
        return list(range(check_int("n", n, minimum=0)))
    try:
        idx = [check_int("n[i] (sample index)", i, minimum=0) for i in n]
    except TypeError as exc:
        if "not iterable" in str(exc):
            raise TypeError(f"n must be an int or a sequence of sample indices, "
                            f"got {type(n).__name__}") from None
        raise
    if len(set(idx)) != len(idx):
        raise ValueError("n: sample indices must be distinct")
    return idx
