r"""Matrix-free stochastic trace estimation (Hutchinson) with an honest error bar.

A *matmat* is any function ``V -> V A^T`` taking a ``(k, n)`` batch of row vectors
and returning the ``(k, n)`` batch of products with a symmetric ``n x n`` matrix
``A`` (the Hessian, a Gauss-Newton matrix, a Fisher, a plain matrix).  Nothing here
knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from torch_secorder._checks import check_chunk_size, check_count, check_generator
from torch_secorder.linalg._estimator_tools import resolve_device, schedule
from torch_secorder.linalg.probes import ProbeStream
from torch_secorder.linalg.progress import progress_bar

__all__ = ["Matmat", "TraceEstimate", "hutchinson", "chunk_ranges"]

Matmat = Callable[[Tensor], Tensor]


class TraceEstimate(NamedTuple):
    r"""A stochastic trace estimate with its standard error.

    Attributes:
        estimate: The mean of the per-probe values :math:`v_i^\top A v_i`.
        std_error: The sample standard deviation of those values divided by
            :math:`\sqrt{m}` (``nan`` for a single probe): an estimate of the
            estimator's standard deviation, from the same probes.
        samples: The ``m`` per-probe values.
    """

    estimate: Tensor
    std_error: Tensor
    samples: Tensor

    @classmethod
    def from_samples(cls, samples: Tensor) -> TraceEstimate:
        """Summarise per-probe values ``v_i^T A v_i`` into an estimate and its error bar."""
        m = samples.shape[0]
        estimate = samples.mean()
        if m > 1:
            std_error = samples.std(correction=1) / math.sqrt(m)
        else:
            std_error = torch.full_like(estimate, float("nan"))
        return cls(estimate, std_error, samples)


def chunk_ranges(total: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Split ``range(total)`` into consecutive ``(start, stop)`` pieces of ``chunk_size``."""
    check_chunk_size(chunk_size)
    step = total if chunk_size is None else chunk_size
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def hutchinson(
    matmat: Matmat,
    dim: int,
    num_samples: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> TraceEstimate:
    r"""Hutchinson's estimator of :math:`\operatorname{tr}(A)` from a matmat.

    .. math::
        \widehat{\operatorname{tr}}(A) = \frac{1}{m}\sum_{i=1}^m v_i^\top A v_i,
        \qquad E[v v^\top] = I,

    which is unbiased for any symmetric :math:`A`.  With Rademacher probes its
    variance is :math:`\frac{2}{m}(\|A\|_F^2 - \sum_i A_{ii}^2)`, so it is exact
    when :math:`A` is diagonal.  The reported ``std_error`` is the sample standard
    deviation of the :math:`m` values over :math:`\sqrt{m}`.

    Args:
        matmat: ``V -> V A`` on a ``(k, n)`` batch.
        dim: ``n``.
        num_samples: Number of probes ``m`` (at least 1).
        distribution: See :func:`~torch_secorder.linalg.probes.draw_probes`.
        generator: Source of the probes.
        dtype: Dtype of the probes.
        device: Device of the probes.
        chunk_size: Probes per call of ``matmat`` (``None``: the chunk policy of
            ``device``, :mod:`torch_secorder._chunks`: about :math:`2^{24}/n`
            probes on the CPU; on CUDA a first chunk of 2 probes measures the
            peak memory of a product and the others take at most half the free
            memory).  Memory: ``chunk_size`` products plus the ``(chunk_size, n)``
            probes.  The probes, and so the result, are the same for every
            ``chunk_size`` (:class:`~torch_secorder.linalg.probes.ProbeStream`).
        progress: Show a progress bar when the run takes more than a few seconds.

    Returns:
        A :class:`TraceEstimate`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> est = hutchinson(lambda V: V @ A, 3, 10, dtype=torch.float64)
        >>> float(est.estimate), float(est.std_error)
        (6.0, 0.0)
    """
    check_count(dim, "dim")
    check_count(num_samples, "num_samples")
    check_chunk_size(chunk_size)
    check_generator(generator, device)
    stream = ProbeStream(
        num_samples, dim, distribution=distribution, generator=generator, dtype=dtype, device=device
    ).prefetch()  # drawn before the first chunk is measured
    pieces = schedule(num_samples, chunk_size, resolve_device(device, generator), dim)
    values = []
    for start, stop in progress_bar(pieces, enabled=progress, desc="Hutchinson probes"):
        probes = stream.take(stop - start)
        values.append((probes * matmat(probes)).sum(-1))
    return TraceEstimate.from_samples(torch.cat(values))
