"""Argument checks shared by every layer (engine, linalg, wrappers).

One rule: ``TypeError`` for an argument of the wrong type, ``ValueError`` for
one of the right type and a wrong value; the message names the argument, what
was expected and what came.  This module sits on the ground floor: it imports
nothing of the package, so :mod:`torch_secorder.func` and
:mod:`torch_secorder.linalg` use it without importing the wrappers.

Example:
    >>> check_count(3, "num_samples")
    3
    >>> check_count(2.0, "num_samples")
    Traceback (most recent call last):
    ...
    TypeError: num_samples must be an int, got float 2.0 (expected an int >= 1)
    >>> check_chunk_size(0)
    Traceback (most recent call last):
    ...
    ValueError: chunk_size must be >= 1, got 0
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["check_chunk_size", "check_count", "check_generator"]


def _is_int(value: Any) -> bool:
    # bool is an int subclass but never a count; numpy integers are Integral; a
    # SymInt is an int traced by torch.compile with dynamic shapes.
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_count(value: Any, name: str, minimum: int = 1, *, allow_none: bool = False) -> Any:
    """``value`` as an ``int >= minimum`` (or ``None`` when ``allow_none``).

    Raises:
        TypeError: ``value`` is not an int (a float, a bool, a tensor, a string).
        ValueError: ``value`` is an int below ``minimum``.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value):
        kind, expected = "an int", f"an int >= {minimum}"
        if allow_none:
            kind, expected = "an int or None", f"an int >= {minimum} or None"
        raise TypeError(
            f"{name} must be {kind}, got {type(value).__name__} {value!r} (expected {expected})"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value if isinstance(value, torch.SymInt) else int(value)


def check_chunk_size(chunk_size: Any, name: str = "chunk_size") -> int | None:
    """A chunk size: ``None`` (the default policy) or an ``int >= 1``."""
    return check_count(chunk_size, name, 1, allow_none=True)


def check_generator(
    generator: Any, device: torch.device | str | None, name: str = "generator"
) -> torch.Generator | None:
    """``None`` or a :class:`torch.Generator` on the device type of ``device``.

    ``device`` is where the random numbers are needed (the parameters' device);
    ``None`` skips the device comparison.

    Raises:
        TypeError: ``generator`` is not a ``torch.Generator``.
        ValueError: it lives on another kind of device than ``device``.
    """
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    if device is not None:
        device = torch.device(device)
        if generator.device.type != device.type:
            raise ValueError(
                f"{name} is on {generator.device}, but the parameters are on {device}: "
                f"pass torch.Generator(device={device.type!r}) (the random probes are "
                f"drawn where the parameters are)"
            )
    return generator
