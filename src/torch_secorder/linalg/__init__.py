"""Matrix-free algorithms on any batched matrix product ``V -> V A`` (no models here)."""

from torch_secorder.linalg.diagonal_estimators import hutchinson_diagonal, xdiag
from torch_secorder.linalg.eigen import EigenResult, lanczos_eigsh, ritz_pairs, subspace_iteration
from torch_secorder.linalg.estimate import Estimate
from torch_secorder.linalg.hutchinson_adaptive import hutchinson_adaptive
from torch_secorder.linalg.hutchpp import hutchpp
from torch_secorder.linalg.probes import draw_probes
from torch_secorder.linalg.slq import SpectralDensity, stochastic_lanczos_quadrature
from torch_secorder.linalg.solvers import SolveResult, conjugate_gradient, minres
from torch_secorder.linalg.trace import TraceEstimate, hutchinson
from torch_secorder.linalg.xnystrace import xnystrace
from torch_secorder.linalg.xtrace import xtrace

__all__ = [
    "EigenResult",
    "TraceEstimate",
    "draw_probes",
    "hutchinson",
    "lanczos_eigsh",
    "ritz_pairs",
    "subspace_iteration",
    # spectral density (SLQ) and linear solvers
    "SpectralDensity",
    "stochastic_lanczos_quadrature",
    "SolveResult",
    "conjugate_gradient",
    "minres",
    # stochastic trace and diagonal estimators (common result: Estimate)
    "Estimate",
    "hutchinson_adaptive",
    "hutchpp",
    "xtrace",
    "xnystrace",
    "hutchinson_diagonal",
    "xdiag",
]
