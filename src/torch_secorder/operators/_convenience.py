"""The ``data=`` form of the documented model functions, as calls on the operators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.linalg.trace import TraceEstimate, hutchinson
from torch_secorder.operators._distributed import shared_generator
from torch_secorder.operators.curvature import HessianOperator
from torch_secorder.problems._inputs import (
    NO_BATCH,
    check_generator,
    check_num_samples,
    warn_zero_result,
)

__all__ = ["data_or_batch", "hessian_operator_of", "operator_diagonal", "operator_trace"]


def data_or_batch(
    name: str, inputs: Any, targets: Any, data: Any, group: Any = None, **unsupported: Any
) -> bool:
    """Whether the call is the ``data=`` form; a clear error for a mix of both forms.

    ``unsupported`` holds arguments of the one-batch form that the ``data=`` form
    does not take (``create_graph``, ``strict``): they must be ``False`` with ``data``.
    A ``group`` (other than ``None`` or ``False``) needs the ``data=`` form.
    """
    if data is None:
        if group is not None and group is not False:
            raise ValueError(
                f"{name}(): group= needs data= (this rank's shard: one (inputs, targets) batch "
                "or an iterable of batches)"
            )
        if inputs is NO_BATCH or targets is NO_BATCH:
            raise TypeError(
                f"{name}() needs inputs and targets (one batch), or data= (a batch or a DataLoader)"
            )
        return False
    if inputs is not NO_BATCH or targets is not NO_BATCH:
        raise TypeError(
            f"{name}(): pass either inputs and targets or data=, not both (data= is one "
            "(inputs, targets) batch or an iterable of batches)"
        )
    for arg, value in unsupported.items():
        if value:
            raise ValueError(f"{name}(): {arg}=True is not supported with data=")
    return True


def hessian_operator_of(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Any,
    *,
    reduction: str | None,
    chunk_size: int | None,
    strategy: str,
    progress: bool,
    group: Any = None,
) -> HessianOperator | None:
    """The Hessian operator over ``data``; ``None`` (with a warning) if nothing requires grad."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if list(model.parameters()) and not any(p.requires_grad for p in model.parameters()):
        warn_zero_result("no tensor of model.parameters() requires grad")
        return None
    return HessianOperator(
        model,
        loss_fn,
        data,
        reduction=reduction,
        chunk_size=chunk_size,
        progress=progress,
        strategy=strategy,
        group=group,
    )


def operator_trace(
    model: nn.Module,
    A: HessianOperator | None,
    num_samples: int | None,
    *,
    generator: torch.Generator | None,
    chunk_size: int | None,
    progress: bool,
) -> TraceEstimate:
    """Exact trace (``num_samples=None`` or ``>= n``) or Hutchinson's estimate on ``A``."""
    like = next(model.parameters())
    check_generator(generator, like.device)
    if num_samples is not None:
        check_num_samples(num_samples)
    if A is None:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return TraceEstimate(zero, zero.clone(), zero.reshape(1))
    n = A.shape[0]
    if num_samples is None or num_samples >= n:
        exact = A.trace()
        return TraceEstimate(exact, torch.zeros_like(exact), exact.reshape(1))
    if A.group is not None:  # the same probes on every rank; one progress bar
        generator = shared_generator(generator, A.group, A.device)
        progress = progress and A.group.rank() == 0
    return hutchinson(
        A.matmat,
        n,
        num_samples,
        generator=generator,
        dtype=A.dtype,
        device=A.device,
        chunk_size=chunk_size,
        progress=progress,
    )


def operator_diagonal(model: nn.Module, A: HessianOperator | None) -> list[Tensor]:
    """The exact diagonal, one tensor per parameter of ``model`` (zeros for frozen ones)."""
    params = list(model.parameters())
    if A is None:
        return [torch.zeros_like(p) for p in params]
    pieces = dict(zip(A.names, A.unflatten(A.diagonal()), strict=True))
    # A.model: the module itself when model is a DistributedDataParallel wrapper
    return [pieces.get(name, torch.zeros_like(p)) for name, p in A.model.named_parameters()]
