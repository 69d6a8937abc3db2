"""The Hessian of a model's loss as a batched product, for the spectral functions.

:func:`model_hessian` gives :func:`~torch_secorder.analysis.eigensolvers.model_eigenvalues`
and :func:`~torch_secorder.analysis.spectral_density.model_spectral_density` their
matrix, in one of three forms:

* one batch and a loss of the library's convention ``loss_fn(outputs, targets)``: the
  one model-level problem, :func:`~torch_secorder.problems._problem.module_problem`, kept
  open for every product (one validating forward pass per call, then one
  forward-over-reverse pass per chunk of vectors);
* one batch and torch-secorder 0.0.1's ``loss_fn(model, data, target)``: the same
  problem object built from the closure ``loss_fn(model, data, target)``
  (:func:`~torch_secorder.problems._problem.closure_problem`);
* a data set (``target`` omitted): a :class:`~torch_secorder.operators.HessianOperator`
  over the batches, weighted as documented there.

Which convention ``loss_fn`` follows is read from its signature
(:func:`~torch_secorder.problems._inputs.loss_convention`), never by calling it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.func._tree import tree_unravel
from torch_secorder.operators import HessianOperator, shared_generator
from torch_secorder.problems._batch_checks import check_batch_device
from torch_secorder.problems._inputs import (
    NO_BATCH,
    check_module,
    loss_convention,
    zero_result_unwarned,
)
from torch_secorder.problems._problem import closure_problem, module_problem

__all__ = ["ModelHessian", "model_hessian"]


@dataclass
class ModelHessian:
    """The Hessian of a model's loss as ``V -> V H`` on flat ``(k, dim)`` rows.

    Attributes:
        matmat: The product on rows.
        dim: The number of differentiated entries.
        dtype: Dtype of the rows.
        device: Device of the rows.
        as_params: A flat ``(dim,)`` row as one tensor per parameter of the model
            (zeros for the parameters held fixed).
        shared: ``generator -> generator`` drawing the same numbers on every rank of
            the data set form's process group (see :doc:`/distributed`); else the
            generator itself.
    """

    matmat: Callable[[Tensor], Tensor]
    dim: int
    dtype: torch.dtype
    device: torch.device
    as_params: Callable[[Tensor], list[Tensor]]
    shared: Callable[[Any], Any] = lambda generator: generator


def _over_data(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    name: str,
    reduction: str | None,
    chunk_size: int | None,
    strategy: str,
    progress: bool,
    group: Any = None,
) -> ModelHessian:
    # operators sit above core

    A = HessianOperator(
        model,
        loss_fn,
        data,
        reduction=reduction,
        chunk_size=chunk_size,
        strategy=strategy,
        progress=progress,
        group=group,
    )

    def as_params(row: Tensor) -> list[Tensor]:
        pieces = dict(zip(A.names, A.unflatten(row), strict=True))
        # A.model: the module itself when model is a DistributedDataParallel wrapper
        return [pieces.get(n, torch.zeros_like(p)) for n, p in A.model.named_parameters()]

    def shared(generator: Any) -> Any:
        return generator if A.group is None else shared_generator(generator, A.group, A.device)

    return ModelHessian(A.matmat, A.shape[0], A.dtype, A.device, as_params, shared)


@contextlib.contextmanager
def model_hessian(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    target: Any,
    *,
    name: str,
    reduction: str | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    progress: bool = True,
    group: Any = None,
) -> Iterator[ModelHessian]:
    """The Hessian of ``loss_fn`` on the batch ``(data, target)``, or over the data set ``data``.

    ``target`` is :data:`~torch_secorder.core.hessian_diagonal.NO_BATCH` for the data set
    form: ``data`` is then one ``(inputs, targets)`` batch or an iterable of batches,
    and ``loss_fn`` must be of the library's convention.  The user's state is kept
    while the context is open.  A loss that depends on none of the parameters, or a
    model without a parameter that requires grad, is a ``ValueError`` (an eigenvalue of
    a zero matrix is not what the caller asked for).
    """
    check_module(model)
    convention = loss_convention(loss_fn)
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters: nothing to differentiate")
    if not any(p.requires_grad for p in params):
        raise ValueError("no parameter of model requires grad: nothing to differentiate")
    if target is NO_BATCH:
        if convention == "model":
            raise TypeError(
                f"{name}(model, loss_fn, data) without target computes over a data set "
                "(data: one (inputs, targets) batch or a DataLoader) and needs "
                "loss_fn(outputs, targets); loss_fn takes (model, data, target) "
                "(0.0.1's convention): pass target, or a loss of (outputs, targets)"
            )
        yield _over_data(
            model,
            loss_fn,
            data,
            name=name,
            reduction=reduction,
            chunk_size=chunk_size,
            strategy=strategy,
            progress=progress,
            group=group,
        )
        return
    if group is not None and group is not False:
        raise ValueError(
            f"{name}(): group= is for the data set form (this rank's shard, target omitted)"
        )
    if reduction is not None:
        raise ValueError(
            f"{name}(): reduction= is for the data set form; with one batch the loss is "
            "loss_fn's own"
        )
    check_batch_device(params, data=data, target=target)
    if convention == "outputs":
        label = "loss_fn(model(data), target)"
        problem_of = module_problem(model, loss_fn, data, target)
    else:
        label = "loss_fn(model, data, target)"
        problem_of = closure_problem(
            lambda: loss_fn(model, data, target), params, model=model, name=label
        )
    with zero_result_unwarned(), problem_of as problem:
        if not problem.active:  # the loss depends on none of them: no zeros, an error
            raise ValueError(
                f"{label} does not depend on the parameters of model (it does not require "
                "grad): the Hessian is zero, nothing to compute"
            )
        like = list(problem.primals)
        yield ModelHessian(
            problem.matmat(strategy, chunk_size),
            problem.dim,
            problem.dtype,
            problem.device,
            lambda row: problem.expand(list(tree_unravel(row, like))),
        )
