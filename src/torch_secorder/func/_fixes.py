r"""Work-arounds for torch operators whose higher-order derivatives fail.

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

* ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and
  the older ``torch.nn.utils.weight_norm``): its fused kernel
  ``_weight_norm_interface`` has no forward-mode AD and a wrong double backward
  in torch 2.13 (an HVP 15% off); computed as :math:`g\,v/\|v\|` with the norm
  over every dimension but ``dim`` (all of them for ``dim=-1``) from ``sqrt``,
  ``sum`` and arithmetic.

* Losses without forward-mode AD of their backward (``F.huber_loss``,
  ``F.soft_margin_loss``) or without any double backward (``F.multi_margin_loss``,
  ``F.multilabel_margin_loss``), and ``F.binary_cross_entropy``, whose double
  backward adds ``1e-12`` to a denominator (second derivatives up to
  :math:`10^{-8}` relative off, and 50% for confident predictions): each
  computed elementwise from its definition (every reduction, ``weight``,
  ``delta``, ``p``, ``margin``; the forward values are torch's, including the
  clamp of the logarithms at -100 of the binary cross-entropy).  The other
  losses of ``torch.nn.functional`` have exact derivatives of every order.

* ``F.hardsigmoid`` (``nn.Hardsigmoid``): no forward-mode AD of its backward;
  computed as ``F.hardtanh(x + 3, 0, 6) / 6`` (the same values, the slope 1/6
  strictly inside ``(-3, 3)`` as torch's).  ``F.rrelu`` in eval mode
  (``nn.RReLU().eval()``): ``rrelu_with_noise`` has no batching rule; in eval mode
  it is the leaky ReLU of slope ``(lower + upper) / 2``, and computed so.

Dropout is not rerouted: torch's own kernels run (``bernoulli_`` in the input's
memory order on CPU, ``native_dropout`` on CUDA), so the first evaluation of a
loss draws exactly the mask a plain forward pass draws; the wrappers record
those draws and replay them in every later evaluation
(:class:`~torch_secorder.problems._purity.RandomDraws`).

:func:`differentiable` wraps a loss so that every call runs under the mode.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction
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


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    # torch.norm_except_dim: dim == -1 is the norm of the whole tensor, any other
    # (wrapped) dim keeps that dimension.
    if dim == -1:
        norm = (v * v).sum().sqrt()
    else:
        keep = dim % v.dim()
        others = tuple(d for d in range(v.dim()) if d != keep)
        # (An empty tuple of dims would make ``sum`` reduce every dimension.)
        norm = ((v * v).sum(others, keepdim=True) if others else v * v).sqrt()
    return v * (g / norm)


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    return F.hardtanh(input + 3.0, 0.0, 6.0) / 6.0


def _rrelu(
    input: Tensor,
    lower: float = 1.0 / 8,
    upper: float = 1.0 / 3,
    training: bool = False,
    inplace: bool = False,
) -> Tensor:
    if training:  # random slopes: torch's own kernel draws them
        return F.rrelu(input, lower, upper, training, inplace)
    return F.leaky_relu(input, (lower + upper) / 2)


# ------------------------------------------------------------------------- losses


def _reduction_of(reduction: str, size_average=None, reduce=None) -> str:
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def _is_plain(t: Tensor) -> bool:
    """A tensor outside any torch.func transform (its values can be inspected)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    reduction = _reduction_of(reduction)
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )
    if not delta > 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    if weight is not None and weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    diff = input - target
    size = diff.abs()
    loss = torch.where(size < delta, 0.5 * diff * diff, delta * (size - 0.5 * delta))
    return _reduce(loss if weight is None else loss * weight, reduction)


def _soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    reduction = _reduction_of(reduction, size_average, reduce)
    return _reduce(torch.log1p(torch.exp(-input * target)), reduction)


def _binary_cross_entropy(
    input, target, weight=None, size_average=None, reduce=None, reduction="mean"
):
    reduction = _reduction_of(reduction, size_average, reduce)
    if target.size() != input.size():
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}) is deprecated. Please ensure they have the same size."
        )
    if _is_plain(input) and bool(((input < 0) | (input > 1)).any()):
        raise RuntimeError("all elements of input should be between 0 and 1")
    # log(0) = -inf is clamped to -100 as torch does; the where keeps its derivative 0
    # there (0/0 = nan in the backward of log otherwise), as at any clamped point.
    positive, below_one = input > 0, input < 1
    log_p = torch.where(positive, torch.log(torch.where(positive, input, 1.0)), -100.0)
    log_q = torch.where(below_one, torch.log1p(-torch.where(below_one, input, 0.0)), -100.0)
    log_p, log_q = log_p.clamp(min=-100), log_q.clamp(min=-100)
    loss = -(target * log_p + (1 - target) * log_q)
    return _reduce(loss if weight is None else loss * weight, reduction)


def _as_rows(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, C)`` scores and their targets from the 0-, 1- or 2-dim forms."""
    if input.dim() == 2:
        return input, target
    return input.reshape(1, -1), target.reshape(1, *target.shape[-1:] if target.dim() else (1,))


def _unrows(loss: Tensor, input: Tensor, reduction: str) -> Tensor:
    if reduction == "none" and input.dim() < 2:
        loss = loss.reshape(())
    return _reduce(loss, reduction)


def _multi_margin_loss(
    input,
    target,
    p=1,
    margin=1.0,
    weight=None,
    size_average=None,
    reduce=None,
    reduction="mean",
):
    reduction = _reduction_of(reduction, size_average, reduce)
    if p not in (1, 2):
        raise ValueError("only p == 1 and p == 2 supported")
    if weight is not None and weight.dim() != 1:
        raise ValueError("weight must be one-dimensional")
    x, y = _as_rows(input, target)
    y = y.reshape(-1)
    classes = x.shape[1]
    # relu, not clamp: its derivative at 0 is 0, as in torch's backward (z > 0).
    z = torch.relu(margin - x.gather(1, y.unsqueeze(1)) + x)
    if p == 2:
        z = z * z
    if weight is not None:
        z = z * weight[y].unsqueeze(1)
    others = torch.arange(classes, device=y.device) != y.unsqueeze(1)
    return _unrows((z * others).sum(1) / classes, input, reduction)


def _multilabel_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    reduction = _reduction_of(reduction, size_average, reduce)
    x, y = _as_rows(input, target)
    classes = x.shape[1]
    # The targets of a row are its entries before the first -1 (repeats count twice).
    listed = (y >= 0).long().cumprod(1).bool()
    hits = (y.unsqueeze(2) == torch.arange(classes, device=y.device)) & listed.unsqueeze(2)
    count = hits.sum(1).to(x.dtype)  # (N, C): how often class c is listed
    is_target = count > 0
    pair = torch.relu(1 - x.unsqueeze(2) + x.unsqueeze(1))  # [n, j, k] = max(0, 1 - x_j + x_k)
    mask = count.unsqueeze(2) * (~is_target).unsqueeze(1).to(x.dtype)
    return _unrows((pair * mask).sum((1, 2)) / classes, input, reduction)


_REROUTES = {
    F.mse_loss: _mse_loss,
    F.scaled_dot_product_attention: _math_sdpa,
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    torch._weight_norm: _weight_norm,
    F.hardsigmoid: _hardsigmoid,
    F.rrelu: _rrelu,
    F.huber_loss: _huber_loss,
    F.soft_margin_loss: _soft_margin_loss,
    F.binary_cross_entropy: _binary_cross_entropy,
    F.multi_margin_loss: _multi_margin_loss,
    F.multilabel_margin_loss: _multilabel_margin_loss,
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
