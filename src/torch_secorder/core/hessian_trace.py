r"""The Hessian trace of a closure or a model's loss: exact, or Hutchinson with an error bar.

.. math::
    \operatorname{tr}(H) = \sum_i H_{ii}
    \approx \frac{1}{m}\sum_{j=1}^m v_j^\top H v_j,\quad v_j \in \{\pm 1\}^n.

``num_samples=None`` gives the exact trace, the sum of the exact diagonal.  An
integer ``m`` gives Hutchinson's estimate with ``m`` Rademacher probes; when
``m >= n`` (the number of parameter entries) the exact trace costs no more
(``n`` products), so it is computed exactly instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.linalg.trace import TraceEstimate
from torch_secorder.operators import _convenience
from torch_secorder.problems._hessian_diagonal import active_hessian_diagonal
from torch_secorder.problems._inputs import (
    NO_BATCH,
    check_chunk_size,
    check_count,
    check_generator,
    check_num_samples,
)
from torch_secorder.problems._problem import LossProblem, closure_problem, module_problem

__all__ = [
    "hessian_trace",
    "model_hessian_trace",
    "hessian_trace_estimate",
    "model_hessian_trace_estimate",
]


def problem_trace(
    problem: LossProblem,
    num_samples: int | None,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
    distribution: str = "rademacher",
) -> TraceEstimate:
    """Exact trace (``std_error`` 0) or Hutchinson estimate of a problem's Hessian."""
    check_generator(generator, problem.params[0].device)
    if num_samples is not None:
        check_num_samples(num_samples)
    if not problem.active:
        zero = torch.zeros((), dtype=problem.params[0].dtype, device=problem.params[0].device)
        return TraceEstimate(zero, zero.clone(), zero.reshape(1))
    if num_samples is None or num_samples >= problem.dim:
        diag = active_hessian_diagonal(problem, chunk_size, progress)
        exact = sum(d.sum() for d in diag)
        return TraceEstimate(exact, torch.zeros_like(exact), exact.reshape(1))
    return problem.hutchinson(
        num_samples,
        distribution=distribution,
        generator=generator,
        chunk_size=chunk_size,
        strategy=strategy,
        progress=progress,
    )


def hessian_trace(
    func: Callable[[], Tensor],
    params: Any,
    num_samples: int | None = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
) -> Tensor:
    r"""Trace of the Hessian of ``func()`` with respect to ``params``.

    Args:
        func: Zero-argument closure returning a scalar tensor; it reads ``params``.
        params: A tensor or list of tensors (floating, one device).
        num_samples: ``None`` (default): the exact trace, the sum of the exact
            diagonal. An int ``m >= 1``: Hutchinson's estimate with ``m``
            Rademacher probes, unbiased, exact when the Hessian is diagonal; if
            ``m`` is at least the number of parameter entries ``n``, the exact
            trace is computed instead (it costs ``n`` products, no more).
        create_graph: Make the result differentiable (e.g. the gradient of the
            trace, a third derivative).
        strict: Raise a ``ValueError`` naming the index of a tensor that does not
            require grad or that ``func`` does not use; ``False``: it contributes 0.
        generator: Source of the probes; the same seed gives the same number.
        chunk_size: Products per batched call; peak memory is about
            ``chunk_size`` Hessian-vector products.
        strategy: How products are batched: ``"auto"``, ``"vmap"``, ``"graph"``
            or ``"graph_batched"`` (see :data:`torch_secorder.problems._problem.STRATEGIES`).
        progress: Show a progress bar for runs longer than a few seconds.

    Returns:
        A 0-dim tensor. For the error bar of an estimate use
        :func:`hessian_trace_estimate`.

    Differences from 0.0.1: 0.0.1 ignored ``num_samples`` (default 1) and always
    summed the diagonal; here ``None`` is exact and an int is Hutchinson.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_trace(lambda: x.pow(2).sum(), [x])
        tensor(4.)
        >>> hessian_trace(lambda: x.pow(2).sum(), [x], num_samples=1,
        ...               generator=torch.Generator().manual_seed(0))
        tensor(4.)
    """
    check_count(num_samples, "num_samples", allow_none=True)
    check_chunk_size(chunk_size)
    return hessian_trace_estimate(
        func,
        params,
        num_samples,
        create_graph,
        strict,
        generator=generator,
        chunk_size=chunk_size,
        strategy=strategy,
        progress=progress,
    ).estimate


