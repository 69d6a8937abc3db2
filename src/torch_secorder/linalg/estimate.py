r"""The result of a stochastic estimator: a value, its error bar, and its cost.

Every estimator of :mod:`torch_secorder.linalg` that is not exact returns an
:class:`Estimate`, whatever it estimates (a trace: a scalar; a diagonal: a
vector) and however it does it (Hutchinson, Hutch++, XTrace, XNysTrace, XDiag).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Estimate"]


class Estimate(NamedTuple):
    r"""A stochastic estimate with its standard error and its number of products.

    Attributes:
        estimate: The estimate: a 0-dim tensor for a trace, an ``(n,)`` tensor
            for a diagonal.
        std_error: An estimate of the estimator's standard deviation, of the same
            shape as ``estimate`` (per entry for a diagonal), computed from the
            same products; ``estimate +- 1.96 * std_error`` is an approximate 95%
            interval.  Zero when the result is exact (the budget covered the
            whole matrix); ``None`` where no error estimate is defined (a single
            probe).
        matvecs: The number of matrix-vector products used (rows passed to the
            matmat, summed over its calls).

    Example:
        >>> import torch
        >>> est = Estimate(torch.tensor(6.0), torch.tensor(0.1), 30)
        >>> value, err, cost = est
        >>> float(value), cost
        (6.0, 30)
    """

    estimate: Tensor
    std_error: Tensor | None
    matvecs: int
