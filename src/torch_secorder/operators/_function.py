r"""Operators of a pure function ``f(params, batch)``: its parameters, named, and its problems.

The ``from_function`` constructors of the operators take, instead of a model and
a loss, a pure function of the parameters and one batch of data:

* Hessian: ``f(params, batch)`` is the loss of the batch (a scalar);
* GGN: ``f(params, batch)`` is the output of the batch and ``loss(output, batch)``
  its loss.

``params`` is a dict of tensors (names: its keys, rows in its own order, as
``dict(model.named_parameters())`` gives them) or any other pytree of tensors
(names: the pytree paths joined by dots, e.g. ``"0"``, ``"layer.w"``; rows in
:func:`optree.tree_leaves` order).  :class:`FunctionSource` holds them; the
operator differentiates detached copies and never touches the user's tensors.

For one batch, :func:`function_problem` turns ``f`` into the engine's
:class:`~torch_secorder.problems._problem.LossProblem` (the same object a model's batch
becomes): the vmapped products, the graph route where ``torch.func`` refuses the
function, the fast exact diagonal routes (``f`` is recorded as the models are).
:func:`function_per_sample_grads` gives the per-sample gradients of ``f`` (the
empirical Fisher's): ``f`` on each sample alone, a batch of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optree
from torch import Tensor

from torch_secorder._chunks import chunk_entries
from torch_secorder.func._fixes import differentiable
from torch_secorder.problems._per_sample import per_sample_gradients
from torch_secorder.problems._problem import LossProblem, closure_problem, narrow_to

__all__ = ["FunctionSource", "function_per_sample_grads", "function_problem"]


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(key) for key in path) if path else "params"


class FunctionSource:
    """A pure ``f(params, batch)`` with its point ``params``, one named tensor per leaf.

    Args:
        f: The pure function.
        params: A dict of tensors or any pytree of floating tensors of one dtype and device.
        name: How ``f`` is called in messages.
    """

    def __init__(self, f: Callable[[Any, Any], Any], params: Any, name: str = "f"):
        if not callable(f):
            raise TypeError(f"{name} must be callable, got {type(f).__name__}")
        self.f = f
        if isinstance(params, dict) and all(isinstance(k, str) for k in params):
            self._spec = None
            named = list(params.items())
        else:
            paths, leaves, self._spec = optree.tree_flatten_with_path(
                params, none_is_leaf=False, namespace="torch_secorder"
            )
            named = [(_path_name(path), leaf) for path, leaf in zip(paths, leaves, strict=True)]
        if not named:
            raise ValueError("params must hold at least one tensor, got an empty pytree")
        for name_, leaf in named:
            if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                what = leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__
                raise TypeError(f"params[{name_!r}] must be a floating-point tensor, got {what}")
        first = named[0][1]
        for name_, leaf in named[1:]:
            if leaf.dtype != first.dtype or leaf.device != first.device:
                raise ValueError(
                    f"params[{name_!r}] is {leaf.dtype} on {leaf.device}, but "
                    f"params[{named[0][0]!r}] is {first.dtype} on {first.device}: the operator "
                    "needs one dtype and one device for all parameters"
                )
        self.names = [name_ for name_, _ in named]
        #: The point, detached (the user's tensors are never differentiated or written).
        self.values = {name_: leaf.detach() for name_, leaf in named}

    def named(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of every parameter, in the operator's order."""
        return list(self.values.items())

    def pytree(self, values: dict[str, Tensor]) -> Any:
        """The ``params`` structure holding ``values`` (by name)."""
        if self._spec is None:
            return {name: values[name] for name in self.names}
        return optree.tree_unflatten(self._spec, [values[name] for name in self.names])


