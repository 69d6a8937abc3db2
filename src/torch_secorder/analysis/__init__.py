"""Curvature analysis: eigenvalues and loss landscapes (0.0.1 API)."""

__all__: list[str] = []
