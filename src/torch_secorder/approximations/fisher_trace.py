r"""Traces of the empirical Fisher and of the Fisher of the model's predictive distribution.

.. math::
    \operatorname{tr} F_{\mathrm{emp}} = \frac1N \sum_i \|g_i\|^2, \qquad
    \operatorname{tr} F = c \sum_{i} \operatorname{tr}(J_i^\top \Lambda_i J_i)

(definitions and scaling in :mod:`torch_secorder.approximations.fisher_diagonal`).
Both are the sums of the diagonals, computed exactly by default: for the
empirical Fisher that costs one pass of per-sample gradients, less than any
stochastic estimate would.  The type-2 Fisher's exact trace costs one backward
pass per output per sample; ``exact=False`` draws ``num_samples`` labels per
sample from the model instead (Monte Carlo, unbiased).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.problems._fisher import predictive_sq_sum
from torch_secorder.problems._inputs import check_chunk_size, check_num_samples
from torch_secorder.problems._per_sample import empirical_sq_sum

__all__ = ["empirical_fisher_trace", "generalized_fisher_trace"]


def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    num_samples: int = 1,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Exact trace of the empirical Fisher, :math:`\frac1N\sum_i \|g_i\|^2`.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)``, applied to each sample as a batch of one.
        inputs: Batch of inputs (batch dimension first; a tuple is unpacked).
        targets: Batch of targets.
        num_samples: Kept for 0.0.1 compatibility and checked (an int >= 1), but
            not used: the exact trace costs one pass of per-sample gradients,
            less than a stochastic estimate with any number of probes.
        chunk_size: Samples per vmapped call.

    Returns:
        A 0-dim tensor.

    Differences from 0.0.1: 0.0.1 returned the squared norm of the *batch*
    gradient, :math:`\|\frac1N\sum_i g_i\|^2`, which is not the trace.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.0)
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]])
        >>> empirical_fisher_trace(model, torch.nn.MSELoss(), x, y)
        tensor(10.)
    """
    check_chunk_size(chunk_size)
    check_num_samples(num_samples)
    sums, n = empirical_sq_sum(model, loss_fn, inputs, targets, chunk_size)
    return sum(s.sum() for s in sums) / n  # type: ignore[return-value]


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
    *,
    exact: bool = True,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Trace of the Fisher of the model's predictive distribution (type-2 Fisher).

    Args:
        model: The network that produced ``outputs``.
        outputs: ``model(inputs)`` with its graph (kept afterwards).
        targets: Checked for shape only (see
            :func:`~torch_secorder.approximations.fisher_diagonal.generalized_fisher_diagonal`).
        loss_type: ``"nll"`` or ``"mse"`` (and their aliases).
        num_samples: Labels drawn per sample when ``exact=False`` (Monte Carlo);
            ignored when ``exact=True``, the default (0.0.1 ignored it too).
        create_graph: Make the result differentiable.
        exact: ``True``: the exact trace (one backward pass per output entry per
            sample). ``False``: the unbiased Monte Carlo estimate with
            ``num_samples`` labels per sample, for models with many outputs.
        generator: Source of the Monte Carlo labels.
        reduction: ``"mean"`` or ``"sum"``: the scaling of the matching loss.
        chunk_size: Samples per batched backward call.

    Returns:
        A 0-dim tensor.

    Raises:
        NotImplementedError: unsupported ``loss_type``.

    Differences from 0.0.1: 0.0.1 returned the squared norm of the gradient of
    the summed log-likelihood of the observed targets, not the Fisher's trace.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> # Gaussian, sum reduction: 2 ||J||^2 = 2 (1 + 4 + 1)
        >>> y = torch.zeros(1, 1)
        >>> tr = generalized_fisher_trace(model, model(x), y, "mse", reduction="sum")
        >>> round(float(tr), 4)
        12.0
    """
    check_chunk_size(chunk_size)
    check_num_samples(num_samples)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    diag = predictive_sq_sum(
        model,
        outputs,
        targets,
        loss_type,
        create_graph,
        None if exact else num_samples,
        generator,
        chunk_size,
        reduction,
    )
    return sum(d.sum() for d in diag)  # type: ignore[return-value]
