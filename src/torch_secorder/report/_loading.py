"""The user's model, data and loss from ``package.module:name`` paths given on the command line.

Every failure is a :class:`LoadError` whose message names the option and the path:
a malformed path, a module that does not import, a missing attribute, something
not callable, a factory that raises, a factory that returns the wrong kind of object.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "FactoryError",
    "LoadError",
    "OnDevice",
    "load_data",
    "load_loss",
    "load_model",
    "place",
    "resolve",
]

#: Built-in losses by name (modules, so that they declare their reduction).
LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
}


class LoadError(ValueError):
    """A ``--model``/``--data``/``--loss`` path that cannot be used (a usage error)."""


class FactoryError(RuntimeError):
    """The user's factory raised; ``__cause__`` is its exception."""


def resolve(spec: str, option: str) -> Any:
    """The object that ``"package.module:name"`` names (``name`` may be dotted)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise LoadError(
            f"{option} {spec!r}: expected 'package.module:name' (a module path, a colon, "
            "a name in that module)"
        )
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise LoadError(f"{option} {spec!r}: expected 'package.module:name', with both parts")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(
            f"{option} {spec!r}: cannot import module {module_name!r} ({exc}); is its "
            "directory on PYTHONPATH?"
        ) from None
    except Exception as exc:  # the module's own code raised on import
        raise FactoryError(
            f"{option} {spec!r}: importing module {module_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoadError(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call(factory: Any, spec: str, option: str) -> Any:
    if not callable(factory):
        raise LoadError(
            f"{option} {spec!r}: expected a callable factory, got {type(factory).__name__}"
        )
    try:
        return factory()
    except Exception as exc:
        raise FactoryError(
            f"{option} {spec!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from exc


def load_model(spec: str) -> nn.Module:
    """Call the factory at ``spec`` (no arguments); it must return an ``nn.Module``."""
    model = _call(resolve(spec, "--model"), spec, "--model")
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"--model {spec!r}: the factory must return a torch.nn.Module, got "
            f"{type(model).__name__}"
        )
    return model


def load_data(spec: str) -> Any:
    """Call the factory at ``spec``: an ``(inputs, targets)`` pair or an iterable of them."""
    data = _call(resolve(spec, "--data"), spec, "--data")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor):
        return tuple(data)
    if isinstance(data, (Tensor, str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise LoadError(
            f"--data {spec!r}: the factory must return a pair (inputs, targets) of tensors or "
            f"a DataLoader (an iterable of such pairs), got {type(data).__name__}"
        )
    return data


def load_loss(spec: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``cross_entropy``, ``mse``, or ``package.module:name`` (a loss function or module class)."""
    if spec in LOSSES:
        return LOSSES[spec]()
    if ":" not in spec:
        raise LoadError(
            f"--loss {spec!r}: expected one of {sorted(LOSSES)} or 'package.module:name'"
        )
    loss = resolve(spec, "--loss")
    if isinstance(loss, type) and issubclass(loss, nn.Module):
        loss = _call(loss, spec, "--loss")
    if not callable(loss):
        raise LoadError(
            f"--loss {spec!r}: expected a loss function loss_fn(outputs, targets) or an "
            f"nn.Module class, got {type(loss).__name__}"
        )
    return loss


def _convert(value: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    if isinstance(value, Tensor):
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value if device is None else value.to(device)
    if isinstance(value, tuple):
        return tuple(_convert(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_convert(v, device, dtype) for v in value]
    return value


class OnDevice:
    """A re-iterable of batches moved to ``device`` and floating tensors cast to ``dtype``."""

    def __init__(self, data: Any, device: torch.device | None, dtype: torch.dtype | None):
        self.data = data
        self.device = device
        self.dtype = dtype

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            yield _convert(batch, self.device, self.dtype)


def place(data: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """``data`` (one batch or an iterable of batches) on ``device`` in ``dtype``."""
    if device is None and dtype is None:
        return data
    if isinstance(data, tuple):
        return _convert(data, device, dtype)
    return OnDevice(data, device, dtype)
