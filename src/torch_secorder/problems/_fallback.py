"""Which differentiation route a loss admits: torch.func's, autograd's graph, or both.

The engine's fast routes are ``torch.func`` transforms.  Some PyTorch code is
refused by them, and some by the other route, double backward through one
autograd graph:

* refused by ``torch.func`` (:func:`is_functional_refusal`): an old-style
  ``torch.autograd.Function`` (``forward(ctx, ...)`` without ``setup_context``),
  which includes the hooks of ``Module.register_full_backward_hook`` (BackPACK's
  ``extend``, Captum) and reentrant checkpointing; saved-tensor hooks
  (``torch.utils.checkpoint(..., use_reentrant=False)``); an operator without a
  batching rule (training-mode ``F.rrelu``);
* refused by the graph route (:func:`is_graph_refusal`): ``torch.compile``'s
  ``aot_autograd``, which has no double backward;
* refused by ``vmap`` of per-sample gradients: the recurrent kernels of
  ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (:func:`has_recurrent_module`).

The refusals are recognised by torch's own messages, matched exactly, so that an
unrelated error in the user's code (a shape mismatch) is never mistaken for one
and is raised as it is.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = [
    "FUNCTIONAL_REFUSALS",
    "GRAPH_REFUSALS",
    "has_compiled_module",
    "has_recurrent_module",
    "is_functional_refusal",
    "is_graph_refusal",
]

#: Fragments of the messages with which ``torch.func`` refuses a computation.
FUNCTIONAL_REFUSALS = (
    # torch/autograd/function.py, Function.apply without setup_context
    "In order to use an autograd.Function with functorch transforms "
    "(vmap, grad, jvp, jacrev, ...), it must override the setup_context staticmethod",
    # torch/_functorch/vmap.py, doesnt_support_saved_tensors_hooks
    "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks",
    # an operator without a batching rule (training-mode rrelu_with_noise)
    "vmap: we do not yet support aten::",
    "Batching rule not implemented for aten::",
)

#: Fragments of the messages with which a double backward is refused.
GRAPH_REFUSALS = ("torch.compile with aot_autograd does not currently support double backward",)


def _matches(exc: BaseException, fragments: tuple[str, ...]) -> bool:
    return isinstance(exc, RuntimeError) and any(f in str(exc) for f in fragments)


def is_functional_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.func`` refusing the code it transforms.

    Example:
        >>> is_functional_refusal(RuntimeError("shape '[2, 3]' is invalid"))
        False
    """
    return _matches(exc, FUNCTIONAL_REFUSALS)


def is_graph_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a double backward refused (``torch.compile``'d code).

    Example:
        >>> is_graph_refusal(RuntimeError(GRAPH_REFUSALS[0]))
        True
    """
    return _matches(exc, GRAPH_REFUSALS)


def has_compiled_module(model: nn.Module | None) -> bool:
    """Whether ``model`` is, or contains, a ``torch.compile``'d module.

    Both spellings count: ``torch.compile(module)`` (an ``OptimizedModule``) and
    ``module.compile()`` (compiled in place).  Dynamo is not imported to find out:
    without it no module can have been compiled.

    Example:
        >>> import torch
        >>> has_compiled_module(torch.nn.Linear(2, 2))
        False
    """
    if model is None:
        return False
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", ())
    return any(
        isinstance(m, optimized) or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def has_recurrent_module(model: nn.Module) -> bool:
    """Whether ``model`` contains an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.

    Example:
        >>> import torch
        >>> has_recurrent_module(torch.nn.Sequential(torch.nn.LSTM(2, 3)))
        True
    """
    return any(isinstance(m, nn.RNNBase) for m in model.modules())
