"""The functional engine: second-order quantities of pure functions ``f(params) -> scalar``.

``params`` is any pytree of tensors (usually a dict, as from
``dict(model.named_parameters())``).  Every function here is a composition of
``torch.func`` transforms: it can be called inside ``torch.func.vmap``,
``torch.func.grad`` and ``torch.compile``, takes its randomness from an explicit
generator, and neither syncs with the host nor writes into its inputs.
"""

from torch_secorder.func._tree import tree_numel, tree_ravel, tree_unravel
from torch_secorder.func.diagonal import hessian_diagonal, hessian_trace
from torch_secorder.func.fast_diagonal import diagonal_plan, fast_hessian_diagonal, ggn_diagonal
from torch_secorder.func.hvp import hessian_matmat, hvp, hvp_batched
from torch_secorder.func.trace import hutchinson_trace, hutchinson_trace_estimate
from torch_secorder.linalg.trace import TraceEstimate

__all__ = [
    "TraceEstimate",
    "diagonal_plan",
    "fast_hessian_diagonal",
    "ggn_diagonal",
    "hessian_diagonal",
    "hessian_matmat",
    "hessian_trace",
    "hutchinson_trace",
    "hutchinson_trace_estimate",
    "hvp",
    "hvp_batched",
    "tree_numel",
    "tree_ravel",
    "tree_unravel",
]
