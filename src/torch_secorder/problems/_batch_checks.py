"""Checks of a batch against the model it is fed to: device, dtype, target shape.

Each failure names both sides (the input's dtype or device and the parameters',
the output's shape and the target's), instead of torch's message from deep in
the forward pass or its broadcasting warning:

* :func:`check_batch_device`: every tensor of the batch on the parameters'
  device, checked up front (before any forward pass).
* :func:`inputs_fit`: a dtype mismatch raised by the model's forward pass
  (integer images to a convolution, float32 inputs to a float64 model) becomes a
  ``TypeError`` naming the input and parameter dtypes.  Integer inputs are not
  refused up front: an embedding takes them.
* :func:`targets_fit`: a target the loss cannot pair with the output becomes a
  :class:`~torch_secorder.errors.ShapeError` naming both shapes; for the
  element-wise losses of :mod:`torch.nn` (MSE, L1, Huber, ...), which only warn
  and broadcast, a target of another shape than the output is refused.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torch_secorder.errors import ShapeError

__all__ = ["check_batch_device", "check_batch_fits", "inputs_fit", "targets_fit"]


def _tensors(data: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    """``(label, tensor)`` for every tensor in nested tuples, lists and dicts."""
    if isinstance(data, Tensor):
        yield name, data
    elif isinstance(data, (tuple, list)):
        for i, item in enumerate(data):
            yield from _tensors(item, f"{name}[{i}]")
    elif isinstance(data, dict):
        for key, item in data.items():
            yield from _tensors(item, f"{name}[{key!r}]")


def check_batch_device(params: Sequence[Tensor], **data: Any) -> None:
    """Raise a ``ValueError`` if a tensor of ``data`` is on another device than ``params``.

    0-dim tensors are exempt (torch mixes a CPU scalar with tensors of any device).

    Example:
        >>> import torch
        >>> w = torch.zeros(2)
        >>> check_batch_device([w], inputs=torch.zeros(3, 2, device="meta"))
        Traceback (most recent call last):
        ...
        ValueError: inputs is on meta, but the parameters are on cpu: move it with .to('cpu')
    """
    if not params:
        return
    device = params[0].device
    for argument, value in data.items():
        for label, t in _tensors(value, argument):
            if t.dim() > 0 and t.device != device:
                raise ValueError(
                    f"{label} is on {t.device}, but the parameters are on {device}: "
                    f"move it with .to({str(device)!r})"
                )


_DTYPE_MESSAGE = re.compile(r"dtype|scalar type|Input type|type \(", re.IGNORECASE)


def _dtypes(tensors: Sequence[tuple[str, Tensor]]) -> str:
    return ", ".join(f"{label} has dtype {t.dtype}" for label, t in tensors)


@contextlib.contextmanager
def inputs_fit(params: Sequence[Tensor], inputs: Any, name: str = "inputs") -> Iterator[None]:
    """Turn a dtype-mismatch error of the forward pass into a ``TypeError`` naming both dtypes.

    Only when an input's dtype differs from the parameters' dtype; any other
    error passes unchanged.
    """
    try:
        yield
    except (RuntimeError, ValueError) as err:
        if not params or not _DTYPE_MESSAGE.search(str(err)):
            raise
        dtype = params[0].dtype
        tensors = list(_tensors(inputs, name))
        odd = [(label, t) for label, t in tensors if t.dtype != dtype]
        if not odd:
            raise
        hint = (
            f"convert the inputs (.to({dtype}))"
            if all(t.is_floating_point() for _, t in odd)
            else f"integer inputs need a model that takes them (an embedding); "
            f"convert them with .to({dtype})"
        )
        raise TypeError(
            f"{_dtypes(odd)}, but the parameters of the model have dtype "
            f"{dtype}: {hint} or the model (model.to(...)). The forward pass failed with: {err}"
        ) from err


#: Losses of ``torch.nn`` that pair output and target entry by entry (torch only warns,
#: or does not even warn, when it broadcasts two different shapes).
_ELEMENTWISE: tuple[Any, ...] = (
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.poisson_nll_loss,
    F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits,
    F.soft_margin_loss,
)
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.PoissonNLLLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
)
_SHAPE_MESSAGE = re.compile(
    r"size|shape|dimension|target tensor expected|batch_size|broadcast", re.IGNORECASE
)
_BROADCAST_WARNING = re.compile(r"Using a target size")


def _loss_name(loss_fn: Callable) -> str:
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _elementwise(loss_fn: Callable) -> bool:
    return isinstance(loss_fn, _ELEMENTWISE_MODULES) or any(loss_fn is f for f in _ELEMENTWISE)


def _mismatch(loss_fn: Callable, output: Tensor, targets: Tensor, why: str) -> ShapeError:
    return ShapeError(
        f"targets of shape {tuple(targets.shape)} do not fit the output of shape "
        f"{tuple(output.shape)} (model(inputs)) for loss_fn {_loss_name(loss_fn)}: {why}"
    )


@contextlib.contextmanager
def targets_fit(loss_fn: Callable, output: Any, targets: Any) -> Iterator[None]:
    """Run ``loss_fn(output, targets)`` inside; a target that does not fit raises ``ShapeError``.

    * an element-wise loss of ``torch.nn`` (see :data:`_ELEMENTWISE`) needs equal shapes;
    * torch's broadcasting warning ("Using a target size ...") becomes the error;
    * a shape error raised by the loss (cross-entropy's batch sizes, a size that
      does not broadcast) is re-raised naming both shapes.

    Other warnings are emitted again unchanged; other errors pass unchanged.
    Without a tensor output and a tensor target the body runs unchecked.

    Example:
        >>> import torch
        >>> out, y = torch.zeros(4, 1), torch.zeros(4)
        >>> with targets_fit(torch.nn.functional.mse_loss, out, y):  # doctest: +ELLIPSIS
        ...     loss = torch.nn.functional.mse_loss(out, y)
        Traceback (most recent call last):
        ...
        torch_secorder.errors.ShapeError: targets of shape (4,) do not fit the output...(4, 1)...
    """
    if not (isinstance(output, Tensor) and isinstance(targets, Tensor)):
        yield
        return
    if _elementwise(loss_fn) and output.shape != targets.shape:
        raise _mismatch(
            loss_fn, output, targets, "an element-wise loss needs targets shaped like the output"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except (RuntimeError, ValueError, IndexError) as err:
            if isinstance(err, ShapeError) or not _SHAPE_MESSAGE.search(str(err)):
                raise
            raise _mismatch(loss_fn, output, targets, str(err)) from err
    for w in caught:
        if _BROADCAST_WARNING.search(str(w.message)):
            raise _mismatch(loss_fn, output, targets, str(w.message))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def check_batch_fits(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Any,
    targets: Any,
    params: Sequence[Tensor],
    keep_rng: bool = True,
) -> None:
    """One plain forward pass of ``loss_fn(model(inputs), targets)`` checking the batch.

    For routes without a validating forward of their own (per-sample gradients,
    loss landscapes): an input dtype that does not fit the parameters' raises a
    ``TypeError`` (:func:`inputs_fit`), a target that does not fit the output a
    :class:`~torch_secorder.errors.ShapeError` (:func:`targets_fit`).  Runs without
    autograd; with ``keep_rng`` the global RNG is left where it was (else the pass
    draws from it as a plain forward does), and the caller runs it under
    :func:`~torch_secorder.problems._purity.preserved_state` so that buffers stay as
    they were.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> check_batch_fits(model, torch.nn.functional.mse_loss, torch.zeros(4, 3),
        ...                  torch.zeros(4, 3), list(model.parameters()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        torch_secorder.errors.ShapeError: targets of shape (4, 3) do not fit ... (4, 2)...
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    devices = [p.device for p in params if p.device.type == "cuda"]
    rng = torch.random.fork_rng(devices=devices) if keep_rng else contextlib.nullcontext()
    with torch.no_grad(), rng:
        with inputs_fit(params, inputs):
            output = model(*args)
        with targets_fit(loss_fn, output, targets):
            loss_fn(output, targets)


def loss_of_output(loss_fn: Callable, targets: Any) -> Callable[[Any], Tensor]:
    """``out -> loss_fn(out, targets)``, the first call under :func:`targets_fit`.

    The first evaluation (the validating forward pass) checks the target's
    shape; later ones (inside ``torch.func`` transforms) run ``loss_fn`` as it is.
    """
    unchecked = [True]

    def loss(out: Any) -> Tensor:
        if not unchecked[0]:
            return loss_fn(out, targets)
        unchecked[0] = False
        with targets_fit(loss_fn, out, targets):
            return loss_fn(out, targets)

    return loss
