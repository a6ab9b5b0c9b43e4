"""Checks of public call arguments, written once: each returns the value in its plain Python type or raises an
ArgumentError naming the argument (a number, a seed, a path to write to). Integral numpy (and 0-dim integer torch)
numbers are integers; floats are not."""

from __future__ import annotations

import math
import numbers
import operator
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArgumentError, UserInputError


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


SEED_LIMIT = 2**32  # seeds are 0 <= seed < 2**32: what numpy's legacy and new generators and torch's all take


def seed(value: Any, name: str, error: type[ArgumentError] | type[UserInputError] = ArgumentError) -> int:
    """A random seed as an int in [0, 2**32); else `error` naming `name` (a flag, or a config key with ConfigError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_LIMIT:
        raise error(f"{name} must be an integer in [0, 2**32 - 1 = {SEED_LIMIT - 1}], got {value!r}")
    return int(value)


def writable_path(path: str | Path, name: str, folder: bool = False) -> Path:
    """Check, before any work, that `path` can be written: a file (folder=False) or a folder (folder=True) whose
    missing parents can be made. Nothing is left behind (a folder made to try it is removed); an ArgumentError names
    the option `name`, the path and why: a parent that is a file, a folder where a file goes, no permission."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise ArgumentError(f"{name} {path} is a directory: give a file name")
    if path.exists() and not path.is_dir() and folder:
        raise ArgumentError(f"{name} {path} is a file: give a folder (new or existing)")
    where = path if folder else path.parent
    missing = []
    existing = Path(os.path.abspath(where))
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ArgumentError(f"{name} {path}: {existing} is a file, not a folder")
    made: list[Path] = []
    try:
        for parent in reversed(missing):
            parent.mkdir()
            made.append(parent)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise ArgumentError(f"{name} {path}: cannot write there ({e.strerror or e})") from None
    finally:
        for parent in reversed(made):
            parent.rmdir()
    return path
