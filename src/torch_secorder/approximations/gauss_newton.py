r"""The dense generalised Gauss-Newton matrix of a model's loss.

.. math::
    G = J^\top H_{\mathrm{out}} J, \qquad
    J = \frac{\partial f(x;\theta)}{\partial \theta} \in \mathbb{R}^{M \times n}, \quad
    H_{\mathrm{out}} = \nabla^2_{f}\, \mathrm{loss}(f, y) \in \mathbb{R}^{M \times M},

for the whole batch (:math:`M` = number of output entries, :math:`n` = number of
parameters that require grad, flattened and concatenated in the order of
``model.parameters()``).  :math:`J` comes from ``vmap`` over :math:`M`
vector-Jacobian products (or over :math:`n` Jacobian-vector products when
:math:`M > n`); :math:`H_{\mathrm{out}}` from vmapped Hessian-vector products of
the loss as a function of the outputs: the dense :math:`M \times M` matrix when
:math:`M \le n`, else its products with the columns of :math:`J`.
It is the Hessian with the second derivatives of the network dropped, positive
semi-definite when the loss is convex in the outputs; for cross-entropy and
squared error it equals the type-2 Fisher (see
:mod:`torch_secorder.approximations.fisher_diagonal`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from torch_secorder.core._inputs import check_loss, check_module
from torch_secorder.core._purity import preserved_state
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._tree import tree_unravel
from torch_secorder.func.hvp import hvp
from torch_secorder.linalg.trace import chunk_ranges

__all__ = ["GGNTooLargeError", "available_memory", "gauss_newton_matrix_approximation"]

#: Fallback memory bound when the free memory cannot be read (2 GiB).
FALLBACK_MAX_BYTES = 2**31


class GGNTooLargeError(MemoryError, ValueError):
    """The dense matrix would exceed the memory bound (both a MemoryError and a ValueError)."""


def available_memory(device: torch.device) -> int | None:
    """Free memory in bytes on ``device`` now (CUDA: ``mem_get_info``; CPU: available pages)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def gauss_newton_matrix_approximation(
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
    training mode dropout uses one mask.

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
        An ``(n, n)`` tensor.

    Differences from 0.0.1: 0.0.1 accepted only MSE losses and returned the
    diagonal of :math:`J^\top J` (without the loss's factor :math:`2/(ND)`) in
    list format, whatever its name said; this returns the dense matrix, for any
    loss, including the loss Hessian.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> gauss_newton_matrix_approximation(model, torch.nn.MSELoss(), x, y)
        tensor([[2., 4.],
                [4., 8.]])
    """
    check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    named = list(model.named_parameters())
    active = [(name, p) for name, p in named if p.requires_grad]
    if not active:
        raise ValueError("model has no parameter that requires grad: nothing to differentiate")
    params = [p for _, p in named]
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    names = [name for name, _ in active]
    like = active[0][1]
    n = sum(p.numel() for _, p in active)

    with preserved_state(params, model) as rewind:

        def out_fn(values: dict[str, Tensor]) -> Tensor:
            rewind()
            return functional_call(model, values, args)

        loss_of_out = differentiable(lambda out: loss_fn(out, targets))
        with torch.no_grad():
            probe = out_fn({name: p for name, p in active})
            if not isinstance(probe, Tensor):
                raise TypeError(f"model(inputs) must return a tensor, got {type(probe).__name__}")
            check_loss(loss_of_out(probe), "loss_fn(model(inputs), targets)")
        m = probe.numel()
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
                f"{'unknown' if free is None else f'{free:,} bytes'}); use GGN-vector products "
                "or a diagonal instead, or pass a larger max_bytes"
            )

        point = {name: (p if create_graph else p.detach()) for name, p in active}
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
                tangents = dict(zip(names, tree_unravel(eye, [p for _, p in active]), strict=True))
                J = vmap(lambda t: jvp(out_fn, (point,), (t,))[1].reshape(m), randomness="same")(
                    tangents
                ).T  # (M, n)
                cols = J.T.reshape(n, *out.shape)
                step = chunk_size or max(1, 2**24 // max(m, 1))
                pieces = [
                    vmap(lambda v: hvp(loss_of_out, o, v))(cols[a:b]).reshape(b - a, m)
                    for a, b in chunk_ranges(n, step)
                ]
                HJ = torch.cat(pieces).T  # (M, n)
            G = J.T @ HJ
    return (G + G.T) / 2