@contextlib.contextmanager
def function_problem(
    source: FunctionSource,
    batch: Any,
    only: Sequence[str],
    loss: Callable[[Any, Any], Tensor] | None = None,
) -> Iterator[LossProblem]:
    """Batch ``batch`` of ``source`` as a problem of the parameters ``only``.

    Without ``loss``, ``f(params, batch)`` is the scalar loss (Hessian products and
    diagonal).  With ``loss``, the problem is the output ``f(params, batch)`` (any
    shape: the GGN's products), checked by ``loss(output, batch)`` elsewhere.
    The differentiated tensors are fresh leaves holding the point; the others are
    the point itself, constant.
    """
    names = source.names
    leaves = [source.values[name].clone().requires_grad_() for name in names]
    constants = dict(source.values)
    f = source.f

    def closure() -> Tensor:
        return f(source.pytree(dict(zip(names, leaves, strict=True))), batch)

    what = "f(params, batch)"
    with closure_problem(closure, leaves, name=what, scalar=loss is None) as problem:
        narrow_to(problem, names, only)
        active_names = [names[i] for i in problem.active]

        def pure(values: tuple[Tensor, ...]) -> Tensor:
            point = dict(constants)
            point.update(zip(active_names, values, strict=True))
            return f(source.pytree(point), batch)

        # An output's routes (jvp, vjp, the GGN's products) run under the operator fixes;
        # for a loss the engine adds them where it differentiates.
        problem.pure = pure if loss is None else differentiable(pure)
        problem.plain = pure
        problem.names = names
        yield problem


def function_per_sample_grads(
    source: FunctionSource,
    batch: Any,
    num_samples: int,
    only: Sequence[str],
    chunk_size: int | None,
    on_chunk: Callable[[dict[str, Tensor]], None],
) -> None:
    r"""The gradients :math:`g_i = \nabla_\theta f(\theta, b_i)` of ``f`` on each sample alone.

    Sample :math:`b_i` of ``batch`` is the batch with every tensor whose leading
    dimension is ``num_samples`` (:math:`N_b`) cut to its ``i``-th slice, kept as a
    leading dimension of one (``x[i:i+1]``); other leaves (tensors of another leading
    size, non-tensors) are passed whole.  ``f`` must return a scalar on such a batch
    of one: its loss, the sample's :math:`\ell_i`.  The gradients of the parameters
    ``only`` come ``chunk_size`` samples at a time (default: about the device's chunk
    of entries, :func:`~torch_secorder._chunks.chunk_entries`, over the gradient's
    size), by ``vmap(grad(f))``, or by one backward pass per sample where
    ``torch.func`` refuses ``f``; ``on_chunk`` receives each chunk as a dict from
    name to a ``(samples, *shape)`` tensor.
    """
    leaves, spec = optree.tree_flatten(batch, none_is_leaf=False, namespace="torch_secorder")
    split = [
        isinstance(leaf, Tensor) and leaf.ndim >= 1 and leaf.shape[0] == num_samples
        for leaf in leaves
    ]
    if not any(split):
        raise ValueError(
            f"the batch has no tensor with a leading dimension of its {num_samples} samples, "
            "so f cannot be evaluated on each sample alone"
        )
    constants = dict(source.values)
    names = list(only)

    def sample_loss(values: dict[str, Tensor], sliced: list[Tensor]) -> Tensor:
        point = dict(constants)
        point.update(values)
        rest = iter(sliced)
        rebuilt = [next(rest).unsqueeze(0) if cut else leaf for leaf, cut in zip(leaves, split)]
        loss = source.f(source.pytree(point), optree.tree_unflatten(spec, rebuilt))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"f(params, batch) must return a scalar on one sample, got {got}")
        return loss.reshape(())

    cut = [leaf for leaf, is_cut in zip(leaves, split) if is_cut]
    point = {name: source.values[name] for name in names}
    dim = sum(t.numel() for t in point.values())
    step = chunk_size or max(1, chunk_entries(cut[0].device) // max(dim, 1))
    per_sample_gradients(differentiable(sample_loss), point, cut, step, on_chunk)