def hessian_trace_estimate(
    func: Callable[[], Tensor],
    params: Any,
    num_samples: int | None = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
) -> TraceEstimate:
    """Like :func:`hessian_trace`, returning ``(estimate, std_error, samples)``.

    ``std_error`` is the standard deviation of the per-probe values over
    :math:`\\sqrt{m}` (0 for an exact trace, ``nan`` for one probe).

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> est = hessian_trace_estimate(lambda: (x ** 3).sum() + x.prod(), [x], 200,
        ...                              generator=torch.Generator().manual_seed(0))
        >>> float(est.estimate), float(est.std_error)
        (18.0, 0.0)
    """
    check_count(num_samples, "num_samples", allow_none=True)
    check_chunk_size(chunk_size)
    with closure_problem(func, params, strict=strict, create_graph=create_graph) as problem:
        return problem_trace(
            problem,
            num_samples,
            generator=generator,
            chunk_size=chunk_size,
            strategy=strategy,
            progress=progress,
        )


def model_hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any = NO_BATCH,
    targets: Any = NO_BATCH,
    num_samples: int | None = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    data: Any = None,
    reduction: str | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
    group: Any = None,
) -> Tensor:
    r"""Trace of the Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. ``model.parameters()``.

    Same semantics as :func:`hessian_trace`.  Training-mode batch norm uses the
    batch statistics and dropout one fixed mask for every probe; the model is
    left exactly as it was (parameters, ``.grad``, ``requires_grad``, training
    flags, buffers), also on error.  Attention runs under the math kernel, so
    transformers with ``scaled_dot_product_attention`` work.

    Over a data set: ``data=`` (keyword only, instead of ``inputs`` and
    ``targets``) is one ``(inputs, targets)`` batch or an iterable of batches (a
    ``DataLoader``); the trace is that of the Hessian of the loss over all the
    samples (batches weighted by their size for a mean loss, summed for a summed
    one: see :mod:`torch_secorder.operators`, whose
    :class:`~torch_secorder.operators.HessianOperator` computes it;
    ``reduction=`` for a plain-function loss that does not declare its
    reduction).  ``create_graph`` and ``strict`` are not supported with ``data=``.
    Data-parallel: ``group=`` (with ``data=``, this rank's shard) as for the operators
    (see :doc:`/distributed`): the trace over the union of the ranks' shards, the
    same on every rank.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(10, 1)
        >>> x, y = torch.randn(5, 10), torch.randn(5, 1)
        >>> exact = model_hessian_trace(model, torch.nn.functional.mse_loss, x, y)
        >>> bool(torch.isclose(exact, 2 * (x.pow(2).sum() / 5 + 1)))
        True
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
        >>> bool(torch.isclose(model_hessian_trace(model, torch.nn.MSELoss(), data=loader), exact))
        True
    """
    check_count(num_samples, "num_samples", allow_none=True)
    check_chunk_size(chunk_size)
    return model_hessian_trace_estimate(
        model,
        loss_fn,
        inputs,
        targets,
        num_samples,
        create_graph,
        strict,
        data=data,
        reduction=reduction,
        generator=generator,
        chunk_size=chunk_size,
        strategy=strategy,
        progress=progress,
        group=group,
    ).estimate


def model_hessian_trace_estimate(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any = NO_BATCH,
    targets: Any = NO_BATCH,
    num_samples: int | None = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    data: Any = None,
    reduction: str | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
    group: Any = None,
) -> TraceEstimate:
    """Like :func:`model_hessian_trace`, returning ``(estimate, std_error, samples)``.

    ``data=`` and ``group=`` as in :func:`model_hessian_trace` (with a group, the
    probes are drawn alike on every rank: ``generator`` seeded identically, or
    ``None`` for rank 0's seed; see :func:`~torch_secorder.operators.shared_generator`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 1)).double()
        >>> x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(8, 1, generator=g, dtype=torch.float64)
        >>> est = model_hessian_trace_estimate(model, torch.nn.functional.mse_loss, x, y, 10,
        ...                                    generator=g)
        >>> est.samples.shape, bool(est.std_error > 0)
        (torch.Size([10]), True)
    """
    check_count(num_samples, "num_samples", allow_none=True)
    check_chunk_size(chunk_size)
    if _convenience.data_or_batch(
        "model_hessian_trace",
        inputs,
        targets,
        data,
        group=group,
        create_graph=create_graph,
        strict=strict,
    ):
        A = _convenience.hessian_operator_of(
            model,
            loss_fn,
            data,
            reduction=reduction,
            chunk_size=chunk_size,
            strategy=strategy,
            progress=progress,
            group=group,
        )
        return _convenience.operator_trace(
            model, A, num_samples, generator=generator, chunk_size=chunk_size, progress=progress
        )
    with module_problem(
        model, loss_fn, inputs, targets, strict=strict, create_graph=create_graph
    ) as problem:
        return problem_trace(
            problem,
            num_samples,
            generator=generator,
            chunk_size=chunk_size,
            strategy=strategy,
            progress=progress,
        )
