"""Validation of density hyper-parameters (one-line ValueErrors naming the field)."""

from __future__ import annotations

import math
import numbers


def positive_int(owner: str, field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'{owner}.{field} must be a positive integer, got {value!r}.')
  return int(value)


def nonneg_int(owner: str, field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f'{owner}.{field} must be a non-negative integer, got {value!r}.')
  return int(value)


def real(
  owner: str, field: str, value, *, low=None, high=None, low_open=False, high_open=False
) -> float:
  """A finite real number in [low, high] (or open ends)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f'{owner}.{field} must be a finite number, got {value!r}.')
  v = float(value)
  bad_low = low is not None and (v <= low if low_open else v < low)
  bad_high = high is not None and (v >= high if high_open else v > high)
  if bad_low or bad_high:
    lo = '' if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = '' if high is None else f"{'<' if high_open else '<='} {high:g}"
    raise ValueError(
      f'{owner}.{field} must be {" and ".join(s for s in (lo, hi) if s)}, got {value!r}.'
    )
  return v


def choice(owner: str, field: str, value, options) -> str:
  if value not in options:
    raise ValueError(f'{owner}.{field} must be one of {list(options)}, got {value!r}.')
  return value


def set_field(obj, field: str, value) -> None:
  """Normalises a field of a frozen dataclass inside ``__post_init__``."""
  object.__setattr__(obj, field, value)
