"""The documented stateful API: closures ``func()`` reading ``params``, and ``nn.Module`` + data."""

from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import (
    hessian_trace,
    hessian_trace_estimate,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.core.hvp import exact_hvp, model_hvp

__all__ = [
    "exact_hvp",
    "hessian_diagonal",
    "hessian_trace",
    "hessian_trace_estimate",
    "model_hessian_diagonal",
    "model_hessian_trace",
    "model_hessian_trace_estimate",
    "model_hvp",
]
