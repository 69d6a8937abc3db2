r"""Jacobian-vector and vector-Jacobian products of a closure's or a model's output.

For an output :math:`y = f(\theta) \in \mathbb{R}^m` and :math:`J = \partial y / \partial\theta
\in \mathbb{R}^{m \times n}`:

.. math::
    \mathrm{jvp}(v) = J v, \qquad \mathrm{vjp}(u) = u^\top J .

JVPs are forward-mode (:func:`torch.func.jvp`, one forward pass carrying the
tangent); VJPs are one backward pass (:func:`torch.func.vjp`); batches of either
are :func:`torch.func.vmap` over the vectors, sharing the primal pass; the full
Jacobian is :func:`torch.func.jacrev` or :func:`torch.func.jacfwd`, whichever
needs fewer products (``min(m, n)``).  0.0.1 ran one backward pass per output
entry for every JVP, batch and Jacobian.

Conventions kept from 0.0.1: ``params`` is a list of tensors that ``func()``
reads; a tensor argument ``v`` stands for a single parameter; a one-parameter
``vjp`` returns a tensor, otherwise a list.  A parameter that does not require
grad is treated as a constant (its Jacobian block is zero), as everywhere in
this package.  The user's parameters, ``.grad``, ``requires_grad``, training
flags and buffers are left as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.errors import ShapeError
from torch_secorder.func._tree import tree_unravel
from torch_secorder.problems._graph_ggn import graph_jvp
from torch_secorder.problems._inputs import (
    as_vector_list,
    check_chunk_size,
    check_output,
    tensor_list,
)
from torch_secorder.problems._problem import LossProblem, closure_problem, model_output_problem

__all__ = [
    "jvp",
    "vjp",
    "model_jvp",
    "model_vjp",
    "batch_jvp",
    "batch_vjp",
    "full_jacobian",
]


# --------------------------------------------------------------------------- problems


@contextlib.contextmanager
def output_problem(
    func: Callable[[], Tensor], params: Any, create_graph: bool
) -> Iterator[LossProblem]:
    """A closure with a tensor output (any shape), as a pure function of the active tensors."""
    with closure_problem(func, params, create_graph=create_graph, scalar=False) as problem:
        inner = problem.pure

        def pure(values: tuple[Tensor, ...]) -> Tensor:
            return check_output(inner(values), "func")

        problem.pure = pure
        yield problem


def _evaluate(problem: LossProblem) -> Tensor:
    """The output at the current point (for problems without active tensors)."""
    with torch.no_grad():
        return problem.pure(tuple(problem.params[i] for i in problem.active))


def _finish(t: Tensor, create_graph: bool) -> Tensor:
    return t if create_graph else t.detach()


def _tangents(problem: LossProblem, vectors: list[Tensor], create_graph: bool) -> tuple:
    return tuple(_finish(vectors[i], create_graph) for i in problem.active)


def _single_or_list(values: list[Tensor]) -> Tensor | list[Tensor]:
    return values[0] if len(values) == 1 else values


def _as_cotangent(u: Any, out: Tensor, name: str, batched: bool = False) -> Tensor:
    """``u`` reshaped like ``out`` (with a leading batch dim if ``batched``)."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
    if batched:
        if u.dim() < 1:
            raise ShapeError(f"{name} must have a leading batch dimension, got a 0-dim tensor")
        if u[0].numel() != out.numel():
            raise ShapeError(
                f"{name} must have shape (batch, *output shape) = (batch, "
                f"{', '.join(map(str, out.shape))}) or (batch, {out.numel()}); "
                f"got {tuple(u.shape)}"
            )
        return u.reshape(u.shape[0], *out.shape).to(dtype=out.dtype, device=out.device)
    if u.numel() != out.numel():
        raise ShapeError(
            f"{name} must have the output's shape {tuple(out.shape)} "
            f"({out.numel()} entries), got shape {tuple(u.shape)}"
        )
    return u.reshape(out.shape).to(dtype=out.dtype, device=out.device)


def _as_batched_vectors(vs: Any, params: Sequence[Tensor], name: str = "vs") -> list[Tensor]:
    """``vs`` as one ``(batch, *p.shape)`` tensor per parameter, one batch size."""
    out = []
    batch = None
    for i, (v, p) in enumerate(zip(tensor_list(vs, params, name), params, strict=True)):
        if v.dim() != p.dim() + 1 or v.shape[1:] != p.shape:
            raise ShapeError(
                f"{name}[{i}] must have shape (batch, *params[{i}].shape) = "
                f"(batch, {', '.join(map(str, p.shape))}), got {tuple(v.shape)}"
            )
        if batch is None:
            batch = v.shape[0]
        elif v.shape[0] != batch:
            raise ShapeError(f"{name}[{i}] has batch size {v.shape[0]}, but {name}[0] has {batch}")
        out.append(v.to(dtype=p.dtype, device=p.device))
    return out


