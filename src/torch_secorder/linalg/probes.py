"""Random probe vectors for stochastic trace and diagonal estimators.

All draws come from an explicit :class:`torch.Generator` (or the default one when
``generator`` is ``None``); the same seed gives the same probes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_secorder._checks import check_count, check_generator

__all__ = ["DISTRIBUTIONS", "draw_probes"]

DISTRIBUTIONS = ("rademacher", "gaussian", "sparse_rademacher")


def draw_probes(
    num: int,
    dim: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    density: float = 0.1,
) -> Tensor:
    r"""Draw ``num`` probe vectors of length ``dim`` with :math:`E[v v^\top] = I`.

    Args:
        num: Number of probes (rows).
        dim: Length of each probe.
        distribution: ``"rademacher"`` (entries :math:`\pm 1`), ``"gaussian"``
            (standard normal) or ``"sparse_rademacher"`` (entries
            :math:`\pm 1/\sqrt{p}` with probability ``p = density``, else 0; the
            rescaling keeps :math:`E[v v^\top] = I`, so estimators stay unbiased).
        generator: Source of randomness; must live on ``device``.
        dtype: Floating dtype of the probes.
        device: Device of the probes.
        density: Fraction of nonzero entries for ``"sparse_rademacher"``.

    Returns:
        A ``(num, dim)`` tensor.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> v = draw_probes(3, 4, generator=g, dtype=torch.float64)
        >>> bool((v.abs() == 1).all())
        True
    """
    check_count(num, "num", 0)
    check_count(dim, "dim", 0)
    check_generator(generator, device)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if generator is not None and device is None:
        device = generator.device
    if distribution == "gaussian":
        return torch.randn(num, dim, generator=generator, dtype=dtype, device=device)
    signs = torch.randint(0, 2, (num, dim), generator=generator, device=device).to(dtype) * 2 - 1
    if distribution == "rademacher":
        return signs
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = torch.rand(num, dim, generator=generator, device=device) < density
    return signs * keep.to(dtype) / density**0.5
