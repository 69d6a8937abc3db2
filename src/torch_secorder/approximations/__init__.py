"""Curvature approximations: Fisher and Gauss-Newton (0.0.1 API)."""

from torch_secorder.approximations.fisher_diagonal import (
    empirical_fisher_diagonal,
    generalized_fisher_diagonal,
)
from torch_secorder.approximations.fisher_trace import (
    empirical_fisher_trace,
    generalized_fisher_trace,
)
from torch_secorder.approximations.gauss_newton import (
    gauss_newton_matrix,
    gauss_newton_matrix_approximation,
)

__all__ = [
    "empirical_fisher_diagonal",
    "empirical_fisher_trace",
    "gauss_newton_matrix",
    "gauss_newton_matrix_approximation",
    "generalized_fisher_diagonal",
    "generalized_fisher_trace",
]
