r"""The generalised Gauss-Newton (GGN) matrix of a model's loss: its diagonal and the dense matrix.

.. math::
    G = J^\top H_{\mathrm{out}} J, \qquad
    J = \frac{\partial f(x;\theta)}{\partial \theta} \in \mathbb{R}^{M \times n}, \quad
    H_{\mathrm{out}} = \nabla^2_{f}\, \mathrm{loss}(f, y) \in \mathbb{R}^{M \times M},

for the whole batch (:math:`M` = number of output entries, :math:`n` = number of
parameters that require grad, flattened and concatenated in the order of
``model.parameters()``).  It is the Hessian with the second derivatives of the
network dropped, positive semi-definite when the loss is convex in the outputs;
for cross-entropy and squared error it equals the type-2 Fisher (see
:mod:`torch_secorder.approximations.fisher_diagonal`).

* :func:`gauss_newton_matrix_approximation` (0.0.1's name and return format):
  the diagonal :math:`G_{ii} = \sum_{a,b} J_{ai} (H_{\mathrm{out}})_{ab} J_{bi}`,
  one tensor per parameter that requires grad.  It takes the engine's exact
  routes (:func:`torch_secorder.func.ggn_diagonal`) and, with
  ``create_graph=True`` or a model that draws random numbers (dropout in
  training mode), chunks of columns of :math:`J` by vmapped Jacobian-vector
  products, each multiplied by :math:`H_{\mathrm{out}}` in output space.
* :func:`gauss_newton_matrix`: the dense :math:`n \times n` matrix.  :math:`J`
  comes from ``vmap`` over :math:`M` vector-Jacobian products (or over :math:`n`
  Jacobian-vector products when :math:`M > n`); :math:`H_{\mathrm{out}}` from
  vmapped Hessian-vector products of the loss as a function of the outputs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from torch_secorder import _chunks
from torch_secorder._checks import check_chunk_size
from torch_secorder._chunks import chunk_entries
from torch_secorder.func._tree import tree_unravel
from torch_secorder.func.hvp import hvp
from torch_secorder.linalg.trace import chunk_ranges
from torch_secorder.problems._batch_checks import check_batch_device
from torch_secorder.problems._ggn import GGNView, ggn_view, problem_ggn_diagonal
from torch_secorder.problems._inputs import check_module
from torch_secorder.problems._problem import module_problem

__all__ = [
    "GGNTooLargeError",
    "available_memory",
    "gauss_newton_matrix",
    "gauss_newton_matrix_approximation",
]

#: Fallback memory bound when the free memory cannot be read (2 GiB).
FALLBACK_MAX_BYTES = 2**31


class GGNTooLargeError(MemoryError, ValueError):
    """The dense matrix would exceed the memory bound (both a MemoryError and a ValueError)."""


def available_memory(device: torch.device) -> int | None:
    """Free memory in bytes on ``device`` now (CUDA: the chunk policy's reading,
    :meth:`~torch_secorder._chunks.MemoryReader.free`; CPU: available pages)."""
    try:
        if device.type == "cuda":
            return _chunks.memory_reader.free(device)
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def _has_trainable(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any) -> bool:
    """Check ``model`` and ``loss_fn``; whether a parameter requires grad.

    Without one there is nothing to differentiate: the batch's device is checked
    (the only check left) and the caller warns or raises.
    """
    check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        return True
    check_batch_device(params, inputs=inputs, targets=targets)
    return False


@contextlib.contextmanager
def _ggn_problem(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Any, targets: Any
) -> Iterator[GGNView]:
    """Check the arguments, run one forward pass, and keep the user's state while in use.

    A view of the one model-level problem,
    :func:`~torch_secorder.problems._problem.module_problem` of the model's output (state
    preserved, one evaluation's buffers and random draws for every later one).
    """
    if not _has_trainable(model, loss_fn, inputs, targets):  # the callers warn or raise
        yield GGNView([], [], lambda values: model(inputs), lambda out: out, 0, False)
        return
    with module_problem(model, None, inputs, targets) as problem:
        yield ggn_view(problem, loss_fn, targets)


def gauss_newton_matrix_approximation(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    create_graph: bool = False,
    *,
    chunk_size: int | None = None,
) -> list[Tensor]:
    r"""Exact diagonal of the GGN :math:`J^\top H_{\mathrm{out}} J` of the loss of ``model``.

    .. math::
        G_{ii} = \sum_{a,b} \frac{\partial f_a}{\partial \theta_i}
                 \frac{\partial^2 \mathrm{loss}}{\partial f_a \partial f_b}
                 \frac{\partial f_b}{\partial \theta_i}.

    For ``nn.MSELoss()`` (mean over :math:`N` samples of :math:`D` outputs),
    :math:`H_{\mathrm{out}} = \frac{2}{ND} I` and
    :math:`G = \frac{2}{ND} J^\top J`; for ``nn.MSELoss(reduction="sum")``,
    :math:`2 J^\top J`.  Any loss is accepted: its Hessian with respect to the
    outputs is computed, not assumed.  The routes are those of
    :func:`torch_secorder.func.ggn_diagonal` (a closed-form second-order backward
    pass through the recorded calls, a few products per layer, a one-hot sweep for
    the rest); with ``create_graph=True``, or when the model draws random numbers
    (dropout in training mode: one mask for the whole call), chunks of columns
    of :math:`J` by vmapped Jacobian-vector products.  Nothing of the model
    changes (batch norm running statistics included).  The dense matrix is
    :func:`gauss_newton_matrix`.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar (any loss).
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        create_graph: Make the result differentiable w.r.t. the parameters.
        chunk_size: Columns of :math:`J` per vmapped call (default: about
            ``2**24`` entries of :math:`J` per chunk).

    Returns:
        One tensor per parameter of ``model`` that requires grad, shaped like it,
        in the order of ``model.parameters()`` (frozen parameters are left out, as
        in 0.0.1).  A model with no parameter that requires grad gives ``[]``
        with a warning.

    Differences from 0.0.1: 0.0.1 accepted only MSE losses (``ValueError``
    otherwise) and returned :math:`\operatorname{diag}(J^\top J)`, the GGN of
    :math:`\frac12 \|f - y\|^2`, whatever the loss's reduction: for
    ``nn.MSELoss()`` that is :math:`\frac{ND}{2}` times the GGN of the loss
    given.  Here the result is the GGN diagonal of the loss given, for any loss
    (for ``nn.L1Loss``, whose second derivative vanishes, it is zero).  The
    dense matrix that 0.1.0 development versions returned under this name is
    :func:`gauss_newton_matrix`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> gauss_newton_matrix_approximation(model, torch.nn.MSELoss(), x, y)
        [tensor([[2., 8.]])]
    """
    check_chunk_size(chunk_size)
    if not _has_trainable(model, loss_fn, inputs, targets):
        warnings.warn(
            "gauss_newton_matrix_approximation: model has no parameter that requires "
            "grad; returning an empty list",
            stacklevel=2,
        )
        return []
    with module_problem(model, None, inputs, targets) as problem:
        return problem_ggn_diagonal(
            problem, loss_fn, targets, create_graph=create_graph, chunk_size=chunk_size
        )


def gauss_newton_matrix(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    create_graph: bool = False,
    *,
    max_bytes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""The dense GGN :math:`J^\top H_{\mathrm{out}} J` of ``loss_fn(model(inputs), targets)``.

    Refuses (:class:`GGNTooLargeError`, a ``MemoryError`` and a ``ValueError``)
    before allocating anything when the matrix and its intermediates,
    :math:`(n^2 + 2Mn + \min(M, n)^2)` entries, would exceed ``max_bytes``.
    Nothing of the model changes (batch norm running statistics included); in
    training mode dropout uses one mask.  Its diagonal alone, without the
    :math:`n^2` memory, is :func:`gauss_newton_matrix_approximation`.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar (any loss; its
            Hessian w.r.t. the outputs is computed, not assumed).
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        create_graph: Make the result differentiable w.r.t. the parameters.
        max_bytes: Memory bound in bytes; default: half the memory free on the
            parameters' device when called (2 GiB if it cannot be read).
        chunk_size: Columns of :math:`J` per vmapped loss-Hessian product (only
            used when :math:`M > n`).

    Returns:
        An ``(n, n)`` tensor over the parameters that require grad, flattened and
        concatenated in the order of ``model.parameters()``.

    New in 0.1.0 (0.0.1 had no dense GGN).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> gauss_newton_matrix(model, torch.nn.MSELoss(), x, y)
        tensor([[2., 4.],
                [4., 8.]])
    """
    check_chunk_size(chunk_size)
    with _ggn_problem(model, loss_fn, inputs, targets) as problem:
        if not problem.active:
            raise ValueError("model has no parameter that requires grad: nothing to differentiate")
        n, m = problem.n, problem.m
        like = problem.active[0]
        itemsize = like.element_size()
        needed = (n * n + 2 * m * n + min(m, n) ** 2) * itemsize
        free = available_memory(like.device)
        limit = max_bytes
        if limit is None:
            limit = free // 2 if free is not None else FALLBACK_MAX_BYTES
        if needed > limit:
            raise GGNTooLargeError(
                f"the dense GGN of n={n} parameters (M={m} outputs) needs about {needed:,} bytes "
                f"({n}x{n} matrix plus the Jacobian), above the bound max_bytes={limit:,} "
                f"(free memory on {like.device}: "
                f"{'unknown' if free is None else f'{free:,} bytes'}); use "
                "gauss_newton_matrix_approximation for the diagonal, GGN-vector products "
                "(gauss_newton_product), or pass a larger max_bytes"
            )

        names, out_fn, loss_of_out = problem.names, problem.out_fn, problem.loss_of_out
        point = problem.point(create_graph)
        # Jacobian and loss Hessian by vmapped vjp / jvp / hvp over identity bases
        # (torch.func.jacrev/jacfwd/hessian fill their bases in place, which the
        # state preservation would undo under a create_graph result).
        with torch.enable_grad():
            out, vjp_fn = vjp(out_fn, point)
            o = out if create_graph else out.detach()
            if m <= n:
                basis = torch.eye(m, dtype=out.dtype, device=out.device).reshape(m, *out.shape)
                jac = vmap(vjp_fn)(basis)[0]
                J = torch.cat([jac[name].reshape(m, -1) for name in names], dim=1)  # (M, n)
                H = vmap(lambda e: hvp(loss_of_out, o, e))(basis).reshape(m, m)
                HJ = H @ J
            else:
                eye = torch.eye(n, dtype=out.dtype, device=out.device)
                tangents = dict(zip(names, tree_unravel(eye, problem.active), strict=True))
                J = vmap(lambda t: jvp(out_fn, (point,), (t,))[1].reshape(m), randomness="same")(
                    tangents
                ).T  # (M, n)
                cols = J.T.reshape(n, *out.shape)
                step = chunk_size or max(1, chunk_entries(out.device) // max(m, 1))
                pieces = [
                    vmap(lambda v: hvp(loss_of_out, o, v))(cols[a:b]).reshape(b - a, m)
                    for a, b in chunk_ranges(n, step)
                ]
                HJ = torch.cat(pieces).T  # (M, n)
            G = J.T @ HJ
    return (G + G.T) / 2
