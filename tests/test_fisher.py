"""Fisher diagonals and traces against dense float64 oracles from torch.func."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_tanh_mlp_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

import torch_secorder
from torch_secorder.approximations import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
)

DT = torch.float64


make_problem = seeded_tanh_mlp_problem


def flat_params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def tree_ravel(tree):
    """Flatten a parameter dict in model order (optree would sort the keys)."""
    return torch.cat([v.reshape(-1) for v in tree.values()])


def dense_jacobian(model, x):
    """(M, n) Jacobian of the batch outputs, parameters in model.parameters() order."""
    params = flat_params(model)
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    m = model(x).numel()
    return torch.cat([jac[k].reshape(m, -1) for k in params], dim=1)


def dense_ggn(model, loss, x, y):
    J = dense_jacobian(model, x)
    out = model(x).detach()
    H = hessian(lambda o: loss(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def fisher_by_definition_ce(model, x):
    """(1/N) sum_i E_{y~p_i}[grad log p(y|x_i) grad log p(y|x_i)^T], summed over classes."""
    params = flat_params(model)
    n = sum(p.numel() for p in params.values())
    total = torch.zeros(n, n, dtype=DT)
    N = x.shape[0]
    for i in range(N):
        probs = torch.softmax(model(x[i : i + 1]), -1)[0].detach()
        for c in range(probs.shape[0]):

            def logp(p, i=i, c=c):
                return torch.log_softmax(functional_call(model, p, (x[i : i + 1],)), -1)[0, c]

            g = tree_ravel(grad(logp)(params))
            total += probs[c] * torch.outer(g, g)
    return total / N


def per_sample_grads(model, loss, x, y):
    params = flat_params(model)
    rows = []
    for i in range(x.shape[0]):

        def f(p, i=i):
            return loss(functional_call(model, p, (x[i : i + 1],)), y[i : i + 1])

        rows.append(tree_ravel(grad(f)(params)))
    return torch.stack(rows)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


problems = st.tuples(
    st.integers(0, 10_000),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(2, 4),
)


@settings(max_examples=8, deadline=None)
@given(problems, st.sampled_from(["ce", "mse"]))
def test_empirical_fisher_is_mean_of_per_sample_outer_products(spec, kind):
    model, x, y = make_problem(*spec, kind)
    loss = nn.CrossEntropyLoss() if kind == "ce" else nn.MSELoss()
    G = per_sample_grads(model, loss, x, y)
    oracle = (G[:, :, None] * G[:, None, :]).mean(0)
    diag = flat(empirical_fisher_diagonal(model, loss, x, y))
    torch.testing.assert_close(diag, oracle.diagonal(), rtol=1e-10, atol=1e-12)
    trace = empirical_fisher_trace(model, loss, x, y)
    torch.testing.assert_close(trace, oracle.trace(), rtol=1e-10, atol=1e-12)


def test_empirical_fisher_differs_from_squared_batch_gradient():
    model, x, y = make_problem(0, 4, 3, 4, 2, "mse")
    loss = nn.MSELoss()
    batch_grad = flat(torch.autograd.grad(loss(model(x), y), list(model.parameters())))
    diag = flat(empirical_fisher_diagonal(model, loss, x, y, chunk_size=3))
    assert not torch.allclose(diag, batch_grad**2)
    G = per_sample_grads(model, loss, x, y)
    torch.testing.assert_close(diag, (G**2).mean(0), rtol=1e-10, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(problems)
def test_type2_fisher_ce_equals_ggn_and_definition(spec):
    model, x, y = make_problem(*spec, "ce")
    ggn = dense_ggn(model, nn.CrossEntropyLoss(), x, y)
    definition = fisher_by_definition_ce(model, x)
    torch.testing.assert_close(ggn, definition, rtol=1e-10, atol=1e-12)
    diag = flat(generalized_fisher_diagonal(model, model(x), y, chunk_size=2))
    torch.testing.assert_close(diag, definition.diagonal(), rtol=1e-10, atol=1e-12)
    trace = generalized_fisher_trace(model, model(x), y)
    torch.testing.assert_close(trace, definition.trace(), rtol=1e-10, atol=1e-12)
    dense = torch_secorder.gauss_newton_matrix(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(dense, definition, rtol=1e-10, atol=1e-12)
    summed = flat(generalized_fisher_diagonal(model, model(x), y, "CE", reduction="sum"))
    torch.testing.assert_close(summed, x.shape[0] * definition.diagonal(), rtol=1e-10, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(problems)
def test_type2_fisher_mse_equals_ggn_of_mse_loss(spec):
    model, x, y = make_problem(*spec, "mse")
    for reduction in ("mean", "sum"):
        oracle = dense_ggn(model, nn.MSELoss(reduction=reduction), x, y)
        diag = flat(generalized_fisher_diagonal(model, model(x), y, "mse", reduction=reduction))
        torch.testing.assert_close(diag, oracle.diagonal(), rtol=1e-10, atol=1e-12)
        trace = generalized_fisher_trace(model, model(x), y, "gaussian", reduction=reduction)
        torch.testing.assert_close(trace, oracle.trace(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_monte_carlo_trace_is_unbiased(kind):
    """z-test at 5 standard errors (false alarm about 6e-7) on 400 independent runs."""
    model, x, y = make_problem(3, 3, 2, 3, 4, kind)
    exact = generalized_fisher_trace(model, model(x), y, "nll" if kind == "ce" else "mse")
    out = model(x)
    g = torch.Generator().manual_seed(1)
    runs = torch.stack(
        [
            generalized_fisher_trace(
                model,
                out,
                y,
                "nll" if kind == "ce" else "mse",
                num_samples=2,
                exact=False,
                generator=g,
            )
            for _ in range(400)
        ]
    )
    se = runs.std() / math.sqrt(runs.numel())
    assert se > 0
    assert abs(float(runs.mean() - exact)) < 5 * float(se)
    diag_runs = torch.stack(
        [
            flat(
                generalized_fisher_diagonal(
                    model, out, y, "nll" if kind == "ce" else "mse", num_samples=2, generator=g
                )
            )
            for _ in range(400)
        ]
    )
    exact_diag = flat(generalized_fisher_diagonal(model, out, y, "nll" if kind == "ce" else "mse"))
    se_diag = diag_runs.std(0) / math.sqrt(400)
    z = (diag_runs.mean(0) - exact_diag).abs() / se_diag.clamp_min(1e-300)
    assert bool((z < 5.5).all()), z.max()


def test_generalized_fisher_create_graph_matches_oracle_derivative():
    model, x, y = make_problem(5, 3, 2, 3, 3, "ce")
    names = [k for k, _ in model.named_parameters()]

    def diag_oracle(p):
        def out_fn(q):
            return functional_call(model, q, (x,))

        out = out_fn(p)
        jac = jacrev(out_fn)(p)
        J = torch.cat([jac[k].reshape(out.numel(), -1) for k in names], dim=1)
        H = hessian(lambda o: F.cross_entropy(o, y))(out).reshape(out.numel(), out.numel())
        return (J * (H @ J)).sum(0).sum()

    expected = tree_ravel(grad(diag_oracle)(flat_params(model)))
    diag = generalized_fisher_diagonal(model, model(x), y, create_graph=True)
    params = list(model.parameters())
    got = flat(torch.autograd.grad(sum(d.sum() for d in diag), params))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_frozen_parameters_get_zeros_and_state_is_kept():
    model, x, y = make_problem(2, 3, 2, 3, 3, "ce")
    model[0].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    diag = generalized_fisher_diagonal(model, out, y)
    emp = empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert torch.equal(diag[0], torch.zeros_like(diag[0]))
    assert torch.equal(emp[0], torch.zeros_like(emp[0]))
    assert diag[2].abs().sum() > 0 and emp[2].abs().sum() > 0
    out.sum().backward()  # the graph of outputs is still there
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert not model[0].weight.requires_grad


def test_empirical_fisher_keeps_buffers_and_mode_also_on_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), x, y)

    def bad_loss(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        empirical_fisher_trace(model, bad_loss, x, y)
    assert not model.training
    for b, s in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, s)
    for p, s in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, s)
        assert p.grad is None


def test_bad_input():
    model, x, y = make_problem(0, 3, 2, 3, 3, "ce")
    out = model(x)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        empirical_fisher_diagonal(lambda t: t, nn.CrossEntropyLoss(), x, y)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        generalized_fisher_diagonal("model", out, y)
    with pytest.raises(NotImplementedError, match="supported"):
        generalized_fisher_diagonal(model, out, y, loss_type="hinge")
    with pytest.raises(NotImplementedError, match="supported"):
        generalized_fisher_trace(model, out, y, loss_type="poisson")
    with pytest.raises(ValueError, match="targets must have shape"):
        generalized_fisher_diagonal(model, out, y[:2])
    with pytest.raises(ValueError, match="shape of outputs"):
        generalized_fisher_diagonal(model, out, y, loss_type="mse")
    with pytest.raises(ValueError, match="autograd"):
        generalized_fisher_trace(model, out.detach(), y)
    with pytest.raises(ValueError, match="same batch size"):
        empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), x, y[:2])
    with pytest.raises(ValueError, match="num_samples"):
        empirical_fisher_trace(model, nn.CrossEntropyLoss(), x, y, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        generalized_fisher_diagonal(model, out, y, num_samples=0)
    with pytest.raises(ValueError, match="reduction"):
        generalized_fisher_diagonal(model, out, y, reduction="max")
