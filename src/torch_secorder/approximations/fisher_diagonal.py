r"""Diagonals of the empirical Fisher and of the Fisher of the model's predictive distribution.

Empirical Fisher, for per-sample losses :math:`\ell_i(\theta) = \ell(f(x_i;\theta), y_i)`
(``loss_fn`` applied to a batch of one sample) with gradients :math:`g_i`:

.. math::
    F_{\mathrm{emp}} = \frac{1}{N} \sum_{i=1}^N g_i g_i^\top .

Type-2 ("true", "generalized") Fisher of the predictive distribution
:math:`p(y \mid f(x_i;\theta))`, with :math:`J_i = \partial f(x_i) / \partial\theta`:

.. math::
    F = c \sum_{i=1}^N \mathbb{E}_{y \sim p(\cdot \mid f_i)}
        \big[\nabla_\theta \log p(y \mid f_i)\, \nabla_\theta \log p(y \mid f_i)^\top\big]
      = c \sum_{i=1}^N J_i^\top \Lambda_i J_i ,

where :math:`\Lambda_i = \nabla^2_{f} [-\log p(y \mid f_i)]` does not depend on
:math:`y` for these likelihoods.  It equals the generalised Gauss-Newton matrix
of the matching loss:

* ``"nll"`` (cross-entropy on logits): :math:`\Lambda_i = \operatorname{diag}(p_i) -
  p_i p_i^\top`, :math:`p_i = \operatorname{softmax}(f_i)`; ``reduction="mean"``:
  :math:`c = 1/N` (the GGN of ``nn.CrossEntropyLoss()``), ``"sum"``: :math:`c = 1`.
* ``"mse"`` (Gaussian): the per-sample loss :math:`\|f_i - y_i\|^2` is
  :math:`-\log \mathcal{N}(y_i; f_i, \tfrac12 I)` up to a constant, so
  :math:`\Lambda_i = 2 I`; ``reduction="mean"``: :math:`c = 1/(N D)` with
  :math:`D` outputs per sample (the GGN of ``nn.MSELoss()``), ``"sum"``:
  :math:`c = 1`.

The diagonal is computed exactly from the factorisation
:math:`\Lambda_i = \sum_r u_r u_r^\top` (``C`` or ``D`` vectors per sample), as
:math:`c\sum_{i,r} (J_i^\top u_r)^{\odot 2}`, one backward pass through the graph
of ``outputs`` per vector, batched; or by Monte Carlo with ``num_samples`` labels
per sample drawn from the model's distribution (cheaper for many outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.problems._fisher import predictive_sq_sum
from torch_secorder.problems._inputs import check_chunk_size, check_count
from torch_secorder.problems._per_sample import empirical_sq_sum

__all__ = ["empirical_fisher_diagonal", "generalized_fisher_diagonal"]


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
) -> list[Tensor]:
    r"""Diagonal of the empirical Fisher :math:`\frac1N\sum_i g_i g_i^\top`.

    The per-sample gradients :math:`g_i` of ``loss_fn(model(x_i[None]), y_i[None])``
    are computed with ``vmap(grad(...))`` over the samples, ``chunk_size`` samples
    at a time (default: about ``2**24`` gradient entries per chunk).  The model
    is evaluated one sample at a time, so it must treat samples independently
    (batch norm in training mode does not).  Nothing of the model changes.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)``; applied to each sample as a batch of one.
        inputs: Batch of inputs (a tuple is unpacked into positional arguments;
            every element has the batch dimension first).
        targets: Batch of targets, batch dimension first.
        chunk_size: Samples per vmapped call.

    Returns:
        One tensor per parameter of ``model.parameters()`` (zeros for those
        that do not require grad).

    Differences from 0.0.1: 0.0.1 returned the squared *batch* gradient
    :math:`(\frac1N\sum_i g_i)^{\odot 2}`, which is not the empirical Fisher.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.0)
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]])
        >>> # g_i = 2 (w x_i - y_i) x_i = -2, -4: mean of squares 10 (0.0.1: 9)
        >>> empirical_fisher_diagonal(model, torch.nn.MSELoss(), x, y)
        [tensor([[10.]])]
    """
    check_chunk_size(chunk_size)
    sums, n = empirical_sq_sum(model, loss_fn, inputs, targets, chunk_size)
    return [s / n for s in sums]


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> list[Tensor]:
    r"""Diagonal of the Fisher of the model's predictive distribution (type-2 Fisher).

    See the module documentation for the definition and the scaling.  As in
    0.0.1, ``outputs`` is ``model(inputs)`` computed with autograd on; its graph is
    kept (``retain_graph``), so it can still be used afterwards.  ``targets`` is
    only checked for shape: the type-2 Fisher takes the expectation over labels
    drawn from the model.

    Args:
        model: The network that produced ``outputs``.
        outputs: ``model(inputs)`` with its graph: logits ``(N, C)`` for
            ``"nll"``, any ``(N, ...)`` for ``"mse"``.
        targets: Class indices ``(N,)`` or probabilities ``(N, C)`` (``"nll"``),
            or a tensor shaped like ``outputs`` (``"mse"``).
        loss_type: ``"nll"`` (also ``"ce"``, ``"cross_entropy"``) or ``"mse"``
            (also ``"gaussian"``); case-insensitive.
        create_graph: Make the result differentiable w.r.t. the parameters.
        num_samples: ``None``: exact (``C`` or ``D`` backward passes per sample).
            An int: Monte Carlo with that many labels per sample, drawn from the
            model's distribution with ``generator`` (unbiased).
        generator: Source of the Monte Carlo labels.
        reduction: ``"mean"`` (the loss averaged as ``nn.CrossEntropyLoss()`` /
            ``nn.MSELoss()`` do) or ``"sum"``.
        chunk_size: Samples per batched backward call (memory: ``chunk_size``
            times ``C`` (or ``D``, or ``num_samples``) gradients).

    Returns:
        One tensor per parameter of ``model.parameters()``.

    Raises:
        NotImplementedError: unsupported ``loss_type`` (the message lists the
            supported ones).
        ValueError: ``outputs`` without a graph, shapes that do not match.

    Differences from 0.0.1: 0.0.1 returned the squared gradient of the summed
    log-likelihood of the *observed* targets, which is neither the Fisher nor its
    diagonal; ``"mse"`` was not supported.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 3)
        >>> x = torch.randn(4, 2)
        >>> diag = generalized_fisher_diagonal(model, model(x), torch.zeros(4, dtype=torch.long))
        >>> [tuple(d.shape) for d in diag]
        [(3, 2), (3,)]
    """
    check_count(num_samples, "num_samples", allow_none=True)
    check_chunk_size(chunk_size)
    return predictive_sq_sum(
        model,
        outputs,
        targets,
        loss_type,
        create_graph,
        num_samples,
        generator,
        chunk_size,
        reduction,
    )
