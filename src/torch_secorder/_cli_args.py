"""argparse types shared by the command lines (``python -m torch_secorder`` and its ``report``).

A bad value is an ``argparse.ArgumentTypeError``: argparse prints it with the
option's name and exits with status 2.

Example:
    >>> int_at_least(1)("3")
    3
    >>> seed_below(2**63)("-1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an int in [0, 2**63), got -1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_at_least", "positive_float", "seed_below"]


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def seed_below(limit: int) -> Callable[[str], int]:
    """argparse type: a seed in ``[0, limit)`` (``limit`` <= 2**63: torch's seed range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an int in [0, 2**63), got {text!r}"
            ) from None
        if not 0 <= value < limit:
            raise argparse.ArgumentTypeError(f"expected an int in [0, 2**63), got {value}")
        return value

    return parse
