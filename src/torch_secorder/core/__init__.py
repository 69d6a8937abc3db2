"""The documented stateful API: closures ``func()`` reading ``params``, and ``nn.Module`` + data."""

from torch_secorder.core.gvp import (
    batch_jvp,
    batch_vjp,
    full_jacobian,
    jvp,
    model_jvp,
    model_vjp,
    vjp,
)
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import (
    hessian_trace,
    hessian_trace_estimate,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.core.hvp import approximate_hvp, exact_hvp, gauss_newton_product, model_hvp
from torch_secorder.core.per_layer_curvature import (
    get_layer_curvature_stats,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)
from torch_secorder.core.utils import (
    flatten_params,
    get_param_shapes,
    get_params_by_module_type,
    get_params_by_name_pattern,
    unflatten_params,
)

__all__ = [
    "approximate_hvp",
    "batch_jvp",
    "batch_vjp",
    "exact_hvp",
    "flatten_params",
    "full_jacobian",
    "gauss_newton_product",
    "get_layer_curvature_stats",
    "get_param_shapes",
    "get_params_by_module_type",
    "get_params_by_name_pattern",
    "hessian_diagonal",
    "hessian_trace",
    "hessian_trace_estimate",
    "jvp",
    "model_hessian_diagonal",
    "model_hessian_trace",
    "model_hessian_trace_estimate",
    "model_hvp",
    "model_jvp",
    "model_vjp",
    "per_layer_fisher_diagonal",
    "per_layer_hessian_diagonal",
    "unflatten_params",
    "vjp",
]
