"""Curvature analysis: eigenvalues and loss landscapes (0.0.1 API)."""

from torch_secorder.analysis.eigensolvers import (
    estimate_eigenvalues,
    lanczos,
    lanczos_iteration,
    model_eigenvalues,
    power_iteration,
)
from torch_secorder.analysis.landscape import (
    compute_loss_surface_1d,
    compute_loss_surface_2d,
    create_random_direction,
)

__all__ = [
    "compute_loss_surface_1d",
    "compute_loss_surface_2d",
    "create_random_direction",
    "estimate_eigenvalues",
    "lanczos",
    "lanczos_iteration",
    "model_eigenvalues",
    "power_iteration",
]
