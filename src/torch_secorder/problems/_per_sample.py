r"""Per-sample gradients of a model's loss, squared and summed: the empirical Fisher's core.

:func:`empirical_sq_sum`: :math:`\sum_i g_i \odot g_i` over per-sample gradients
:math:`g_i = \nabla_\theta\, \ell(f(x_i;\theta), y_i)`, by ``vmap(grad(...))`` over
the samples (the one model adapter,
:class:`~torch_secorder.problems._model_function.ModelFunction`, on batches of one), in
chunks of samples; one backward pass per sample where ``vmap`` cannot run the model
(the kernels of ``nn.RNN``/``nn.LSTM``/``nn.GRU``, and code that ``torch.func``
refuses: old-style ``autograd.Function`` s, full backward hooks, saved-tensor hooks).
Used by the empirical Fisher's diagonal and trace, the per-layer Fisher and
:class:`~torch_secorder.operators.EmpiricalFisherOperator`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from torch_secorder._chunks import chunk_entries
from torch_secorder.func._fixes import differentiable
from torch_secorder.linalg.trace import chunk_ranges
from torch_secorder.problems._batch_checks import check_batch_fits
from torch_secorder.problems._fallback import has_recurrent_module, is_functional_refusal
from torch_secorder.problems._inputs import check_module
from torch_secorder.problems._model_function import ModelFunction
from torch_secorder.problems._purity import preserved_state

__all__ = ["empirical_sq_sum", "per_sample_gradients"]


def _batch_size(inputs: Any, targets: Any) -> int:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if not args or not all(isinstance(a, Tensor) and a.ndim >= 1 for a in args):
        raise TypeError(
            "inputs must be a tensor (or a tuple of tensors) with a leading batch dimension, "
            f"got {type(inputs).__name__}"
        )
    sizes = {a.shape[0] for a in args}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {[a.shape[0] for a in args]}")
    n = sizes.pop()
    if not isinstance(targets, Tensor) or targets.ndim < 1:
        raise TypeError(
            f"targets must be a tensor with a leading batch dimension, got {type(targets).__name__}"
            + (f" of shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else "")
        )
    if targets.shape[0] != n:
        raise ValueError(
            f"inputs and targets must have the same batch size: inputs have {n} samples, "
            f"targets have shape {tuple(targets.shape)}"
        )
    if n == 0:
        raise ValueError("inputs must contain at least one sample")
    return n


def per_sample_gradients(
    sample_loss: Callable[[dict[str, Tensor], list[Tensor]], Tensor],
    point: dict[str, Tensor],
    cut: list[Tensor],
    chunk_size: int,
    on_chunk: Callable[[dict[str, Tensor]], None],
    *,
    evaluation: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loop: bool = False,
    create_graph: bool = False,
) -> None:
    r"""Feed ``on_chunk`` the per-sample gradients :math:`\nabla_\theta \ell_i`, chunk by chunk.

    :math:`\ell_i` = ``sample_loss(point, [t[i] for t in cut])``: each tensor of
    ``cut`` holds the samples along its leading dimension, and ``sample_loss`` gets
    sample :math:`i`'s slices (without that dimension) and returns its scalar loss;
    it must already run under the operator fixes
    (:func:`~torch_secorder.func._fixes.differentiable`).  ``chunk_size`` samples at
    a time by ``vmap(grad(sample_loss))``, each chunk under ``evaluation()`` (the
    model's fresh random draws); where ``torch.func`` refuses the loss, or with
    ``loop``, one backward pass per sample (each under ``evaluation()``).
    ``on_chunk`` receives a dict from name to a ``(samples, *shape)`` tensor.  With
    ``create_graph`` the gradients are differentiable with respect to ``point``.
    """
    n = cut[0].shape[0]
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different")
    leaves = (
        point if create_graph else {name: t.detach().requires_grad_() for name, t in point.items()}
    )

    def looped(start: int, stop: int) -> dict[str, Tensor]:
        """The per-sample gradients of samples ``start:stop``, one backward pass each."""
        rows = []
        with torch.enable_grad():
            for i in range(start, stop):
                with evaluation():
                    loss = sample_loss(leaves, [t[i] for t in cut])
                rows.append(
                    torch.autograd.grad(
                        loss, list(leaves.values()), allow_unused=True, create_graph=create_graph
                    )
                )
        return {
            name: torch.stack([torch.zeros_like(t) if r[j] is None else r[j] for r in rows])
            for j, (name, t) in enumerate(leaves.items())
        }

    for start, stop in chunk_ranges(n, chunk_size):
        grads = None
        if not loop:
            try:
                with evaluation():
                    grads = per_sample(point, [t[start:stop] for t in cut])
            except RuntimeError as exc:
                if not is_functional_refusal(exc):
                    raise
                loop = True
        if grads is None:
            grads = looped(start, stop)
        on_chunk(grads)


def empirical_sq_sum(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    chunk_size: int | None = None,
    on_chunk: Callable[[dict[str, Tensor]], None] | None = None,
    create_graph: bool = False,
) -> tuple[list[Tensor], int]:
    """``(sum_i g_i**2 per parameter, N)``; zeros for parameters without grad.

    ``on_chunk``, if given, receives each chunk's per-sample gradients (a dict from
    parameter name to a ``(samples, *shape)`` tensor, parameters requiring grad).
    With ``create_graph`` the sums are differentiable with respect to the parameters.
    The model is evaluated through the one adapter,
    :class:`~torch_secorder.problems._model_function.ModelFunction`, on one sample at a
    time (a batch of one), by :func:`per_sample_gradients`.
    """
    check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    n = _batch_size(inputs, targets)
    model_fn = ModelFunction(model, inputs=inputs, targets=targets)
    named = list(zip(model_fn.names, model_fn.params, strict=True))
    params = model_fn.params
    active = [(name, p) for name, p in named if p.requires_grad]
    if not active:
        raise ValueError("no parameter of model requires grad: nothing to differentiate")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    dim = sum(p.numel() for _, p in active)
    if chunk_size is None:
        chunk_size = max(1, chunk_entries(active[0][1].device) // dim)
    graph = torch.enable_grad() if create_graph else contextlib.nullcontext()
    with preserved_state(params, model) as rewind, graph:
        with rewind.evaluation(replay=False):
            check_batch_fits(model, loss_fn, inputs, targets, params)
        point = {name: p if create_graph else p.detach() for name, p in active}

        @differentiable
        def sample_loss(values: dict[str, Tensor], sample: list[Tensor]) -> Tensor:
            *x, y = sample
            out = model_fn(values, tuple(a.unsqueeze(0) for a in x))
            return loss_fn(out, y.unsqueeze(0))

        sums = {name: torch.zeros_like(p) for name, p in point.items()}

        def add(grads: dict[str, Tensor]) -> None:
            if on_chunk is not None:
                on_chunk(grads)
            for name in sums:
                sums[name] = sums[name] + (grads[name] ** 2).sum(0)

        per_sample_gradients(
            sample_loss,
            point,
            [*args, targets],
            chunk_size,
            add,
            evaluation=lambda: rewind.evaluation(replay=False),  # fresh dropout per sample
            # vmap cannot batch the recurrent kernels (nor run what torch.func refuses)
            loop=has_recurrent_module(model),
            create_graph=create_graph,
        )
    return [sums[name] if name in sums else torch.zeros_like(p) for name, p in named], n
