"""Checks of user input, each failing with a message that names the argument,
what was expected and what came."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = [
    "as_param_list",
    "check_loss",
    "check_module",
    "check_num_samples",
    "check_positive_int",
    "as_vector_list",
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
        raise ValueError(
            f"{name} must return a scalar tensor (one element), got shape {tuple(loss.shape)}"
        )
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"{name} returned a non-finite loss ({value}): nothing to differentiate")
    return loss


def check_num_samples(num_samples: Any, name: str = "num_samples") -> int:
    """A positive integer number of probes."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"{name} must be an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"{name} must be >= 1, got {num_samples}")
    return num_samples


def check_positive_int(value: Any, name: str) -> int:
    """A positive integer count (iterations, vectors, grid points)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_module(model: Any, name: str = "model") -> nn.Module:
    """A ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def as_vector_list(v: Any, params: Sequence[Tensor], name: str = "v") -> list[Tensor]:
    """``v`` in list format, one tensor per parameter with the parameter's shape."""
    if isinstance(v, Tensor):
        v = [v]
    elif isinstance(v, (list, tuple)):
        v = list(v)
    else:
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(v).__name__}")
    if len(v) != len(params):
        raise ValueError(
            f"{name} must have one tensor per parameter: expected {len(params)}, got {len(v)}"
        )
    out = []
    for i, (vi, p) in enumerate(zip(v, params)):
        if not isinstance(vi, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(vi).__name__}")
        if vi.shape != p.shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(vi.shape)}, expected the shape of "
                f"params[{i}], {tuple(p.shape)}"
            )
        out.append(vi.to(dtype=p.dtype, device=p.device))
    return out
