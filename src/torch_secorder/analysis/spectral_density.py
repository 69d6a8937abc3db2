r"""The spectral density of the Hessian of a model's loss, on one batch or over a data set.

:func:`model_spectral_density` is the documented-style call of
:func:`~torch_secorder.linalg.slq.stochastic_lanczos_quadrature` (stochastic Lanczos
quadrature, Ubaru, Chen & Saad 2017; what PyHessian's ``density`` computes) on the
Hessian of ``loss_fn(model(inputs), targets)``: the nodes and weights of each probe's
Gauss quadrature rule, a smoothed density on a grid, and :math:`\operatorname{tr} f(H)`
estimates, as a :class:`~torch_secorder.linalg.slq.SpectralDensity`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.analysis._model_hessian import model_hessian
from torch_secorder.linalg.slq import SpectralDensity, stochastic_lanczos_quadrature
from torch_secorder.problems._inputs import (
    NO_BATCH,
    check_chunk_size,
    check_module,
    check_positive_int,
)

__all__ = ["model_spectral_density"]


def model_spectral_density(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any = NO_BATCH,
    targets: Any = NO_BATCH,
    num_steps: int = 50,
    num_probes: int = 10,
    *,
    data: Any = None,
    reduction: str | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
    group: Any = None,
) -> SpectralDensity:
    r"""Spectral density of the Hessian of ``loss_fn(model(inputs), targets)`` by SLQ.

    The density :math:`\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)` of the Hessian
    :math:`H` (``n`` = parameter entries that require grad) is estimated from
    ``num_probes`` Lanczos runs of ``num_steps`` steps, each from a random unit
    vector; the recurrences of all probes run together, one batched Hessian product
    per step (see :func:`~torch_secorder.linalg.slq.stochastic_lanczos_quadrature`).
    Cost: ``num_probes * num_steps`` Hessian-vector products.  Nothing of the model
    changes (parameters, ``.grad``, ``requires_grad``, training flags, buffers); in
    training mode dropout uses one fixed mask.

    Over a data set: ``data=`` (keyword only, instead of ``inputs`` and ``targets``)
    is one ``(inputs, targets)`` batch or an iterable of batches (a ``DataLoader``);
    the Hessian is that of the loss over all the samples (batches weighted by their
    size for a mean loss, summed for a summed one; see :mod:`torch_secorder.operators`
    and ``reduction=``), each product a pass over the data with a progress bar over
    the batches for passes longer than a few seconds.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        num_steps: Lanczos steps per probe (capped at ``n``).
        num_probes: Random start vectors.
        data: A batch or an iterable of batches, instead of ``inputs`` and ``targets``.
        reduction: ``"mean"`` or ``"sum"`` (``data=`` only), for a loss that does not
            declare its reduction.
        distribution: ``"rademacher"`` or ``"gaussian"`` start vectors.
        generator: Source of the start vectors (``None``: the global RNG).
        chunk_size: Probes per batch of recurrences (``None``: all at once).
        strategy: How Hessian products are computed (see
            :data:`torch_secorder.problems._problem.STRATEGIES`).
        progress: Progress bars (Lanczos steps of long runs; batches of a data set).
        group: With ``data=`` (this rank's shard): the density of the Hessian of the
            union of the ranks' shards, the same on every rank (start vectors drawn
            alike: ``generator`` seeded identically, or ``None`` for rank 0's seed);
            see :doc:`/distributed`.

    Returns:
        A :class:`~torch_secorder.linalg.slq.SpectralDensity`: ``nodes`` and
        ``weights`` per probe, ``density(grid)``, ``grid()``, ``trace_estimate(f)``.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, bad counts.
        ValueError: no parameter requires grad, a loss that does not depend on them,
            both or neither of ``inputs``/``targets`` and ``data``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> sse = torch.nn.MSELoss(reduction="sum")  # H = 2 x^T x = diag(2, 8)
        >>> g = torch.Generator().manual_seed(0)
        >>> res = model_spectral_density(model, sse, x, y, num_steps=2, num_probes=4, generator=g)
        >>> sorted(round(float(t), 6) for t in res.nodes[0])
        [2.0, 8.0]
        >>> round(float(res.trace_estimate().estimate), 10)  # the Krylov space is all of R^2
        10.0
        >>> res = model_spectral_density(model, sse, data=[(x[:1], y[:1]), (x[1:], y[1:])],
        ...                              num_steps=2, num_probes=4, generator=g)
        >>> sorted(round(float(t), 6) for t in res.nodes[0])
        [2.0, 8.0]
    """
    check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_positive_int(num_steps, "num_steps")
    check_positive_int(num_probes, "num_probes")
    check_chunk_size(chunk_size)
    if data is None:
        if inputs is NO_BATCH or targets is NO_BATCH:
            raise TypeError(
                "model_spectral_density() needs inputs and targets (one batch), or data= "
                "(a batch or a DataLoader)"
            )
        batch, target = inputs, targets
    else:
        if inputs is not NO_BATCH or targets is not NO_BATCH:
            raise TypeError(
                "model_spectral_density(): pass either inputs and targets or data=, not both "
                "(data= is one (inputs, targets) batch or an iterable of batches)"
            )
        batch, target = data, NO_BATCH
    with model_hessian(
        model,
        loss_fn,
        batch,
        target,
        name="model_spectral_density",
        reduction=reduction,
        strategy=strategy,
        progress=progress,
        group=group,
    ) as H:
        return stochastic_lanczos_quadrature(
            H.matmat,
            H.dim,
            num_steps,
            num_probes,
            distribution=distribution,
            generator=H.shared(generator),
            dtype=H.dtype,
            device=H.device,
            chunk_size=chunk_size,
            progress=progress,
        )
