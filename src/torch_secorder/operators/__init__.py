r"""Curvature operators over data: one linear-operator type per curvature matrix.

:class:`HessianOperator`, :class:`GGNOperator`, :class:`EmpiricalFisherOperator` and
:class:`FisherOperator` are built from ``(model, loss_fn, data, params=None)``, where
``data`` is one ``(inputs, targets)`` batch or any re-iterable of batches (a
``DataLoader``).  They stand for the curvature of the loss over the whole data set:

.. math::
    L = \sum_b \frac{N_b}{N} L_b \ (\text{"mean"}), \qquad L = \sum_b L_b\ (\text{"sum"}),

with :math:`L_b` the loss of batch :math:`b` (:math:`N_b` samples, :math:`N` in all).
Each offers ``A @ V`` (a vector or a block of columns), ``A.matmat`` (rows: the form
every algorithm of :mod:`torch_secorder.linalg` takes), ``shape``, ``dtype``,
``device``, ``to_scipy()``, ``block(names)``, and the exact ``diagonal()`` and
``trace()``.

Example:
    >>> import torch
    >>> from torch_secorder.linalg import hutchinson
    >>> g = torch.Generator().manual_seed(0)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    >>> y = torch.randn(10, 1, dtype=torch.float64, generator=g)
    >>> H = HessianOperator(model, torch.nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
    >>> est = hutchinson(H.matmat, H.shape[0], 50, dtype=H.dtype, progress=False, generator=g)
    >>> bool(abs(est.estimate - H.trace()) < 3 * est.std_error)  # within its error bar
    True
"""

from torch_secorder.operators._distributed import shared_generator
from torch_secorder.operators.base import CurvatureOperator
from torch_secorder.operators.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "shared_generator",
]