# --------------------------------------------------------------------------- kernels


def problem_jvp(problem: LossProblem, vectors: list[Tensor]) -> Tensor:
    """``J v`` (shaped like the output), ``v`` in the user's list format.

    Forward mode (:func:`torch.func.jvp`); where ``torch.func`` refuses the code
    (old-style ``autograd.Function``, full backward hooks, saved-tensor hooks), the
    double-vjp trick on one autograd graph (:func:`_graph_jvp`).
    """
    if not problem.active:
        return torch.zeros_like(_evaluate(problem))

    def functional() -> Tensor:
        tangents = _tangents(problem, vectors, problem.create_graph)
        _, jv = torch.func.jvp(problem.pure, (problem.primals,), (tangents,))
        return _finish(jv, problem.create_graph)

    return problem.functional_or_graph(functional, lambda: _graph_jvp(problem, vectors))


def _graph_jvp(problem: LossProblem, vectors: list[Tensor]) -> Tensor:
    """``J v`` on one autograd graph (:func:`~torch_secorder.problems._graph_ggn.graph_jvp`)."""
    create_graph = problem.create_graph
    tensors = [problem.params[i] for i in problem.active]
    tangents = [_finish(vectors[i], create_graph) for i in problem.active]
    with torch.enable_grad():
        out = check_output(problem.loss_closure(), "func")
        jv = graph_jvp(out, tensors, tangents, create_graph)
    return torch.zeros_like(out.detach()) if jv is None else _finish(jv, create_graph)


def problem_vjp(problem: LossProblem, u: Any, name: str = "v") -> list[Tensor]:
    """``u^T J`` in the user's list format; ``u`` has the output's number of entries."""
    if not problem.active:
        _as_cotangent(u, _evaluate(problem), name)
        return [torch.zeros_like(p) for p in problem.params]
    # One backward pass through the closure's own graph (cheaper than a functorch vjp).
    tensors = [problem.params[i] for i in problem.active]
    with torch.enable_grad():
        out = check_output(problem.loss_closure(), "func")
        cot = _finish(_as_cotangent(u, out, name), problem.create_graph)
        if not out.requires_grad:
            return [torch.zeros_like(p) for p in problem.params]
        grads = torch.autograd.grad(
            out, tensors, cot, create_graph=problem.create_graph, allow_unused=True
        )
    return problem.expand(
        [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors, strict=True)]
    )


def problem_batch_jvp(
    problem: LossProblem, vs: list[Tensor], chunk_size: int | None = None
) -> Tensor:
    """``J v_b`` for each ``b``: a ``(batch, *output shape)`` tensor."""
    batch = vs[0].shape[0]
    if not problem.active:
        out = _evaluate(problem)
        return out.new_zeros(batch, *out.shape)
    tangents = _tangents(problem, vs, problem.create_graph)

    def one(t: tuple[Tensor, ...]) -> Tensor:
        return torch.func.jvp(problem.pure, (problem.primals,), (t,))[1]

    return _finish(
        torch.func.vmap(one, chunk_size=chunk_size, randomness="same")(tangents),
        problem.create_graph,
    )


def problem_batch_vjp(
    problem: LossProblem, us: Any, chunk_size: int | None = None, name: str = "vs"
) -> list[Tensor]:
    """``u_b^T J`` for each ``b``: one ``(batch, *p.shape)`` tensor per parameter."""
    if not problem.active:
        cot = _as_cotangent(us, _evaluate(problem), name, batched=True)
        return [p.new_zeros(cot.shape[0], *p.shape) for p in problem.params]
    out, vjp_fn = torch.func.vjp(problem.pure, problem.primals)
    cot = _finish(_as_cotangent(us, out, name, batched=True), problem.create_graph)
    (grads,) = torch.func.vmap(vjp_fn, chunk_size=chunk_size, randomness="same")(cot)
    batch = cot.shape[0]
    result = [p.new_zeros(batch, *p.shape) for p in problem.params]
    for i, g in zip(problem.active, grads, strict=True):
        result[i] = _finish(g, problem.create_graph)
    return result


