"""The GGN (dense matrix and diagonal) against J^T H_out J from jacrev/hessian in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_tanh_mlp_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from torch_secorder import (
    gauss_newton_matrix,
    gauss_newton_matrix_approximation,
    generalized_fisher_diagonal,
)
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
    G = gauss_newton_matrix(model, loss_fn, x, y)
    torch.testing.assert_close(G, oracle(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)


def test_many_outputs_route_jacfwd_and_products():
    """M = 40 outputs > n = 6 parameters: jacfwd and loss-Hessian products."""
    model, x, y = problem(3, 20, 1, 2, 2, "mse")
    loss_fn = LOSSES["nonconvex"]
    G = gauss_newton_matrix(model, loss_fn, x, y, chunk_size=4)
    torch.testing.assert_close(G, oracle(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)


def test_ggn_equals_type2_fisher_for_cross_entropy():
    model, x, y = problem(4, 5, 3, 4, 3, "ce")
    G = gauss_newton_matrix(model, nn.CrossEntropyLoss(), x, y)
    diag = torch.cat([d.reshape(-1) for d in generalized_fisher_diagonal(model, model(x), y)])
    torch.testing.assert_close(G.diagonal(), diag, rtol=1e-10, atol=1e-12)


def test_create_graph_derivative():
    model, x, y = problem(5, 3, 2, 3, 2, "ce")
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = grad(lambda p: oracle(model, F.cross_entropy, x, y, p).sum())(params)
    G = gauss_newton_matrix(model, F.cross_entropy, x, y, create_graph=True)
    got = torch.autograd.grad(G.sum(), list(model.parameters()))
    for g, k in zip(got, params, strict=True):
        torch.testing.assert_close(g, expected[k], rtol=1e-9, atol=1e-11)
    assert all(p.grad is None for p in model.parameters())


def test_refuses_when_too_large():
    model, x, y = problem(0, 4, 3, 4, 2, "mse")
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(GGNTooLargeError, match=rf"n={n} parameters.*max_bytes=100\b") as info:
        gauss_newton_matrix(model, nn.MSELoss(), x, y, max_bytes=100)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    needed = (n * n + 2 * 8 * n + 8 * 8) * 8
    assert f"{needed:,} bytes" in str(info.value)


def test_state_kept_with_batch_norm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model.train()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    G = gauss_newton_matrix(model, nn.MSELoss(), x, y)
    assert G.shape == (sum(p.numel() for p in params),) * 2
    assert model.training
    for b, s in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, s)
    for p, s in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, s) and p.grad is None


def test_bad_input():
    model, x, y = problem(0, 3, 2, 3, 2, "mse")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gauss_newton_matrix(lambda t: t, nn.MSELoss(), x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gauss_newton_matrix(model, "mse", x, y)
    with pytest.raises(ValueError, match="scalar"):
        gauss_newton_matrix(model, nn.MSELoss(reduction="none"), x, y)
    with pytest.raises(RuntimeError):
        gauss_newton_matrix(model, nn.MSELoss(), x, y[:, :1].expand(3, 5))


# ------------------------------------------------------------- the diagonal (0.0.1's format)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def frozen_first_layer(seed: int):
    model, x, y = problem(seed, 4, 3, 4, 2, "mse")
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model, x, y


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(2, 3),
    st.sampled_from(sorted(LOSSES)),
    st.booleans(),
    st.sampled_from([None, 1, 5]),
)
def test_diagonal_matches_dense_oracle(
    seed, batch, d_in, hidden, d_out, loss_name, create_graph, chunk_size
):
    """diag(J^T H_out J) of the dense oracle, one tensor per parameter, every route."""
    kind = "ce" if loss_name == "ce" else "mse"
    model, x, y = problem(seed, batch, d_in, hidden, d_out, kind)
    loss_fn = LOSSES[loss_name]
    diag = gauss_newton_matrix_approximation(
        model, loss_fn, x, y, create_graph=create_graph, chunk_size=chunk_size
    )
    assert isinstance(diag, list)
    assert [d.shape for d in diag] == [p.shape for p in model.parameters()]
    expected = oracle(model, loss_fn, x, y).diagonal()
    torch.testing.assert_close(flat(diag), expected, rtol=1e-10, atol=1e-12)
    assert all((d.grad_fn is not None) == create_graph for d in diag)


def test_diagonal_of_mse_is_scaled_jtj():
    """nn.MSELoss() (mean over N*D entries): G = 2/(N D) J^T J; 0.0.1 returned diag(J^T J)."""
    model, x, y = problem(11, 5, 3, 4, 2, "mse")
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([jac[k].reshape(10, -1) for k in params], dim=1)
    jtj = (J * J).sum(0)
    mean = gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(flat(mean), 2 / 10 * jtj, rtol=1e-10, atol=1e-12)
    summed = gauss_newton_matrix_approximation(model, nn.MSELoss(reduction="sum"), x, y)
    torch.testing.assert_close(flat(summed), 2 * jtj, rtol=1e-10, atol=1e-12)


def test_diagonal_of_l1_loss_is_zero():
    """0.0.1 refused any loss but MSE; the GGN of L1 (zero second derivative) is zero."""
    model, x, y = problem(12, 4, 3, 4, 2, "mse")
    diag = gauss_newton_matrix_approximation(model, nn.L1Loss(), x, y)
    torch.testing.assert_close(flat(diag), oracle(model, nn.L1Loss(), x, y).diagonal())
    assert all(torch.equal(d, torch.zeros_like(d)) for d in diag)


@pytest.mark.parametrize("create_graph", [False, True])
def test_diagonal_leaves_out_frozen_parameters(create_graph):
    model, x, y = frozen_first_layer(13)
    loss_fn = LOSSES["nonconvex"]
    diag = gauss_newton_matrix_approximation(model, loss_fn, x, y, create_graph=create_graph)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [d.shape for d in diag] == [p.shape for p in trainable]
    params = {k: v.detach() for k, v in model.named_parameters()}
    full = oracle(model, loss_fn, x, y, params).diagonal()
    n_frozen = sum(p.numel() for p in model[0].parameters())
    torch.testing.assert_close(flat(diag), full[n_frozen:], rtol=1e-10, atol=1e-12)
    dense = gauss_newton_matrix(model, loss_fn, x, y)
    assert dense.shape == (full.numel() - n_frozen,) * 2
    torch.testing.assert_close(dense, oracle(model, loss_fn, x, y)[n_frozen:, n_frozen:])
    assert all(not p.requires_grad for p in model[0].parameters())


def test_diagonal_create_graph_derivative():
    model, x, y = problem(14, 3, 2, 3, 2, "ce")
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = grad(lambda p: oracle(model, F.cross_entropy, x, y, p).diagonal().sum())(params)
    diag = gauss_newton_matrix_approximation(model, F.cross_entropy, x, y, create_graph=True)
    got = torch.autograd.grad(flat(diag).sum(), list(model.parameters()))
    for g, k in zip(got, params, strict=True):
        torch.testing.assert_close(g, expected[k], rtol=1e-9, atol=1e-11)
    assert all(p.grad is None for p in model.parameters())


def test_diagonal_with_dropout_uses_the_mask_of_a_plain_forward():
    """Training-mode dropout: the column route, one mask, that of model(x) from the same seed."""
    model, x, y = problem(15, 5, 3, 6, 2, "mse")
    model = nn.Sequential(model[0], model[1], nn.Dropout(0.5), model[2]).train()
    loss_fn = nn.MSELoss()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_fn(p):
        return functional_call(model, p, (x,))

    torch.manual_seed(7)
    out = out_fn(params)
    torch.manual_seed(7)
    jac = jacrev(out_fn)(params)
    J = torch.cat([jac[k].reshape(out.numel(), -1) for k in params], dim=1)
    H = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    expected = (J.T @ H @ J).diagonal()
    for chunk_size in (None, 4):
        torch.manual_seed(7)
        diag = gauss_newton_matrix_approximation(model, loss_fn, x, y, chunk_size=chunk_size)
        torch.testing.assert_close(flat(diag), expected, rtol=1e-10, atol=1e-12)
    torch.manual_seed(7)
    torch.testing.assert_close(gauss_newton_matrix(model, loss_fn, x, y).diagonal(), expected)


def test_diagonal_keeps_state_with_batch_norm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model.train()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    loss_fn = nn.MSELoss()
    for create_graph in (False, True):
        diag = gauss_newton_matrix_approximation(model, loss_fn, x, y, create_graph=create_graph)
        dense = gauss_newton_matrix(model, loss_fn, x, y)
        torch.testing.assert_close(flat(diag), dense.diagonal(), rtol=1e-10, atol=1e-12)
    assert model.training
    for b, s in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, s)
    for p, s in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, s) and p.grad is None


def test_diagonal_of_a_frozen_model_is_empty_with_a_warning():
    model, x, y = problem(16, 3, 2, 3, 2, "mse")
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match="no parameter that requires grad"):
        assert gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y) == []
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        gauss_newton_matrix(model, nn.MSELoss(), x, y)


def test_diagonal_bad_input():
    model, x, y = problem(0, 3, 2, 3, 2, "mse")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gauss_newton_matrix_approximation(lambda t: t, nn.MSELoss(), x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gauss_newton_matrix_approximation(model, "mse", x, y)
    with pytest.raises(ValueError, match="scalar"):
        gauss_newton_matrix_approximation(model, nn.MSELoss(reduction="none"), x, y)
    for fn in (gauss_newton_matrix_approximation, gauss_newton_matrix):
        with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
            fn(model, nn.MSELoss(), x, y, chunk_size=0)
        with pytest.raises(TypeError, match="chunk_size must be an int or None, got float"):
            fn(model, nn.MSELoss(), x, y, chunk_size=2.0)


def test_exports():
    import torch_secorder
    from torch_secorder import approximations
    from torch_secorder.approximations import gauss_newton

    for name in ("gauss_newton_matrix", "gauss_newton_matrix_approximation"):
        assert name in approximations.__all__ and name in torch_secorder.__all__
        assert getattr(torch_secorder, name) is getattr(gauss_newton, name)
