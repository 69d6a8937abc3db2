r"""The exact Hessian diagonal of one batch's problem, by the cheapest exact route.

:func:`active_hessian_diagonal` is the one Hessian diagonal of a problem in the
package (the documented :func:`~torch_secorder.core.hessian_diagonal.model_hessian_diagonal`
and :func:`~torch_secorder.core.hessian_diagonal.hessian_diagonal`, the exact
trace, :class:`~torch_secorder.operators.HessianOperator`'s batches): the engine's
fast routes (:func:`~torch_secorder.func.fast_hessian_diagonal`) where the loss
draws no random numbers and no graph is asked for, else the one-hot sweep
(:func:`torch_secorder.func.hessian_diagonal`); the autograd graph where
``torch.func`` refuses the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_secorder.func import diagonal as _engine
from torch_secorder.func import fast_diagonal as _fast
from torch_secorder.problems._problem import LossProblem, with_graph_fallback

__all__ = ["active_hessian_diagonal", "draws_random"]


def _rng_states(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def draws_random(problem: LossProblem) -> bool:
    """Whether one evaluation of the loss consumes the global RNG (one forward pass).

    The problem's evaluations know it from the first (validating) evaluation; later
    ones replay its draws and leave the RNG where it was, so they cannot tell.
    """
    known = getattr(problem.rewind, "draws_random", None)
    if isinstance(known, bool):
        return known
    problem.rewind()
    before = _rng_states(problem.device)
    with torch.no_grad():
        problem.pure(problem.primals)
    after = _rng_states(problem.device)
    problem.rewind()
    return any(not torch.equal(a, b) for a, b in zip(before, after))


@with_graph_fallback(LossProblem.graph_diagonal)  # models that torch.func refuses
def active_hessian_diagonal(
    problem: LossProblem, chunk_size: int | None = None, progress: bool = True
) -> list[Tensor]:
    """Exact diagonal blocks of the problem's active tensors.

    Module and closure problems alike (without ``create_graph``) whose loss draws
    no random numbers go through :func:`~torch_secorder.func.fast_hessian_diagonal`:
    a closure is a pure function of its tensors (``problem.plain``, the closure
    under :class:`~torch_secorder.problems._purity.SubstitutionMode`), recorded and
    routed like a model.  The rest go through the sweep.  A loss that draws
    random numbers (dropout in training mode) goes to the sweep: the fast routes
    evaluate perturbed copies of the network whose random draws need not line up
    with the single fixed mask of the sweep.
    """
    if not problem.active:
        return []
    problem.release_checked_loss()
    f = problem.pure if problem.model is not None else problem.plain
    if f is not None and not problem.create_graph and not draws_random(problem):
        # No graph asked for: inputs that require grad need not make the routes
        # differentiable (the engine takes the sweep when autograd would track).
        with torch.no_grad():
            return list(_fast.fast_hessian_diagonal(f, problem.primals, chunk_size, progress))
    return list(_engine.hessian_diagonal(problem.pure, problem.primals, chunk_size, progress))