def _jacfwd(problem: LossProblem, chunk_size: int | None) -> tuple[Tensor, ...]:
    """Forward-mode Jacobian blocks ``(*output shape, *p.shape)``: JVPs vmapped over the basis."""
    primals = problem.primals
    n = problem.dim
    basis = torch.eye(n, dtype=problem.dtype, device=problem.device)
    tangents = tuple(tree_unravel(basis, list(primals)))

    def one(t: tuple[Tensor, ...]) -> Tensor:
        return torch.func.jvp(problem.pure, (primals,), (t,))[1]

    columns = torch.func.vmap(one, chunk_size=chunk_size, randomness="same")(
        tangents
    )  # (n, *output shape)
    out_shape = columns.shape[1:]
    flat = columns.reshape(n, -1).T  # (output numel, n)
    pieces = torch.split(flat, [p.numel() for p in primals], dim=1)
    return tuple(
        piece.reshape((*out_shape, *p.shape)) for piece, p in zip(pieces, primals, strict=True)
    )


def problem_jacobian(
    problem: LossProblem, chunk_size: int | None = None, mode: str = "auto"
) -> list[Tensor]:
    """One ``(output numel, p.numel())`` block per user tensor."""
    if not problem.active:
        m = _evaluate(problem).numel()
        return [p.new_zeros(m, p.numel()) for p in problem.params]
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    if mode == "auto":
        with torch.no_grad():
            m = problem.pure(problem.primals).numel()
        mode = "reverse" if m <= problem.dim else "forward"
    if mode == "reverse":
        # jacrev differentiates w.r.t. the first argument: here, the whole tuple.
        blocks = torch.func.jacrev(problem.pure, chunk_size=chunk_size)(problem.primals)
    else:
        blocks = _jacfwd(problem, chunk_size)
    first, p0 = blocks[0], problem.primals[0]
    out_numel = math.prod(first.shape[: first.dim() - p0.dim()])
    result = [p.new_zeros(out_numel, p.numel()) for p in problem.params]
    for i, b in zip(problem.active, blocks, strict=True):
        result[i] = _finish(b.reshape(out_numel, problem.params[i].numel()), problem.create_graph)
    return result


# --------------------------------------------------------------------------- public API


def jvp(
    func: Callable[[], Tensor],
    params: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
) -> Tensor:
    r"""Jacobian-vector product :math:`J v` of the output of ``func()``.

    One forward-mode pass (:func:`torch.func.jvp`); 0.0.1 ran one backward pass
    per output entry and returned the same numbers.

    Args:
        func: Zero-argument closure returning a tensor of any shape; it reads
            ``params``.
        params: A tensor or list of tensors.
        v: The tangent: a tensor (one parameter) or a list of tensors shaped
            like ``params``.
        create_graph: Make the result differentiable (w.r.t. ``params`` and ``v``).

    Returns:
        :math:`J v`, shaped like the output of ``func()``.

    Raises:
        TypeError: ``func`` is not callable, does not return a tensor, or ``v``
            is not tensors.
        ValueError: ``v`` does not match the shapes of ``params``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> jvp(lambda: x ** 2, [x], torch.tensor([1.0, 1.0]))
        tensor([2., 4.])
    """
    with output_problem(func, params, create_graph) as problem:
        vectors = as_vector_list(v, problem.params)
        return problem_jvp(problem, vectors)


def vjp(
    func: Callable[[], Tensor],
    params: Any,
    v: Tensor,
    create_graph: bool = False,
) -> Tensor | list[Tensor]:
    r"""Vector-Jacobian product :math:`v^\top J` of the output of ``func()``.

    Args:
        func: Zero-argument closure returning a tensor; it reads ``params``.
        params: A tensor or list of tensors.
        v: The cotangent, with as many entries as the output (reshaped to the
            output's shape, as in 0.0.1).
        create_graph: Make the result differentiable.

    Returns:
        :math:`J^\top v` in list format: one tensor for a single parameter,
        otherwise a list shaped like ``params``.

    Raises:
        ValueError: ``v`` has a different number of entries than the output.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> vjp(lambda: x ** 2, [x], torch.tensor([1.0, 1.0]))
        tensor([2., 4.])
    """
    with output_problem(func, params, create_graph) as problem:
        return _single_or_list(problem_vjp(problem, v))


def model_jvp(
    model: nn.Module,
    x: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
) -> Tensor:
    r"""Jacobian-vector product :math:`J v` of ``model(x)`` w.r.t. ``model.parameters()``.

    Args:
        model: The network (a ``torch.nn.Module``; anything else raises ``TypeError``).
        x: Model input (a tuple is unpacked into positional arguments).
        v: One tensor per parameter of ``model.parameters()`` (a tensor for a
            one-parameter model).
        create_graph: Make the result differentiable.

    Returns:
        :math:`J v`, shaped like ``model(x)``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> model_jvp(model, torch.tensor([[1.0, 2.0]]), [torch.ones(1, 2)])
        tensor([[3.]])
    """
    with model_output_problem(model, x, create_graph) as problem:
        vectors = as_vector_list(v, problem.params)
        return problem_jvp(problem, vectors)


