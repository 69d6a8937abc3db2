r"""Hutchinson's trace estimator that stops once its standard error is small enough.

.. math::
    \widehat{t}_m = \frac{1}{m}\sum_{i=1}^m v_i^\top A v_i, \qquad
    \widehat{\sigma}_m = \frac{s_m}{\sqrt{m}},

with :math:`s_m` the sample standard deviation of the :math:`m` values
:math:`v_i^\top A v_i` (Hutchinson 1989; Girard 1989).  Probes are multiplied
``chunk_size`` at a time; after each chunk the rule is checked at every count
:math:`m \ge` ``min_samples`` the chunk reached (so that :math:`\widehat{\sigma}_m`
means something), and the run stops at the first :math:`m` where

.. math::
    \widehat{\sigma}_m \le \max(\mathrm{atol},\ \mathrm{rtol}\cdot|\widehat{t}_m|),

or when ``max_matvecs`` products have been used, whichever comes first.  The
products of the chunk past that :math:`m` are dropped, and the probes come from a
:class:`~torch_secorder.linalg.probes.ProbeStream`, so the result is the same for
every ``chunk_size``.  A result whose ``std_error`` exceeds that bound ran out of
budget.

Reference:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", Communications in Statistics -
    Simulation and Computation 18(3), 1989.
"""

from __future__ import annotations

import math

import torch

from torch_secorder._checks import check_count
from torch_secorder._chunks import static_chunk_size
from torch_secorder.linalg._estimator_tools import (
    Matmat,
    check_common,
    check_distribution,
    check_tolerance,
    checked_call,
    mean_and_std_error,
    probe_device,
    resolve_device,
    schedule,
)
from torch_secorder.linalg.estimate import Estimate
from torch_secorder.linalg.probes import ProbeStream
from torch_secorder.linalg.progress import progress_bar

__all__ = ["hutchinson_adaptive"]


def hutchinson_adaptive(
    matmat: Matmat,
    dim: int,
    *,
    rtol: float = 1e-2,
    atol: float = 0.0,
    max_matvecs: int = 1000,
    min_samples: int = 8,
    chunk_size: int | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Estimate:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}(A)`, stopped by its standard error.

    Unbiased for any symmetric :math:`A` at any fixed number of probes; with
    Rademacher probes each value has variance
    :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)`, so a diagonal :math:`A` stops after
    ``min_samples`` probes with ``std_error == 0``.  (A stopping rule that looks
    at the data makes the stopped mean slightly biased in general; the bias is
    small beside the standard error at the stopping point.)

    Args:
        matmat: ``V -> V A`` on a ``(k, n)`` batch of row vectors, ``A`` symmetric.
        dim: ``n``.
        rtol: Relative tolerance on the standard error (``>= 0``).
        atol: Absolute tolerance on the standard error (``>= 0``).
        max_matvecs: Most products (probes) to use; the last chunk is cut to fit.
        min_samples: Fewest probes before the rule is checked (``>= 2``).
        chunk_size: Probes per call of ``matmat`` (``None``: ``min_samples``, or
            fewer where the chunk policy of ``device``, :mod:`torch_secorder._chunks`,
            allows fewer).  Memory: ``chunk_size`` products plus the
            ``(chunk_size, n)`` probes; up to ``chunk_size - 1`` products past the
            stopping point are computed and dropped.
        distribution: ``"rademacher"`` or ``"gaussian"`` (see
            :func:`~torch_secorder.linalg.probes.draw_probes`).
        generator: Source of the probes (``None``: the global generator).
        dtype: Dtype of the probes.
        device: Device of the probes.
        progress: Show a progress bar when the run takes more than a few seconds.

    Returns:
        An :class:`~torch_secorder.linalg.estimate.Estimate`; ``matvecs`` is the
        number of probes used.

    Raises:
        TypeError, ValueError: An argument of the wrong type or value (named).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> est = hutchinson_adaptive(lambda V: V @ A, 5, rtol=1e-3, dtype=torch.float64)
        >>> float(est.estimate), float(est.std_error), est.matvecs
        (15.0, 0.0, 8)
    """
    dim = check_common(matmat, dim, dtype, device, generator, chunk_size)
    rtol = check_tolerance(rtol, "rtol")
    atol = check_tolerance(atol, "atol")
    max_matvecs = check_count(max_matvecs, "max_matvecs")
    min_samples = check_count(min_samples, "min_samples", 2)
    if max_matvecs < min_samples:
        raise ValueError(f"max_matvecs must be >= min_samples={min_samples}, got {max_matvecs}")
    distribution = check_distribution(distribution, ("rademacher", "gaussian"))
    device = probe_device(device, generator)
    if chunk_size is None:
        chunk_size = min(min_samples, static_chunk_size(max_matvecs, dim, resolve_device(device)))
    stream = ProbeStream(
        max_matvecs, dim, distribution=distribution, generator=generator, dtype=dtype, device=device
    ).prefetch()  # drawn before the first chunk is measured
    pieces = schedule(max_matvecs, chunk_size, device, dim)
    values: list[torch.Tensor] = []
    count, mean, m2 = 0, 0.0, 0.0  # Welford's moments of the values, probe by probe
    for start, stop in progress_bar(pieces, enabled=progress, desc="Hutchinson probes"):
        probes = stream.take(stop - start)
        chunk = (probes * checked_call(matmat, probes)).sum(-1)
        values.append(chunk)
        stopped = False
        for value in chunk.tolist():
            count += 1
            delta = value - mean
            mean += delta / count
            m2 += delta * (value - mean)
            if count >= min_samples:
                error = math.sqrt(max(m2, 0.0) / (count - 1) / count)
                if error <= max(atol, rtol * abs(mean)):
                    stopped = True
                    break
        if stopped:
            break
    samples = torch.cat(values)[:count]
    estimate, std_error = mean_and_std_error(samples)
    return Estimate(estimate, std_error, count)
