"""Helpers shared by the stochastic estimators (private).

Argument checks, products with a matmat in chunks sized by the chunk policy
(:mod:`torch_secorder._chunks`), the exact diagonal through unit vectors, running
moments of per-probe values, and the leave-one-out directions of the exchangeable
estimators (XTrace, XDiag).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torch_secorder._checks import check_chunk_size, check_count, check_generator
from torch_secorder._chunks import ChunkSchedule
from torch_secorder.linalg.progress import progress_bar

Matmat = Callable[[Tensor], Tensor]


def check_common(
    matmat: Any,
    dim: Any,
    dtype: Any,
    device: Any,
    generator: Any,
    chunk_size: Any,
) -> int:
    """Check the arguments every estimator takes; return ``dim`` as an int."""
    if not callable(matmat):
        raise TypeError(
            f"matmat must be a callable V -> V A on (k, n) batches, got {type(matmat).__name__}"
        )
    dim = check_count(dim, "dim")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a torch.device, a str or None, got {type(device).__name__}"
        )
    check_generator(generator, device)
    check_chunk_size(chunk_size)
    return dim


def check_distribution(distribution: Any, allowed: tuple[str, ...]) -> str:
    """``distribution`` as one of ``allowed``."""
    if not isinstance(distribution, str) or distribution not in allowed:
        raise ValueError(f"distribution must be one of {allowed}, got {distribution!r}")
    return distribution


def check_tolerance(value: Any, name: str) -> float:
    """A finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def resolve_device(
    device: torch.device | str | None, generator: torch.Generator | None = None
) -> torch.device:
    """Where the products run: ``device``, else the generator's, else torch's default device."""
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.get_default_device()


def schedule(
    total: int, chunk_size: int | None, device: torch.device | str | None, dim: int
) -> ChunkSchedule:
    """The ``(start, stop)`` pieces of ``total`` vectors of length ``dim``.

    ``chunk_size`` long, or (``None``) sized by the chunk policy of ``device``
    (:class:`~torch_secorder._chunks.ChunkSchedule`: about ``2**24`` entries per
    chunk on the CPU; on CUDA a measuring first chunk sizes the rest from the free
    memory).
    """
    return ChunkSchedule(total, chunk_size, resolve_device(device), dim=dim)


def apply_matmat(
    matmat: Matmat, V: Tensor, chunk_size: int | None, *, progress: bool, desc: str
) -> Tensor:
    """``matmat`` on the rows of ``V``, in chunks (:func:`schedule`); checks each answer."""
    pieces = []
    pieces_of = schedule(V.shape[0], chunk_size, V.device, V.shape[1])
    for start, stop in progress_bar(pieces_of, enabled=progress, desc=desc):
        pieces.append(checked_call(matmat, V[start:stop]))
    return torch.cat(pieces)


def checked_call(matmat: Matmat, block: Tensor) -> Tensor:
    """One call of ``matmat``, with a clear error if the answer is not a ``block``-shaped tensor."""
    out = matmat(block)
    if not isinstance(out, Tensor) or out.shape != block.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"matmat must map a {tuple(block.shape)} batch of row vectors to a batch of "
            f"the same shape, got {got}"
        )
    return out.to(block.dtype)


def exact_diagonal(
    matmat: Matmat,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
    chunk_size: int | None,
    progress: bool,
) -> Tensor:
    """The diagonal of ``A`` from its products with the ``dim`` unit vectors."""
    diagonal = torch.empty(dim, dtype=dtype, device=device)
    pieces = schedule(dim, chunk_size, diagonal.device, dim)
    for start, stop in progress_bar(pieces, enabled=progress, desc="Unit vectors"):
        rows = torch.arange(stop - start, device=device)
        basis = torch.zeros(stop - start, dim, dtype=dtype, device=device)
        basis[rows, rows + start] = 1
        diagonal[start:stop] = checked_call(matmat, basis)[rows, rows + start]
    return diagonal


