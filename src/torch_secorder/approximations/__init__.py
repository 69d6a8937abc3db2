"""Curvature approximations: Fisher and Gauss-Newton (0.0.1 API)."""

__all__: list[str] = []
