"""Curvature analysis: eigenvalues, spectral density and loss landscapes (0.0.1 API and more)."""

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
from torch_secorder.analysis.spectral_density import model_spectral_density

__all__ = [
    "compute_loss_surface_1d",
    "compute_loss_surface_2d",
    "create_random_direction",
    "estimate_eigenvalues",
    "lanczos",
    "lanczos_iteration",
    "model_eigenvalues",
    "model_spectral_density",
    "power_iteration",
]
