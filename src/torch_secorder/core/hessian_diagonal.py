r"""The exact Hessian diagonal of a closure or a model's loss.

.. math::
    \operatorname{diag}(H)_i = \frac{\partial^2 L}{\partial \theta_i^2}.

Computed exactly (never estimated).  For a model's loss
(:func:`model_hessian_diagonal`, and the exact :func:`model_hessian_trace`) the
engine's :func:`~torch_secorder.func.fast_hessian_diagonal` picks, per parameter,
the cheapest exact route: a closed-form second-order backward pass through the
recorded calls, a few products per layer for parameters read by one affine layer
(linear, convolution, embedding, normalisation affine) whose rows do not
interact, and the chunked one-hot sweep for the rest.  A closure takes the same
routes (it is recorded as a pure function of its tensors).  ``create_graph=True``
and losses that draw random numbers take the sweep
(:func:`torch_secorder.func.hessian_diagonal`): one Hessian-vector product per
parameter entry, vmapped ``chunk_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from torch_secorder.operators import _convenience
from torch_secorder.problems._hessian_diagonal import active_hessian_diagonal
from torch_secorder.problems._inputs import NO_BATCH, as_vector_list, check_chunk_size
from torch_secorder.problems._problem import closure_problem, module_problem

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]


def hessian_diagonal(
    func: Callable[[], Tensor],
    params: Any,
    v: list[Tensor] | None = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    chunk_size: int | None = None,
    progress: bool = True,
) -> list[Tensor]:
    r"""Exact diagonal of the Hessian of ``func()`` with respect to ``params``.

    Args:
        func: Zero-argument closure returning a scalar tensor (the loss); it reads
            the tensors in ``params``.
        params: A tensor or list of tensors (floating, one device).
        v: Optional list of tensors shaped like ``params``: returns
            :math:`v_i H_{ii}` instead of :math:`H_{ii}`.
        create_graph: Make the result differentiable (third derivatives).
        strict: Raise a ``ValueError`` naming the index of a tensor that does not
            require grad or that ``func`` does not use; with ``False`` such a
            tensor gets zeros.
        chunk_size: Basis vectors per vmapped HVP call; peak memory is about
            ``chunk_size`` HVPs (default: about ``2**24`` tangent entries per chunk).
        progress: Show a progress bar if the sweep takes more than a few seconds.

    Returns:
        One tensor per parameter, shaped like it.

    Differences from 0.0.1: the same numbers, without one backward pass per
    entry: the closure is recorded once and each tensor takes the cheapest exact
    route of :func:`~torch_secorder.func.fast_hessian_diagonal` (closed form through
    the recorded calls, a few products per affine layer, else a vmapped sweep); a
    single tensor ``params`` is accepted.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_diagonal(lambda: (x ** 3).sum(), [x])
        [tensor([ 6., 12.])]
    """
    check_chunk_size(chunk_size)
    with closure_problem(func, params, strict=strict, create_graph=create_graph) as problem:
        vectors = as_vector_list(v, problem.params) if v is not None else None
        diag = problem.expand(active_hessian_diagonal(problem, chunk_size, progress))
    if vectors is not None:
        diag = [d * vi for d, vi in zip(diag, vectors)]
    return diag


def model_hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any = NO_BATCH,
    targets: Any = NO_BATCH,
    create_graph: bool = False,
    strict: bool = False,
    *,
    data: Any = None,
    reduction: str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    group: Any = None,
) -> list[Tensor]:
    r"""Exact Hessian diagonal of ``loss_fn(model(inputs), targets)`` w.r.t. ``model.parameters()``.

    In training mode, batch norm uses the batch statistics (the samples interact)
    and dropout one fixed mask; in eval mode, the running statistics and no
    dropout.  Nothing of the model changes: parameters, ``.grad``,
    ``requires_grad``, training flags and buffers are as before, also on error.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        create_graph: Make the result differentiable.
        strict: See :func:`hessian_diagonal`.
        chunk_size: See :func:`hessian_diagonal`.
        progress: Show a progress bar for long runs.
        data: Keyword only, instead of ``inputs`` and ``targets``: one
            ``(inputs, targets)`` batch or an iterable of batches (a ``DataLoader``);
            the diagonal is that of the Hessian of the loss over all the samples
            (batches weighted by their size for a mean loss, summed for a summed one;
            see :mod:`torch_secorder.operators`).  ``create_graph`` and ``strict``
            are not supported with ``data``.
        reduction: With ``data``, ``"mean"`` or ``"sum"`` for a plain-function
            ``loss_fn`` that does not declare its reduction.
        group: With ``data`` (this rank's shard), data parallelism as for the
            operators (see :doc:`/distributed`): the diagonal over the union of the
            ranks' shards, the same on every rank.

    Returns:
        One tensor per parameter of ``model.parameters()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> model_hessian_diagonal(model, torch.nn.functional.mse_loss, x, y)
        [tensor([[2., 8.]])]
        >>> model_hessian_diagonal(model, torch.nn.functional.mse_loss, data=[(x, y), (x, y)])
        [tensor([[2., 8.]])]
    """
    check_chunk_size(chunk_size)
    grouped = group is not None and group is not False
    if data is not None or inputs is NO_BATCH or targets is NO_BATCH or grouped:
        _convenience.data_or_batch(
            "model_hessian_diagonal",
            inputs,
            targets,
            data,
            group,
            create_graph=create_graph,
            strict=strict,
        )
        A = _convenience.hessian_operator_of(
            model,
            loss_fn,
            data,
            reduction=reduction,
            chunk_size=chunk_size,
            strategy="auto",
            progress=progress,
            group=group,
        )
        return _convenience.operator_diagonal(model, A)
    with module_problem(
        model, loss_fn, inputs, targets, strict=strict, create_graph=create_graph
    ) as problem:
        return problem.expand(active_hessian_diagonal(problem, chunk_size, progress))
