"""Matrix-free algorithms on any batched matrix product ``V -> V A`` (no models here)."""

from torch_secorder.linalg.eigen import EigenResult, lanczos_eigsh, ritz_pairs, subspace_iteration
from torch_secorder.linalg.probes import draw_probes
from torch_secorder.linalg.slq import SpectralDensity, stochastic_lanczos_quadrature
from torch_secorder.linalg.solvers import SolveResult, conjugate_gradient, minres
from torch_secorder.linalg.trace import TraceEstimate, hutchinson

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
]
