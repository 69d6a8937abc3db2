"""Curvature operators on models that ``torch.func`` refuses: the graph routes, batch by batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_fallback_refused_by_func import HESSIAN, KINDS, X, Y, _point, build, plain_output

from torch_secorder.operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

DT = torch.float64
BATCHES = [(X[:4], Y[:4]), (X[4:], Y[4:])]  # 4 and 2 samples: weights 4/6 and 2/6


def _dense_ggn() -> torch.Tensor:
    flat = torch.cat([p.reshape(-1) for p in _point()])
    shapes = [p.shape for p in _point()]

    def output(x):
        pieces, start = [], 0
        for shape in shapes:
            size = torch.Size(shape).numel()
            pieces.append(x[start : start + size].reshape(shape))
            start += size
        return plain_output(pieces).reshape(-1)

    J = torch.func.jacrev(output)(flat)
    out = output(flat).detach()
    H_out = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(6, 3), Y))(out)
    return J.T @ H_out @ J


def _dense_empirical_fisher() -> torch.Tensor:
    rows = []
    for i in range(6):
        x, y = X[i : i + 1], Y[i : i + 1]
        g = torch.func.grad(lambda p, x=x, y=y: F.cross_entropy(plain_output_on(p, x), y))(_point())
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    return G.T @ G / 6


def plain_output_on(params, x):
    w1, b1, w2, b2 = params
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("kind", KINDS)
def test_operators_on_refused_models(kind):
    eye = torch.eye(HESSIAN.shape[0], dtype=DT)
    H = HessianOperator(build(kind), torch.nn.CrossEntropyLoss(), BATCHES)
    assert_close(H @ eye, HESSIAN)
    assert_close(H.diagonal(), torch.diagonal(HESSIAN))
    G = GGNOperator(build(kind), torch.nn.CrossEntropyLoss(), BATCHES)
    ggn = _dense_ggn()
    V = torch.randn(HESSIAN.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert_close(G @ V, ggn @ V)
    assert_close(G.diagonal(), torch.diagonal(ggn))
    E = EmpiricalFisherOperator(build(kind), torch.nn.CrossEntropyLoss(), BATCHES)
    emp = _dense_empirical_fisher()
    assert_close(E @ V, emp @ V)
    assert_close(E.trace(), torch.trace(emp))


def test_progress_bar_over_batches_gives_the_same_numbers():
    H = HessianOperator(build("old_function"), torch.nn.CrossEntropyLoss(), BATCHES, progress=True)
    assert_close(H.trace(), torch.trace(HESSIAN))