def model_vjp(
    model: nn.Module,
    x: Any,
    v: Tensor,
    create_graph: bool = False,
) -> Tensor | list[Tensor]:
    r"""Vector-Jacobian product :math:`v^\top J` of ``model(x)`` w.r.t. ``model.parameters()``.

    Args:
        model: The network (a ``torch.nn.Module``; anything else raises ``TypeError``).
        x: Model input (a tuple is unpacked into positional arguments).
        v: Cotangent with as many entries as ``model(x)``.
        create_graph: Make the result differentiable.

    Returns:
        One tensor per parameter (a tensor for a one-parameter model).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> model_vjp(model, torch.tensor([[1.0, 2.0]]), torch.ones(1, 1))
        tensor([[1., 2.]])
    """
    with model_output_problem(model, x, create_graph) as problem:
        return _single_or_list(problem_vjp(problem, v))


def batch_jvp(
    func: Callable[[], Tensor],
    params: Any,
    vs: Tensor | list[Tensor],
    create_graph: bool = False,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Many Jacobian-vector products :math:`J v_b` at once.

    The forward-mode product is vmapped over the batch of tangents, so the
    primal computation is shared (0.0.1: one backward pass per output entry and
    per vector).

    Args:
        func: Zero-argument closure returning a tensor; it reads ``params``.
        params: A tensor or list of tensors.
        vs: One tensor of shape ``(batch, *p.shape)`` per parameter (a tensor
            for a single parameter).
        create_graph: Make the result differentiable.
        chunk_size: Tangents per vmapped call (bounds memory); ``None``: all.

    Returns:
        Tensor of shape ``(batch, *output shape)``.

    Raises:
        ValueError: a tensor of ``vs`` is not ``(batch, *p.shape)`` or the
            batch sizes differ.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> batch_jvp(lambda: x ** 2, [x], torch.eye(2))
        tensor([[2., 0.],
                [0., 4.]])
    """
    check_chunk_size(chunk_size)
    with output_problem(func, params, create_graph) as problem:
        vectors = _as_batched_vectors(vs, problem.params)
        return problem_batch_jvp(problem, vectors, chunk_size)


def batch_vjp(
    func: Callable[[], Tensor],
    params: Any,
    vs: Tensor,
    create_graph: bool = False,
    *,
    chunk_size: int | None = None,
) -> list[Tensor]:
    r"""Many vector-Jacobian products :math:`v_b^\top J` at once.

    One forward pass, then the backward pass vmapped over the cotangents.

    Args:
        func: Zero-argument closure returning a tensor; it reads ``params``.
        params: A tensor or list of tensors.
        vs: Cotangents, ``(batch, *output shape)`` or ``(batch, output numel)``.
        create_graph: Make the result differentiable.
        chunk_size: Cotangents per vmapped call; ``None``: all.

    Returns:
        A list (always, as in 0.0.1) with one ``(batch, *p.shape)`` tensor per
        parameter.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> batch_vjp(lambda: x ** 2, [x], torch.eye(2))
        [tensor([[2., 0.],
                [0., 4.]])]
    """
    check_chunk_size(chunk_size)
    with output_problem(func, params, create_graph) as problem:
        return problem_batch_vjp(problem, vs, chunk_size)


def full_jacobian(
    func: Callable[[], Tensor],
    params: Any,
    create_graph: bool = False,
    *,
    chunk_size: int | None = None,
    mode: str = "auto",
) -> list[Tensor]:
    r"""The Jacobian of the (flattened) output of ``func()``, one block per parameter.

    .. math::
        J^{(i)}_{k, j} = \frac{\partial\, \mathrm{vec}(y)_k}{\partial\, \mathrm{vec}(\theta_i)_j}

    Computed by :func:`torch.func.jacrev` (vmapped VJPs over the output basis)
    when the output has at most as many entries as the parameters, else by
    :func:`torch.func.jacfwd` (vmapped JVPs over the parameter basis); 0.0.1 ran
    one backward pass per output entry and per parameter.

    Args:
        func: Zero-argument closure returning a tensor; it reads ``params``.
        params: A tensor or list of tensors.
        create_graph: Make the result differentiable.
        chunk_size: Basis vectors per vmapped call (bounds memory); ``None``: all.
            The forward mode materialises the ``n x n`` identity of the basis.
        mode: ``"auto"``, ``"reverse"`` (jacrev) or ``"forward"`` (jacfwd).

    Returns:
        A list with one ``(output numel, p.numel())`` matrix per parameter
        (zeros for a tensor that does not require grad).

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> full_jacobian(lambda: x ** 2, [x])
        [tensor([[2., 0.],
                [0., 4.]])]
    """
    check_chunk_size(chunk_size)
    with output_problem(func, params, create_graph) as problem:
        return problem_jacobian(problem, chunk_size, mode)
