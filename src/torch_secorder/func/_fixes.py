"""Work-arounds for torch operators whose higher-order derivatives fail.

:class:`DifferentiableOpsMode` is a :class:`~torch.overrides.TorchFunctionMode`
that reroutes such calls to equal compositions of operators that work under
forward-over-reverse AD and double backward:

* ``F.mse_loss``: ``jvp(grad(...))`` raises "ZeroTensors are immutable" with
  ``reduction="mean"``, and ``torch.compile`` of forward-over-reverse through it
  crashes (torch 2.13); computed as ``((input - target) ** 2).mean()`` (or
  ``.sum()``, or unreduced), the same numbers.

* ``F.scaled_dot_product_attention``: the fused kernels (flash, memory-efficient,
  cuDNN, CPU flash) have neither forward-mode AD nor double backward; every call
  goes to the math kernel, whose derivatives of every order exist.  An active
  mode also turns off the native fast paths of ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` (they check for torch-function overrides).

:func:`differentiable` wraps a loss so that every call runs under the mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["DifferentiableOpsMode", "differentiable"]

Fn = TypeVar("Fn", bound=Callable)


def _mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    if size_average is not None or reduce is not None or weight is not None:
        legacy = {"size_average": size_average, "reduce": reduce, "reduction": reduction}
        if weight is not None:
            legacy["weight"] = weight
        return F.mse_loss(input, target, **legacy)
    squared = (input - target) ** 2
    if reduction == "mean":
        return squared.mean()
    if reduction == "sum":
        return squared.sum()
    if reduction == "none":
        return squared
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _math_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False,
):
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


_REROUTES = {F.mse_loss: _mse_loss, F.scaled_dot_product_attention: _math_sdpa}


class DifferentiableOpsMode(TorchFunctionMode):
    """Reroute operators with broken higher-order derivatives (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reroute = _REROUTES.get(func)
        if reroute is not None:
            return reroute(*args, **kwargs)
        return func(*args, **kwargs)


def differentiable(f: Fn) -> Fn:
    """``f`` with every call run under :class:`DifferentiableOpsMode` and the math SDPA kernel.

    The mode does not see calls made inside a Python function that it dispatches
    (a mode is off while it handles a call), e.g. ``F.scaled_dot_product_attention``
    inside ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``); :func:`torch.nn.attention.sdpa_kernel` restricted
    to the math backend covers those.
    """

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with DifferentiableOpsMode(), sdpa_kernel(SDPBackend.MATH):
            return f(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
