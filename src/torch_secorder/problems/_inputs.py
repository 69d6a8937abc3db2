"""Checks of user input, each failing with a message that names the argument,
what was expected and what came.

``TypeError`` for a wrong type, ``ValueError`` for a wrong value (a shape that
does not fit: :class:`~torch_secorder.errors.ShapeError`, also a
``RuntimeError``).  The count checks live on the ground floor
(:mod:`torch_secorder._checks`, shared with the engine) and are re-exported here.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from torch_secorder._checks import check_chunk_size, check_count, check_generator
from torch_secorder.errors import ShapeError

__all__ = [
    "as_param_list",
    "check_chunk_size",
    "check_count",
    "check_generator",
    "check_loss",
    "check_module",
    "check_num_samples",
    "check_output",
    "check_positive_int",
    "loss_convention",
    "as_vector_list",
    "warn_zero_result",
    "zero_result_unwarned",
]


def as_param_list(params: Any, name: str = "params") -> list[Tensor]:
    """``params`` as a non-empty list of floating tensors on one device."""
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, dict):
        params = list(params.values())
    elif isinstance(params, Iterable):
        params = list(params)
    else:
        raise TypeError(
            f"{name} must be a tensor or a list of tensors, got {type(params).__name__}"
        )
    if not params:
        raise ValueError(f"{name} must contain at least one tensor, got an empty {name}")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(
                f"{name}[{i}] must have a floating dtype to be differentiated, got {p.dtype}"
            )
    devices = {p.device for p in params}
    if len(devices) > 1:
        where = ", ".join(f"{name}[{i}] on {p.device}" for i, p in enumerate(params))
        raise ValueError(f"all of {name} must be on one device, got {where}")
    return params


def check_loss(loss: Any, name: str = "func") -> Tensor:
    """The loss must be a finite scalar tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ShapeError(
            f"{name} must return a scalar tensor (one element), got shape {tuple(loss.shape)}"
        )
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"{name} returned a non-finite loss ({value}): nothing to differentiate")
    return loss


def check_output(out: Any, name: str) -> Tensor:
    """A floating tensor output (any shape), to be differentiated."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(
            f"{name} must return a floating tensor to be differentiated, got {out.dtype}"
        )
    return out


def _binds(signature: inspect.Signature, count: int) -> bool:
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def loss_convention(loss_fn: Any, name: str = "loss_fn") -> str:
    """Which arguments ``loss_fn`` takes: ``"outputs"`` or ``"model"``, read from its signature.

    The library's convention is ``loss_fn(outputs, targets)`` (``"outputs"``);
    torch-secorder 0.0.1's ``model_eigenvalues`` took ``loss_fn(model, data, target)``
    (``"model"``).  A callable that takes exactly three positional arguments is
    0.0.1's; one that takes two, or either (variadic arguments, defaults), or whose
    signature cannot be read (a builtin) is the library's.  Neither two nor three
    positional arguments: ``TypeError`` naming ``loss_fn``.

    Example:
        >>> import torch
        >>> loss_convention(torch.nn.MSELoss()), loss_convention(lambda m, x, y: m(x).sum())
        ('outputs', 'model')
    """
    if not callable(loss_fn):
        raise TypeError(f"{name} must be callable, got {type(loss_fn).__name__}")
    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a readable signature
        return "outputs"
    two, three = _binds(signature, 2), _binds(signature, 3)
    if three and not two:
        return "model"
    if two:
        return "outputs"
    raise TypeError(
        f"{name} must take (outputs, targets) (or, for model_eigenvalues, torch-secorder "
        f"0.0.1's (model, data, target)), got a callable with signature {signature}"
    )


def check_num_samples(num_samples: Any, name: str = "num_samples") -> int:
    """A positive integer number of probes (``TypeError``/``ValueError``)."""
    return check_count(num_samples, name)


def check_positive_int(value: Any, name: str) -> int:
    """A positive integer count (iterations, vectors, grid points).

    ``TypeError`` for a float, a bool or anything not an int; ``ValueError``
    for an int below 1.
    """
    return check_count(value, name)


def check_module(model: Any, name: str = "model") -> nn.Module:
    """A ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def tensor_list(v: Any, params: Sequence[Tensor], name: str = "v") -> list[Tensor]:
    """``v`` (a tensor, or a list or tuple of tensors) as a list of one tensor per parameter.

    Only the kinds and the count are checked here; the callers check the shapes.
    """
    if isinstance(v, Tensor):
        v = [v]
    elif isinstance(v, (list, tuple)):
        v = list(v)
    else:
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(v).__name__}")
    if len(v) != len(params):
        raise ShapeError(
            f"{name} must have one tensor per parameter: expected {len(params)}, got {len(v)}"
        )
    for i, vi in enumerate(v):
        if not isinstance(vi, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(vi).__name__}")
    return v


def as_vector_list(v: Any, params: Sequence[Tensor], name: str = "v") -> list[Tensor]:
    """``v`` in list format, one tensor per parameter with the parameter's shape."""
    out = []
    for i, (vi, p) in enumerate(zip(tensor_list(v, params, name), params)):
        if vi.shape != p.shape:
            raise ShapeError(
                f"{name}[{i}] has shape {tuple(vi.shape)}, expected the shape of "
                f"params[{i}], {tuple(p.shape)}"
            )
        out.append(vi.to(dtype=p.dtype, device=p.device))
    return out


def _caller_stacklevel() -> int:
    """``stacklevel`` of the first frame outside this package (and ``contextlib``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_globals.get("__name__", "").startswith("torch_secorder")
        or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


def warn_zero_result(reason: str) -> None:
    """Warn that the result is all zeros because ``reason`` (a ``UserWarning``).

    The warning points at the user's line that called into the package.
    """
    warnings.warn(
        f"{reason}: every derivative with respect to them is zero, and zeros are returned",
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


@contextlib.contextmanager
def zero_result_unwarned() -> Iterator[None]:
    """Silence :func:`warn_zero_result` inside (callers that raise instead of returning zeros)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*zeros are returned", UserWarning)
        yield


class _NoBatch:
    """Default of ``inputs`` and ``targets`` where ``data=`` may stand in for them.

    Not ``None``: ``None`` is a valid ``targets`` for a loss that ignores them.
    """

    def __repr__(self) -> str:
        return "<required unless data= is given>"


#: The value of ``inputs``/``targets`` not given (the ``data=`` form).
NO_BATCH: Any = _NoBatch()
