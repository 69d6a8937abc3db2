r"""Hessian-vector products of a closure or a model's loss, and the HVP-based trace.

.. math::
    H v = \nabla_\theta \big( \nabla_\theta L(\theta)^\top v \big).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.core._inputs import as_vector_list, check_num_samples
from torch_secorder.core._problem import LossProblem, closure_problem, module_problem
from torch_secorder.func._tree import tree_ravel, tree_unravel
from torch_secorder.linalg.trace import hutchinson

__all__ = ["exact_hvp", "model_hvp", "hessian_trace", "problem_hvp"]


def problem_hvp(problem: LossProblem, v: list[Tensor], strategy: str = "auto") -> list[Tensor]:
    """``H v`` of a problem, ``v`` in the user's list format, result likewise."""
    if not problem.active:
        return [torch.zeros_like(p) for p in problem.params]
    active_v = [v[i] for i in problem.active]
    flat = tree_ravel(active_v).unsqueeze(0)
    product = problem.matmat(strategy)(flat)[0]
    return problem.expand(tree_unravel(product, list(problem.primals)))


def _single_or_list(values: list[Tensor]) -> Tensor | list[Tensor]:
    return values[0] if len(values) == 1 else values


def exact_hvp(
    func: Callable[[], Tensor],
    params: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
    *,
    strategy: str = "auto",
) -> Tensor | list[Tensor]:
    r"""Exact Hessian-vector product :math:`\nabla^2 L\, v` of the closure ``func()``.

    Args:
        func: Zero-argument closure returning a scalar loss; it reads ``params``.
        params: A tensor or list of tensors.
        v: Tensor (one parameter) or list of tensors shaped like ``params``.
        create_graph: Make the result differentiable.
        strategy: ``"auto"``, ``"vmap"`` (forward-over-reverse) or ``"graph"``
            (double backward).

    Returns:
        One tensor for a single parameter, else a list (0.0.1 returned a tuple).
        A tensor that does not require grad gets zeros.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> exact_hvp(lambda: (x ** 3).sum(), [x], torch.ones(2))
        tensor([ 6., 12.])
    """
    with closure_problem(func, params, create_graph=create_graph) as problem:
        vectors = as_vector_list(v, problem.params)
        return _single_or_list(problem_hvp(problem, vectors, strategy))


def model_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Any,
    y: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
    *,
    strategy: str = "auto",
) -> Tensor | list[Tensor]:
    r"""Hessian-vector product of ``loss_fn(model(x), y)`` w.r.t. ``model.parameters()``.

    ``v`` has one tensor per parameter (or one tensor for a one-parameter model).
    The model is left exactly as it was.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> x, y = torch.ones(4, 1), torch.zeros(4, 1)
        >>> model_hvp(model, torch.nn.functional.mse_loss, x, y, [torch.ones(1, 1)])
        tensor([[2.]])
    """
    with module_problem(model, loss_fn, x, y, create_graph=create_graph) as problem:
        vectors = as_vector_list(v, problem.params)
        return _single_or_list(problem_hvp(problem, vectors, strategy))


def hessian_trace(
    func: Callable[[], Tensor],
    params: Any,
    num_samples: int = 10,
    create_graph: bool = False,
    sparse: bool = False,
    *,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    progress: bool = True,
) -> float | Tensor:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}(H)` from Hessian-vector products.

    .. math::
        \widehat{\operatorname{tr}}(H) = \frac{1}{m}\sum_{j=1}^m v_j^\top H v_j

    with Rademacher probes, or with ``sparse=True`` sparse probes whose entries
    are :math:`\pm 1/\sqrt{0.1}` with probability 0.1 and 0 otherwise, so that
    :math:`E[vv^\top] = I` and the estimate stays unbiased (0.0.1 forgot the
    rescaling and was biased by a factor 0.1).

    Args:
        func: Zero-argument closure returning a scalar loss.
        params: A tensor or list of tensors.
        num_samples: Number of probes (>= 1).
        create_graph: Return a differentiable 0-dim tensor instead of a float.
        sparse: Use sparse rescaled Rademacher probes.
        generator: Source of the probes.
        strategy: How products are batched (see :func:`exact_hvp`).
        chunk_size: Probes per batched call.
        progress: Show a progress bar for long runs.

    Returns:
        A Python float, as in 0.0.1 (a 0-dim tensor when ``create_graph=True``).
        For the error bar use
        :func:`torch_secorder.core.hessian_trace.hessian_trace_estimate`.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_trace(lambda: x.pow(2).sum(), [x], num_samples=5)
        4.0
    """
    check_num_samples(num_samples)
    with closure_problem(func, params, create_graph=create_graph) as problem:
        if not problem.active:
            return 0.0
        estimate = hutchinson(
            problem.matmat(strategy, chunk_size),
            problem.dim,
            num_samples,
            distribution="sparse_rademacher" if sparse else "rademacher",
            generator=generator,
            dtype=problem.dtype,
            device=problem.device,
            chunk_size=chunk_size,
            progress=progress,
        ).estimate
    return estimate if create_graph else float(estimate)
