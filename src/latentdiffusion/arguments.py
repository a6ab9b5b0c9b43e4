"""Checks of public call arguments, written once: each returns the value in its plain Python type or raises an
ArgumentError naming the argument. Integral numpy (and 0-dim integer torch) numbers are integers; floats are not."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from .errors import ArgumentError


def integer(value: Any, name: str, minimum: int | None = None) -> int:
    """`value` as an int (>= minimum if given); a bool or a float such as 8.0 is refused."""
    try:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and number < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def real(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a finite float within [minimum, maximum] where given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else (
            f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ArgumentError(f"{name} must be {bounds}, got {number}")
    return number


def texts(value: Any, name: str) -> list[str]:
    """A string or a non-empty list (or tuple) of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ArgumentError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ArgumentError(f"{name}[{i}] must be a string, got {text!r}")
    return list(value)
