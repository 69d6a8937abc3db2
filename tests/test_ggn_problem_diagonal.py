"""The one GGN diagonal (problem_ggn_diagonal) on a block of parameters, every route.

Oracle: the dense GGN ``J^T H_out J`` of the whole model (float64, ``torch.func``);
the block's diagonal is its part of that diagonal.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_mlp
from torch import nn
from torch.func import functional_call

from torch_secorder.problems._ggn import problem_ggn_diagonal
from torch_secorder.problems._problem import module_problem

DTYPE = torch.float64


def _dense_ggn_diagonal(model, X, Y, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    point = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in point]
    flat = torch.cat([p.reshape(-1) for p in point])

    def out(x):
        pieces = torch.split(x, [s.numel() for s in shapes])
        values = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(model, values, (X,)).reshape(-1)

    J = torch.func.jacrev(out)(flat)
    z = out(flat)
    H = torch.func.hessian(lambda o: loss_fn(o.reshape(X.shape[0], -1), Y))(z)
    diag = torch.einsum("ai,ab,bi->i", J, H, J)
    return dict(zip(names, torch.split(diag, [s.numel() for s in shapes]), strict=True))


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("only", [None, ["2.weight"], ["0.bias", "2.bias"]])
def test_block_diagonal_equals_the_dense_ggn(only, create_graph):
    g = torch.Generator().manual_seed(0)
    model = make_mlp([3, 5, 4], "tanh", 0)
    X = torch.randn(6, 3, generator=g, dtype=DTYPE)
    Y = torch.randint(0, 4, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    expected = _dense_ggn_diagonal(model, X, Y, loss_fn)
    with module_problem(model, None, X, Y, create_graph=create_graph, only=only) as problem:
        names = [problem.names[i] for i in problem.active]
        diag = problem_ggn_diagonal(problem, loss_fn, Y, create_graph=create_graph)
    assert names == (only or [n for n, _ in model.named_parameters()])
    assert all(d.requires_grad == create_graph for d in diag)
    for name, d in zip(names, diag, strict=True):
        assert_close(d.detach().reshape(-1), expected[name])


@pytest.mark.parametrize("strategy", ["vmap", "graph", "graph_batched"])
def test_block_hessian_products_carry_no_graph_to_the_other_parameters(strategy):
    """``only=``: the parameters left out are constants, not a graph kept in every product."""
    g = torch.Generator().manual_seed(1)
    model = make_mlp([3, 4, 2], "tanh", 1)
    X = torch.randn(5, 3, generator=g, dtype=DTYPE)
    Y = torch.randn(5, 2, generator=g, dtype=DTYPE)
    w = model[2].weight.detach()

    def block_loss(weight):
        values = {"2.weight": weight}
        return nn.functional.mse_loss(functional_call(model, values, (X,)), Y)

    H = torch.func.hessian(block_loss)(w).reshape(w.numel(), w.numel())
    V = torch.randn(3, w.numel(), generator=g, dtype=DTYPE)
    with module_problem(model, nn.MSELoss(), X, Y, only=["2.weight"]) as problem:
        rows = problem.matmat(strategy)(V)
    assert not rows.requires_grad
    assert_close(rows, V @ H)
