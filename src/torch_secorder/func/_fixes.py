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

* ``F.layer_norm``, ``F.batch_norm`` with batch statistics (training mode) and
  ``F.instance_norm``: their double backward is wrong in torch 2.13 (the second
  derivative of the loss with respect to the norm's weight, then its input, does
  not match the other order: an asymmetric Hessian); computed from ``mean``,
  ``rsqrt`` and arithmetic, the same values with correct derivatives.  Batch
  statistics are used without updating running statistics (an in-place update of
  a captured buffer is an error inside ``torch.func`` transforms anyway).

* ``F.dropout`` in training mode: the native kernel draws its mask in the
  input's memory order, so a transposed input (``nn.TransformerEncoderLayer``'s
  attention output) gets a different mask under ``vmap``, whose batched tensors
  have another layout; the mask is drawn in the logical order of the shape
  instead (for a contiguous input, the very mask the native kernel draws), so
  every route computes the Hessian of the same loss.

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
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


def _normalise(input, dims, eps):
    mean = input.mean(dims, keepdim=True)
    centred = input - mean
    return centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    out = _normalise(input, tuple(range(-len(normalized_shape), 0)), eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _channel_affine(out, weight, bias):
    shape = (1, -1) + (1,) * (out.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    if not training and running_mean is not None and running_var is not None:
        # Running statistics: an affine map, whose derivatives torch gets right.
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out = _normalise(input, (0, *range(2, input.dim())), eps)
    return _channel_affine(out, weight, bias)


def _instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    if not use_input_stats:
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
    out = _normalise(input, tuple(range(2, input.dim())), eps)
    return _channel_affine(out, weight, bias)


def _dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0.0:
        return input
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 1.0:
        return input * 0.0
    # The mask is drawn in the logical (contiguous) order of the input's shape, so
    # every route (plain forward, vmapped, batched backward) draws the same mask.
    mask = torch.empty(input.shape, dtype=input.dtype, device=input.device).bernoulli_(1 - p)
    mask.div_(1 - p)
    return input * mask


_REROUTES = {
    F.mse_loss: _mse_loss,
    F.dropout: _dropout,
    F.scaled_dot_product_attention: _math_sdpa,
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
}


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
