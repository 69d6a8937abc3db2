"""Random probe vectors for stochastic trace and diagonal estimators.

All draws come from an explicit :class:`torch.Generator` (or the default one when
``generator`` is ``None``); the same seed gives the same probes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_secorder._checks import check_count, check_generator

__all__ = ["DISTRIBUTIONS", "DRAW_ENTRIES", "ProbeStream", "draw_probes"]

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
    # A uniform float32 below 1/2 with probability exactly 1/2 (multiples of 2**-24);
    # half the time of integer draws on the CPU.
    uniform = torch.rand(num, dim, generator=generator, device=device)
    signs = uniform.lt_(0.5).mul_(2).sub_(1).to(dtype)
    if distribution == "rademacher":
        return signs
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = torch.rand(num, dim, generator=generator, device=device) < density
    return signs * keep.to(dtype) / density**0.5


#: Entries (rows x ``dim``) of one draw of a :class:`ProbeStream`: 64 MiB in float32,
#: the size of a default chunk on the CPU (so that there the blocks are the chunks),
#: and few draws (kernel launches) per chunk on a GPU.
DRAW_ENTRIES = 2**24


class ProbeStream:
    r"""Probes handed out in chunks of any size; the i-th probe does not depend on the chunks.

    A loop over ``total`` probes that multiplies them ``k`` at a time would draw
    different numbers for different ``k`` if it drew each chunk on its own (the
    generators fill a block in an order that depends on its shape).  The stream
    draws fixed blocks instead: ``min(max(1, DRAW_ENTRIES // dim), rows left)``
    rows at a time, the same blocks whatever the chunks, and cuts the chunks
    from them.  It holds at most one chunk plus one block (``DRAW_ENTRIES``
    entries, or one row) beyond what the caller keeps.  When
    ``total * dim <= DRAW_ENTRIES`` the probes are exactly
    ``draw_probes(total, dim, ...)``.

    Args:
        total: Probes in all (the blocks never go past it).
        dim: Length of each probe.
        distribution, generator, dtype, device: As for :func:`draw_probes`.

    Example:
        >>> import torch
        >>> def probes(chunk):
        ...     stream = ProbeStream(7, 3, generator=torch.Generator().manual_seed(0))
        ...     return torch.cat([stream.take(k) for k in chunk])
        >>> bool(torch.equal(probes([7]), probes([2, 2, 3])))
        True
    """

    def __init__(
        self,
        total: int,
        dim: int,
        *,
        distribution: str = "rademacher",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.left = check_count(total, "total", 0)
        self.dim = check_count(dim, "dim", 1)
        self.rows = max(1, DRAW_ENTRIES // self.dim)
        self._draw = {
            "distribution": distribution,
            "generator": generator,
            "dtype": dtype,
            "device": device,
        }
        self._block: Tensor | None = None

    def _empty(self) -> bool:
        return self._block is None or self._block.shape[0] == 0

    def _refill(self) -> None:
        rows = min(self.rows, self.left)
        self.left -= rows
        self._block = draw_probes(rows, self.dim, **self._draw)

    def prefetch(self) -> ProbeStream:
        """Draw the next block now if none is held (outside a chunk whose memory is measured)."""
        if self._empty() and self.left > 0:
            self._refill()
        return self

    def take(self, num: int) -> Tensor:
        """The next ``num`` probes, a ``(num, dim)`` tensor."""
        pieces: list[Tensor] = []
        while num > 0:
            if self._empty():
                if self.left == 0:
                    raise ValueError(f"the stream has no probes left for {num} more")
                self._refill()
            assert self._block is not None
            piece, self._block = self._block[:num], self._block[num:]
            pieces.append(piece)
            num -= piece.shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
