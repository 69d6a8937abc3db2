r"""The Gauss-Newton matrix of one batch: its products and its exact diagonal.

For an output problem (:func:`~torch_secorder.problems._problem.module_problem`
without a loss, or a pure function's output), :math:`z = f(\theta)` and a loss
:math:`\ell(z)`:

.. math::
    G = J^\top \nabla^2_z \ell\, J, \qquad J = \partial z / \partial \theta.

:func:`problem_ggn_matmat` is the one GGN-vector product of the package
(:func:`~torch_secorder.core.hvp.gauss_newton_product`, the GGN operator's batches);
:func:`problem_ggn_diagonal` the one exact GGN diagonal (the documented
:func:`~torch_secorder.approximations.gauss_newton.gauss_newton_matrix_approximation`
and :class:`~torch_secorder.operators.GGNOperator`); :func:`ggn_view` the pieces
both the diagonal and the dense matrix read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from torch_secorder._chunks import chunk_entries
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._tree import tree_ravel, tree_unravel
from torch_secorder.func.fast_diagonal import ggn_diagonal
from torch_secorder.func.hvp import default_chunk_size, hvp
from torch_secorder.linalg.trace import chunk_ranges
from torch_secorder.problems._batch_checks import targets_fit
from torch_secorder.problems._fallback import is_functional_refusal
from torch_secorder.problems._graph_ggn import graph_ggn_diagonal
from torch_secorder.problems._inputs import check_loss
from torch_secorder.problems._problem import LossProblem

__all__ = ["GGNView", "ggn_view", "problem_ggn_diagonal", "problem_ggn_matmat"]


def _functional_ggn_matmat(
    problem: LossProblem,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    y: Any,
    V: Tensor,
    chunk_size: int | None,
) -> Tensor:
    """``V G`` by torch.func: one forward pass with its pullback, then per chunk of rows
    one vmapped forward-mode pass (``J v``), the loss's Hessian in output space and the
    shared pullback (``J^T w``)."""
    create_graph = problem.create_graph
    like = list(problem.primals)
    # The model's forward-mode and reverse passes both run under the operator fixes
    # and the math attention kernel (the fused kernels have no forward-mode AD).
    pure = differentiable(problem.pure)
    out, pullback = torch.func.vjp(pure, problem.primals)

    @differentiable
    def loss_of_output(o: Tensor) -> Tensor:
        return loss_fn(o, y)

    with targets_fit(loss_fn, out, y):  # a target unlike the output: ShapeError, both shapes
        check_loss(loss_of_output(out.detach()), "loss_fn(model(x), y)")
    primal_out = out if create_graph else out.detach()

    def one(row: Tensor) -> Tensor:
        tangents = tuple(tree_unravel(row, like))
        _, jv = torch.func.jvp(pure, (problem.primals,), (tangents,))
        _, h_jv = torch.func.jvp(torch.func.grad(loss_of_output), (primal_out,), (jv,))
        return tree_ravel(list(pullback(h_jv)[0]))

    if chunk_size is None:
        chunk_size = default_chunk_size(V.shape[0], V.shape[1], V.device)
    rows = torch.func.vmap(one, randomness="same", chunk_size=chunk_size)(
        V if create_graph else V.detach()
    )
    return rows if create_graph else rows.detach()


def problem_ggn_matmat(
    problem: LossProblem,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    y: Any,
    V: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """``V G`` on flat ``(k, dim)`` rows over the active tensors of an output problem.

    The one GGN-vector product of the package (:func:`gauss_newton_product`, the
    GGN operator's batches): ``chunk_size`` rows per vmapped call share one forward
    pass; where ``torch.func`` refuses the model, all ``k`` rows share one forward pass
    on the autograd graph (:meth:`~torch_secorder.problems._problem.LossProblem.graph_ggn_matmat`).
    """
    if not problem.active:
        return torch.zeros_like(V)
    return problem.functional_or_graph(
        lambda: _functional_ggn_matmat(problem, loss_fn, y, V, chunk_size),
        lambda: problem.graph_ggn_matmat(loss_fn, y, V),
    )


@dataclass
class GGNView:
    """The GGN's pieces on an output problem (a view, not a problem of its own).

    Shared by the diagonal and the dense matrix; built by :func:`ggn_view` from the
    one model-level problem.
    """

    names: list[str]  # names of the parameters that require grad
    active: list[Tensor]  # those parameters
    out_fn: Callable[[dict[str, Tensor]], Tensor]  # pure: parameters -> model output
    loss_of_out: Callable[[Tensor], Tensor]  # pure: output -> loss
    m: int  # number of output entries
    draws_random: bool  # one forward pass consumes the global RNG

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.active)

    def point(self, create_graph: bool) -> dict[str, Tensor]:
        return {
            name: (p if create_graph else p.detach())
            for name, p in zip(self.names, self.active, strict=True)
        }


def ggn_view(
    problem: LossProblem, loss_fn: Callable[[Tensor, Tensor], Tensor], targets: Any
) -> GGNView:
    """The GGN's pieces on an output problem of the model (one checking forward pass)."""
    names = [problem.names[i] for i in problem.active]  # type: ignore[index]
    pure = problem.pure

    def out_fn(values: dict[str, Tensor]) -> Tensor:
        return pure(tuple(values[name] for name in names))

    loss_of_out = differentiable(lambda out: loss_fn(out, targets))
    with torch.no_grad():
        probe = pure(problem.primals)
        with targets_fit(loss_fn, probe, targets):  # both shapes named
            check_loss(loss_of_out(probe), "loss_fn(model(inputs), targets)")
    return GGNView(
        names=names,
        active=[problem.params[i] for i in problem.active],
        out_fn=out_fn,
        loss_of_out=loss_of_out,
        m=probe.numel(),
        draws_random=problem.rewind.draws_random,
    )


def problem_ggn_diagonal(
    problem: LossProblem,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    targets: Any,
    *,
    create_graph: bool = False,
    chunk_size: int | None = None,
) -> list[Tensor]:
    """The exact GGN diagonal of an output problem, one tensor per active tensor.

    The one GGN diagonal of the package (the documented function and
    :class:`~torch_secorder.operators.GGNOperator`'s batches): the engine's exact
    routes (:func:`torch_secorder.func.ggn_diagonal`); with ``create_graph`` or a
    model that draws random numbers, chunks of columns of :math:`J`
    (:func:`_diagonal_by_columns`); where ``torch.func`` refuses the model, the
    autograd graph (:func:`~torch_secorder.problems._graph_ggn.graph_ggn_diagonal`).
    ``problem`` is :func:`~torch_secorder.problems._problem.module_problem` without a
    loss (``only=`` restricts it to some parameters: each costs its own entries).
    """
    if not problem.active:
        return []
    view = ggn_view(problem, loss_fn, targets)
    try:
        if create_graph or view.draws_random:
            diag = _diagonal_by_columns(view, create_graph, chunk_size)
        else:
            by_name = ggn_diagonal(
                view.out_fn, view.loss_of_out, view.point(False), chunk_size=chunk_size
            )
            diag = [by_name[name] for name in view.names]
    except RuntimeError as exc:  # torch.func refuses the model: the autograd graph
        if not is_functional_refusal(exc):
            raise
        point = dict(zip(view.names, view.active, strict=True))
        diag = graph_ggn_diagonal(
            view.out_fn,
            point,
            view.loss_of_out,
            create_graph=create_graph,
            chunk_size=chunk_size,
        )
    # Parameters left out of the problem (only=) are read as the user's tensors: no
    # graph back to them unless asked for.
    return diag if create_graph else [d.detach() for d in diag]


def _diagonal_by_columns(
    problem: GGNView, create_graph: bool, chunk_size: int | None
) -> list[Tensor]:
    r""":math:`G_{ii} = J_{:,i}^\top H_{\mathrm{out}} J_{:,i}` over chunks of columns of :math:`J`.

    Each chunk: one vmapped Jacobian-vector product per one-hot tangent (one
    forward pass, the same random draws as every other), then one vmapped
    loss-Hessian product per column.  Differentiable when ``create_graph``.
    """
    n, m = problem.n, problem.m
    point = problem.point(create_graph)
    step = chunk_size or max(1, chunk_entries(problem.active[0].device) // max(m, 1))
    with torch.enable_grad():
        out = problem.out_fn(point)
        o = out if create_graph else out.detach()
        like = problem.active[0]
        pieces = []
        for a, b in chunk_ranges(n, step):
            basis = torch.zeros(b - a, n, dtype=like.dtype, device=like.device)
            basis[torch.arange(b - a), torch.arange(a, b)] = 1
            tangents = dict(zip(problem.names, tree_unravel(basis, problem.active), strict=True))
            cols = vmap(lambda t: jvp(problem.out_fn, (point,), (t,))[1], randomness="same")(
                tangents
            )  # (b - a, *out.shape): columns a..b-1 of J
            h_cols = vmap(lambda c: hvp(problem.loss_of_out, o, c))(cols)
            pieces.append((cols * h_cols).reshape(b - a, m).sum(-1))
        diag = torch.cat(pieces)
    if not create_graph:
        diag = diag.detach()
    return list(tree_unravel(diag, problem.active))
