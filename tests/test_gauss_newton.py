"""The dense GGN against J^T H_out J from torch.func.jacrev/hessian in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_tanh_mlp_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from torch_secorder import gauss_newton_matrix_approximation, generalized_fisher_diagonal
from torch_secorder.approximations.gauss_newton import GGNTooLargeError

DT = torch.float64


problem = seeded_tanh_mlp_problem


def oracle(model, loss_fn, x, y, params=None):
    params = params or {k: v.detach() for k, v in model.named_parameters()}

    def out_fn(p):
        return functional_call(model, p, (x,))

    out = out_fn(params)
    m = out.numel()
    jac = jacrev(out_fn)(params)
    J = torch.cat([jac[k].reshape(m, -1) for k in params], dim=1)
    H = hessian(lambda o: loss_fn(o, y))(out).reshape(m, m)
    return J.T @ H @ J


LOSSES = {
    "mse": nn.MSELoss(),
    "mse_sum": nn.MSELoss(reduction="sum"),
    "ce": nn.CrossEntropyLoss(),
    "nonconvex": lambda o, t: (torch.sin(o) * t).sum() + (o**4).mean(),
}


@settings(max_examples=10, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(2, 3),
    st.sampled_from(sorted(LOSSES)),
)
def test_ggn_matches_dense_oracle(seed, batch, d_in, hidden, d_out, loss_name):
    kind = "ce" if loss_name == "ce" else "mse"
    model, x, y = problem(seed, batch, d_in, hidden, d_out, kind)
    loss_fn = LOSSES[loss_name]
    G = gauss_newton_matrix_approximation(model, loss_fn, x, y)
    torch.testing.assert_close(G, oracle(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)


def test_many_outputs_route_jacfwd_and_products():
    """M = 40 outputs > n = 6 parameters: jacfwd and loss-Hessian products."""
    model, x, y = problem(3, 20, 1, 2, 2, "mse")
    loss_fn = LOSSES["nonconvex"]
    G = gauss_newton_matrix_approximation(model, loss_fn, x, y, chunk_size=4)
    torch.testing.assert_close(G, oracle(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)


def test_ggn_equals_type2_fisher_for_cross_entropy():
    model, x, y = problem(4, 5, 3, 4, 3, "ce")
    G = gauss_newton_matrix_approximation(model, nn.CrossEntropyLoss(), x, y)
    diag = torch.cat([d.reshape(-1) for d in generalized_fisher_diagonal(model, model(x), y)])
    torch.testing.assert_close(G.diagonal(), diag, rtol=1e-10, atol=1e-12)


def test_create_graph_derivative():
    model, x, y = problem(5, 3, 2, 3, 2, "ce")
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = grad(lambda p: oracle(model, F.cross_entropy, x, y, p).sum())(params)
    G = gauss_newton_matrix_approximation(model, F.cross_entropy, x, y, create_graph=True)
    got = torch.autograd.grad(G.sum(), list(model.parameters()))
    for g, k in zip(got, params, strict=True):
        torch.testing.assert_close(g, expected[k], rtol=1e-9, atol=1e-11)
    assert all(p.grad is None for p in model.parameters())


def test_refuses_when_too_large():
    model, x, y = problem(0, 4, 3, 4, 2, "mse")
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(GGNTooLargeError, match=rf"n={n} parameters.*max_bytes=100\b") as info:
        gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y, max_bytes=100)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    needed = (n * n + 2 * 8 * n + 8 * 8) * 8
    assert f"{needed:,} bytes" in str(info.value)


def test_state_kept_with_batch_norm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model.train()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    G = gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y)
    assert G.shape == (sum(p.numel() for p in params),) * 2
    assert model.training
    for b, s in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, s)
    for p, s in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, s) and p.grad is None


def test_bad_input():
    model, x, y = problem(0, 3, 2, 3, 2, "mse")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gauss_newton_matrix_approximation(lambda t: t, nn.MSELoss(), x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gauss_newton_matrix_approximation(model, "mse", x, y)
    with pytest.raises(ValueError, match="scalar"):
        gauss_newton_matrix_approximation(model, nn.MSELoss(reduction="none"), x, y)
    with pytest.raises(RuntimeError):
        gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y[:, :1].expand(3, 5))
