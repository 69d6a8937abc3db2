r"""Hutchinson's stochastic Hessian trace of a pure loss, with its standard error."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torch_secorder._checks import check_chunk_size, check_count, check_generator
from torch_secorder.func._tree import PyTree, tree_leaves, tree_numel
from torch_secorder.func.hvp import default_chunk_size, hessian_matmat
from torch_secorder.linalg.trace import TraceEstimate, hutchinson

__all__ = ["hutchinson_trace", "hutchinson_trace_estimate"]


def hutchinson_trace_estimate(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    num_samples: int,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    distribution: str = "rademacher",
    progress: bool = False,
) -> TraceEstimate:
    r"""Hutchinson estimate of :math:`\operatorname{tr}(\nabla^2 f)` with its error bar.

    .. math::
        \widehat{\operatorname{tr}} = \frac{1}{m}\sum_{i=1}^m v_i^\top H v_i,
        \qquad \widehat{\mathrm{se}} = \frac{s}{\sqrt{m}},

    with :math:`s` the sample standard deviation of the :math:`m` values.  The
    probes are vmapped ``chunk_size`` at a time through forward-over-reverse HVPs.

    Args:
        f: Pure function of ``params`` returning a scalar.
        params: The point (pytree of tensors).
        num_samples: Number of probes :math:`m \ge 1`.
        generator: Source of the probes (on the parameters' device).
        chunk_size: Probes per vmapped call (default: as many as fit in about
            ``2**24`` tangent entries). Peak memory: ``chunk_size`` HVPs.
        distribution: ``"rademacher"`` (default), ``"gaussian"`` or ``"sparse_rademacher"``.
        progress: Show a progress bar for long runs.

    Returns:
        A :class:`~torch_secorder.linalg.trace.TraceEstimate` ``(estimate, std_error, samples)``.

    Example:
        >>> import torch
        >>> f = lambda p: (p["x"] ** 2).sum()
        >>> est = hutchinson_trace_estimate(f, {"x": torch.ones(3)}, 8)
        >>> float(est.estimate), float(est.std_error)
        (6.0, 0.0)
    """
    check_count(num_samples, "num_samples")
    check_chunk_size(chunk_size)
    first = tree_leaves(params)[0]
    check_generator(generator, first.device)
    dim = tree_numel(params)
    if chunk_size is None and isinstance(num_samples, int):
        chunk_size = default_chunk_size(num_samples, dim, first.device)
    return hutchinson(
        hessian_matmat(f, params),
        dim,
        num_samples,
        distribution=distribution,
        generator=generator,
        dtype=first.dtype,
        device=first.device,
        chunk_size=chunk_size,
        progress=progress,
    )


def hutchinson_trace(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    num_samples: int,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    distribution: str = "rademacher",
) -> Tensor:
    r"""Hutchinson estimate of :math:`\operatorname{tr}(\nabla^2 f(\theta))` (the number only).

    Same arguments as :func:`hutchinson_trace_estimate`, which also gives the
    standard error; this one composes with ``vmap``/``grad``/``torch.compile``
    as a plain tensor function.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> f = lambda p: (p["x"] ** 2).sum()
        >>> hutchinson_trace(f, {"x": torch.ones(3)}, 4, generator=g)
        tensor(6.)
    """
    check_chunk_size(chunk_size)
    return hutchinson_trace_estimate(
        f, params, num_samples, generator, chunk_size, distribution, progress=False
    ).estimate
