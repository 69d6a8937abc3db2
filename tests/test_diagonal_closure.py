"""The closure API's exact diagonal and trace take the fast routes, with the dense oracle's numbers.

``hessian_diagonal(closure, params)`` and the exact ``hessian_trace(closure, params)``
record the closure as a pure function of ``params`` (the closure run under
``SubstitutionMode``) and route it like ``model_hessian_diagonal`` does a model:
the same routes, the same numbers as the dense Hessian.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_secorder.core import hessian_diagonal, hessian_trace
from torch_secorder.func import diagonal_plan
from torch_secorder.func.fast_diagonal import _Problem
from torch_secorder.problems._problem import closure_problem

#: The module (the package attribute of that name is the function).
core_diagonal = importlib.import_module("torch_secorder.problems._hessian_diagonal")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hessian_of_closure  # noqa: E402
from test_fast_diagonal import (  # noqa: E402
    ACTS,
    ARCHS,
    DT,
    Tokens,
    build,
    dense_diagonal,
    loss_and_target,
    plan_of,
)


def closure_plan(func, params) -> list[str]:
    """The route each tensor of ``params`` takes in the closure form (as the wrapper
    runs it: without grad mode, so captured tensors requiring grad change nothing)."""
    with closure_problem(func, params) as problem, torch.no_grad():
        return list(diagonal_plan(problem.plain, problem.primals))


def assert_matches(found, expected) -> None:
    for a, b in zip(found, expected, strict=True):
        assert torch.allclose(a.reshape(-1), b.reshape(-1), atol=1e-10, rtol=0), (
            (a.reshape(-1) - b.reshape(-1)).abs().max()
        )


@pytest.fixture
def no_sweep(monkeypatch):
    """Make every one-hot sweep fail: what passes took the graph or layer routes."""

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep was taken")

    monkeypatch.setattr(_Problem, "leaf_sweep", refuse)
    monkeypatch.setattr(_Problem, "group_sweep", refuse)
    monkeypatch.setattr(core_diagonal._engine, "hessian_diagonal", refuse)


@settings(max_examples=20, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    act=st.sampled_from(sorted(ACTS)),
    loss=st.sampled_from(["mse", "ce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    n=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_closure_form_matches_dense_and_takes_the_model_routes(arch, act, loss, reduction, n, seed):
    classes = 3
    model, x = build(arch, act, seed, n, classes)
    loss_fn, y = loss_and_target(loss, reduction, n, classes)
    params = list(model.parameters())

    def closure():
        return loss_fn(model(x), y)

    dense = dense_diagonal(model, loss_fn, x, y)
    assert_matches(hessian_diagonal(closure, params, progress=False), dense)
    trace = hessian_trace(closure, params, progress=False)
    assert math.isclose(float(trace), float(sum(d.sum() for d in dense)), abs_tol=1e-9)
    assert closure_plan(closure, params) == list(plan_of(model, loss_fn, x, y).values())


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("arch", ["mlp", "layernorm", "conv1d", "bn_eval"])
def test_closure_form_takes_no_sweep_where_the_model_form_takes_none(no_sweep, arch, loss):
    """Chain (MSE too: the closure's rerouted ``mse_loss`` is not what is recorded) and rows."""
    model, x = build(arch, "tanh", 0, 4, 3)
    loss_fn, y = loss_and_target(loss, "mean", 4, 3)
    params = list(model.parameters())

    def closure():
        return loss_fn(model(x), y)

    assert "sweep" not in closure_plan(closure, params)
    dense = dense_diagonal(model, loss_fn, x, y)
    assert_matches(hessian_diagonal(closure, params, progress=False), dense)
    trace = hessian_trace(closure, params, progress=False)
    assert math.isclose(float(trace), float(sum(d.sum() for d in dense)), abs_tol=1e-9)


def test_blocks_route_through_the_closure(no_sweep):
    """Embedding and linear on tokens through SubstitutionMode (the graph route)."""
    torch.manual_seed(0)
    model = Tokens(50, 16, 3, attention=True, act=nn.Tanh).to(DT)
    idx, y = torch.randint(0, 50, (6, 3)), torch.randint(0, 3, (6,))
    params = [model.emb.weight, model.lin.weight, model.head.weight]

    def closure():
        return F.cross_entropy(model(idx), y)

    assert closure_plan(closure, params) == ["graph", "graph", "graph"]
    expected = torch.diagonal(hessian_of_closure(closure, params))
    found = hessian_diagonal(closure, params, progress=False)
    assert_matches([torch.cat([d.reshape(-1) for d in found])], [expected])


def test_plain_tensors_and_a_subset_of_the_parameters(no_sweep):
    """A closure over free tensors (no module), and one differentiating some tensors only."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(5, 4, generator=g, dtype=DT, requires_grad=True)
    b1 = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    w2 = torch.randn(3, 5, generator=g, dtype=DT, requires_grad=True)
    x = torch.randn(6, 4, generator=g, dtype=DT)
    y = torch.randn(6, 3, generator=g, dtype=DT)

    def closure():
        return F.mse_loss(F.linear(F.softplus(F.linear(x, w1, b1)), w2), y, reduction="sum")

    for params in ([w1, b1, w2], [w2, w1], [b1]):
        assert set(closure_plan(closure, params)) == {"graph"}
        expected = torch.diagonal(hessian_of_closure(closure, params))
        found = hessian_diagonal(closure, params, progress=False)
        assert_matches([torch.cat([d.reshape(-1) for d in found])], [expected])
        trace = hessian_trace(closure, params, progress=False)
        assert math.isclose(float(trace), float(expected.sum()), rel_tol=1e-12)


def test_tied_tensor_read_twice_by_the_closure_is_swept():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4, generator=g, dtype=DT, requires_grad=True)
    head = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    x, y = torch.randn(5, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,))

    def closure():
        return F.cross_entropy(
            F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, w)), w)), head), y
        )

    plan = closure_plan(closure, [w, head])
    assert plan[0] == "sweep"
    expected = torch.diagonal(hessian_of_closure(closure, [w, head]))
    found = hessian_diagonal(closure, [w, head], progress=False)
    assert_matches([torch.cat([d.reshape(-1) for d in found])], [expected])


def test_closure_leaves_the_user_state_alone():
    model, x = build("bn_train", "gelu", 3, 5, 3)
    loss_fn, y = loss_and_target("ce", "mean", 5, 3)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    params[1].requires_grad_(False)
    values = [p.detach().clone() for p in params]
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]

    def closure():
        return loss_fn(model(x), y)

    found = hessian_diagonal(closure, params, progress=False)
    assert torch.equal(found[1], torch.zeros_like(params[1]))
    assert all(torch.equal(a, b) for a, b in zip(values, params, strict=True))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)
    assert [p.requires_grad for p in params] == [True, False, True, True, True, True]
    assert list(model.buffers()) == buffers
    assert all(torch.equal(a, b) for a, b in zip(saved, buffers, strict=True))
    assert model.training
    params[1].requires_grad_(True)
    dense = dense_diagonal(model, loss_fn, x, y)
    for i in (0, 2, 3, 4, 5):
        assert_matches([found[i]], [dense[i]])


def test_create_graph_and_v_stay_exact():
    """``create_graph=True`` keeps the sweep (differentiable); ``v`` scales the diagonal."""
    model, x = build("mlp", "tanh", 5, 4, 3)
    loss_fn, y = loss_and_target("mse", "mean", 4, 3)
    params = list(model.parameters())

    def closure():
        return loss_fn(model(x), y)

    dense = dense_diagonal(model, loss_fn, x, y)
    graph = hessian_diagonal(closure, params, create_graph=True, progress=False)
    assert all(d.requires_grad for d in graph)
    assert_matches(graph, dense)
    v = [torch.randn_like(p) for p in params]
    scaled = hessian_diagonal(closure, params, v=v, progress=False)
    assert_matches(scaled, [d.reshape(p.shape) * vi for d, p, vi in zip(dense, params, v)])


def test_inputs_requiring_grad_keep_the_fast_routes(no_sweep):
    """Without ``create_graph`` the result is not differentiated: a captured input that
    requires grad does not send the closure to the sweep."""
    model, x = build("mlp", "tanh", 2, 4, 3)
    x.requires_grad_(True)
    loss_fn, y = loss_and_target("ce", "mean", 4, 3)
    found = hessian_diagonal(lambda: loss_fn(model(x), y), list(model.parameters()))
    assert_matches(found, dense_diagonal(model, loss_fn, x.detach(), y))
