"""argparse value types for the ``o2mag`` commands: each names its option in the one-line error
argparse prints (exit 2), so ``o2mag generate`` and ``o2mag evaluate`` reject bad numbers alike."""
from __future__ import annotations

import argparse
import math


def _number(name: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None


def int_at_least(name: str, minimum: int):
    """An int >= ``minimum``."""
    def parse(text: str) -> int:
        value = _number(name, text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def float_at_least(name: str, minimum: float, strict: bool = False):
    """A finite float >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        value = _number(name, text, float)
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


def fraction(name: str):
    """A float in [0, 1]."""
    def parse(text: str) -> float:
        value = _number(name, text, float)
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {text}")
        return value

    return parse
