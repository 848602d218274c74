"""Argument checks shared by every config in the library (adapters, continual methods, servers).

Each check raises ``ValueError`` with the same shape of message: the name, the rule, the value
given. Checks only look; they never convert or rewrite a value.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

__all__ = ["fraction", "non_negative_int", "non_negative_number", "one_of", "optional", "positive_int",
           "positive_number"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def positive_number(name: str, value: Any) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative_number(name: str, value: Any) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def fraction(name: str, value: Any, *, open_low: bool = False) -> None:
    """``value`` in [0, 1] (or (0, 1] with ``open_low``)."""
    ok = _is_number(value) and (0 < value <= 1 if open_low else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")


def one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def optional(check: Callable[..., None], name: str, value: Any, *args: Any) -> None:
    """``check`` unless ``value`` is None; the message says that None is allowed too."""
    if value is None:
        return
    try:
        check(name, value, *args)
    except ValueError as err:
        raise ValueError(str(err).replace(" must be ", " must be None or ", 1)) from None