def probe_device(device: torch.device | str | None, generator: torch.Generator | None):
    """Where the probes live: ``device``, else the generator's device, else the default."""
    if device is None and generator is not None:
        return generator.device
    return device


def leave_one_out_directions(R: Tensor) -> Tensor:
    r"""Unit columns :math:`s_i` orthogonal to every column of ``R`` but the i-th.

    For ``Y = Q R`` (``R`` square), :math:`Q s_i` spans the part of
    :math:`\operatorname{range}(Y)` that leaving the i-th column out removes, so
    :math:`Q_{(i)} Q_{(i)}^\top = Q Q^\top - Q s_i s_i^\top Q^\top` is the projector onto
    the span of the other columns.  :math:`s_i` is the i-th column of
    :math:`R^{-\top}`, normalised; it is computed from the SVD of ``R`` with the
    inverse singular values scaled by the smallest one, so a singular ``R`` (a
    low-rank ``Y``) gives directions in its left null space instead of infinities.
    """
    U, sigma, Vh = torch.linalg.svd(R)
    floor = torch.clamp(sigma.min(), min=torch.finfo(R.dtype).tiny)
    weights = floor / torch.clamp(sigma, min=floor)
    S = U @ (weights[:, None] * Vh)
    return S / torch.linalg.vector_norm(S, dim=0, keepdim=True)


ERROR_ESTIMATES = ("jackknife", "leave-one-out")


def check_error_estimate(error_estimate: Any) -> str:
    """``error_estimate`` as one of :data:`ERROR_ESTIMATES`."""
    if not isinstance(error_estimate, str) or error_estimate not in ERROR_ESTIMATES:
        raise ValueError(f"error_estimate must be one of {ERROR_ESTIMATES}, got {error_estimate!r}")
    return error_estimate


def jackknife_std_error(replicates: Tensor) -> Tensor:
    r"""Jackknife standard error from the ``k`` leave-one-out replicates (first axis).

    :math:`\sqrt{\tfrac{k-1}{k}\sum_i (\hat\theta_{(i)} - \bar\theta)^2}`; by the
    Efron-Stein inequality its square overestimates the variance of any symmetric
    function of independent probes, in expectation.
    """
    k = replicates.shape[0]
    centred = replicates - replicates.mean(0)
    return torch.sqrt((k - 1) / k * (centred**2).sum(0))


def common_coordinates(*blocks: Tensor) -> tuple[Tensor, ...]:
    """Coordinates of the rows of each block in one orthonormal basis of their joint span.

    Inner products between the rows are kept, so any computation made of them
    runs on vectors of length at most the total number of rows instead of ``n``.
    """
    basis = torch.linalg.qr(torch.cat(blocks).T).Q
    return tuple(block @ basis for block in blocks)


def mean_and_std_error(samples: Tensor) -> tuple[Tensor, Tensor | None]:
    """Mean over the first axis and standard error (``None`` for one sample)."""
    m = samples.shape[0]
    mean = samples.mean(0)
    if m < 2:
        return mean, None
    return mean, samples.std(0, correction=1) / math.sqrt(m)


class RunningMoments:
    """Count, mean and sum of squared deviations of per-probe values, chunk by chunk.

    Chunks are merged with Chan et al.'s pairwise update, stable in floating point,
    so that no more than one chunk of values is ever held.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, values: Tensor) -> None:
        """Add a ``(b, ...)`` chunk of values."""
        b = values.shape[0]
        if b == 0:
            return
        chunk_mean = values.mean(0)
        chunk_m2 = ((values - chunk_mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = b, chunk_mean, chunk_m2
            return
        total = self.count + b
        delta = chunk_mean - self.mean
        self.mean = self.mean + delta * (b / total)
        self.m2 = self.m2 + chunk_m2 + delta**2 * (self.count * b / total)
        self.count = total

    def std_error(self) -> Tensor | None:
        """Sample standard deviation over the square root of the count (``None`` below 2)."""
        if self.count < 2:
            return None
        return torch.sqrt(self.m2 / (self.count - 1)) / math.sqrt(self.count)
