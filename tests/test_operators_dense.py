"""Curvature operators over data against the dense matrix of the whole data set as one batch.

Oracle: the Hessian / GGN / empirical Fisher of ``loss_fn(model(X), Y)`` on all samples
at once (float64, ``torch.func``), which is the loss over the data set that the
operators define (batches weighted by size for ``"mean"``, summed for ``"sum"``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close, dense_hessian, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_secorder.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

DTYPE = torch.float64


def _case(seed, d_in, hidden, d_out, sizes, kind, reduction):
    g = torch.Generator().manual_seed(seed)
    model = make_mlp([d_in, hidden, d_out], "tanh", seed)
    n = sum(sizes)
    X = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    if kind == "ce":
        Y = torch.randint(0, d_out, (n,), generator=g)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    else:
        Y = torch.randn(n, d_out, generator=g, dtype=DTYPE)
        loss_fn = nn.MSELoss(reduction=reduction)
    batches, start = [], 0
    for size in sizes:
        batches.append((X[start : start + size], Y[start : start + size]))
        start += size
    return model, loss_fn, batches, X, Y


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["mse", "ce"]))
    d_out = draw(st.integers(2 if kind == "ce" else 1, 3))
    full = draw(st.integers(1, 4))
    count = draw(st.integers(1, 3))
    short = draw(st.integers(1, full))  # a short last batch
    sizes = [full] * (count - 1) + [short]
    return _case(
        draw(st.integers(0, 10**6)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        d_out,
        sizes,
        kind,
        draw(st.sampled_from(["mean", "sum"])),
    )


def _flat_params(model, names):
    by_name = dict(model.named_parameters())
    return {name: by_name[name].detach() for name in names}


def dense_hessian_of(model, loss_fn, X, Y, names):
    # A list, not a dict: the oracle flattens in the operator's order (a dict's keys get sorted).
    params = list(_flat_params(model, names).values())

    def loss(p):
        return loss_fn(functional_call(model, dict(zip(names, p, strict=True)), (X,)), Y)

    return dense_hessian(loss, params)


def dense_ggn_of(model, loss_fn, X, Y, names):
    params = _flat_params(model, names)
    out = functional_call(model, params, (X,))
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def output(x):
        pieces, start = {}, 0
        for name, p in params.items():
            pieces[name] = x[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return functional_call(model, pieces, (X,)).reshape(-1)

    J = torch.func.jacrev(output)(flat)  # (m, n)
    H_out = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), Y))(out.reshape(-1).detach())
    return J.T @ H_out @ J


def dense_empirical_fisher_of(model, loss_fn, X, Y, names, reduction):
    params = _flat_params(model, names)
    rows = []
    for i in range(X.shape[0]):
        x, y = X[i : i + 1], Y[i : i + 1]
        grads = torch.func.grad(lambda p, x=x, y=y: loss_fn(functional_call(model, p, (x,)), y))(
            params
        )
        rows.append(torch.cat([grads[name].reshape(-1) for name in names]))
    G = torch.stack(rows)
    F = G.T @ G
    return F / X.shape[0] if reduction == "mean" else F


def _all_names(model):
    return [name for name, _ in model.named_parameters()]


def _check_operator(A, dense, seed):
    n = dense.shape[0]
    assert A.shape == (n, n) and A.dtype == DTYPE and A.device == torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(n, 2, generator=g, dtype=DTYPE)
    assert_close(A @ V, dense @ V)
    assert_close(A @ V[:, 0], dense @ V[:, 0])
    assert_close(A.matmat(V.T.contiguous()), V.T @ dense)
    assert_close(A.diagonal(), torch.diagonal(dense))
    assert_close(A.trace(), torch.trace(dense))


@settings(max_examples=12, deadline=None)
@given(cases(), st.integers(0, 100))
def test_hessian_operator_equals_dense_hessian_of_all_data(case, seed):
    model, loss_fn, batches, X, Y = case
    names = _all_names(model)
    A = HessianOperator(model, loss_fn, batches, progress=False)
    assert A.num_samples == X.shape[0]
    _check_operator(A, dense_hessian_of(model, loss_fn, X, Y, names), seed)
    block = names[::2]
    _check_operator(A.block(block), dense_hessian_of(model, loss_fn, X, Y, block), seed)


@settings(max_examples=10, deadline=None)
@given(cases(), st.integers(0, 100))
def test_ggn_operator_equals_dense_ggn_of_all_data(case, seed):
    model, loss_fn, batches, X, Y = case
    names = _all_names(model)
    A = GGNOperator(model, loss_fn, batches)
    _check_operator(A, dense_ggn_of(model, loss_fn, X, Y, names), seed)
    block = names[1:3]
    _check_operator(A.block(block), dense_ggn_of(model, loss_fn, X, Y, block), seed)


@settings(max_examples=10, deadline=None)
@given(cases(), st.integers(0, 100))
def test_fisher_operators_equal_dense_matrices_of_all_data(case, seed):
    model, loss_fn, batches, X, Y = case
    names = _all_names(model)
    F = FisherOperator(model, loss_fn, batches)
    _check_operator(F, dense_ggn_of(model, loss_fn, X, Y, names), seed)
    E = EmpiricalFisherOperator(model, loss_fn, batches)
    dense = dense_empirical_fisher_of(model, loss_fn, X, Y, names, loss_fn.reduction)
    _check_operator(E, dense, seed)
    block = names[:1]
    _check_operator(
        E.block(block),
        dense_empirical_fisher_of(model, loss_fn, X, Y, block, loss_fn.reduction),
        seed,
    )


def test_params_subset_by_tensor_and_frozen_parameters():
    model, loss_fn, batches, X, Y = _case(0, 2, 3, 2, [3, 3, 1], "mse", "mean")
    first = model[0].weight
    A = HessianOperator(model, loss_fn, batches, params=[first])
    assert A.names == ["0.weight"]
    assert_close(
        A @ torch.eye(6, dtype=DTYPE), dense_hessian_of(model, loss_fn, X, Y, ["0.weight"])
    )
    model[2].bias.requires_grad_(False)
    B = HessianOperator(model, loss_fn, batches)
    assert B.names == ["0.weight", "0.bias", "2.weight"]
    assert_close(B.trace(), torch.trace(dense_hessian_of(model, loss_fn, X, Y, B.names)))
    assert model[2].bias.requires_grad is False


def test_plain_function_loss_takes_its_reduction_from_its_signature():
    model, _, batches, X, Y = _case(1, 2, 2, 1, [2, 2, 1], "mse", "mean")
    A = HessianOperator(model, nn.functional.mse_loss, batches)
    assert A.reduction == "mean"
    dense = dense_hessian_of(model, nn.functional.mse_loss, X, Y, _all_names(model))
    assert_close(A.trace(), torch.trace(dense))

    def summed(out, y):
        return ((out - y) ** 2).sum()

    with pytest.raises(ValueError, match="reduction='mean'"):
        HessianOperator(model, summed, batches)
    S = HessianOperator(model, summed, batches, reduction="sum")
    assert_close(S.trace(), torch.trace(dense_hessian_of(model, summed, X, Y, _all_names(model))))
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model, nn.MSELoss(), batches, reduction="sum")


def test_dataloader_with_short_last_batch():
    model, loss_fn, _, X, Y = _case(2, 3, 3, 2, [7], "mse", "mean")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3)
    A = HessianOperator(model, loss_fn, loader)
    assert A.batches.num_batches == 3 and A.num_samples == 7
    dense = dense_hessian_of(model, loss_fn, X, Y, _all_names(model))
    assert_close(A @ torch.eye(A.shape[0], dtype=DTYPE), dense)


def test_state_is_kept():
    model, loss_fn, batches, X, Y = _case(3, 2, 3, 2, [2, 1], "ce", "mean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for A in (HessianOperator, GGNOperator, EmpiricalFisherOperator, FisherOperator):
        op = A(model, loss_fn, batches)
        op @ torch.ones(op.shape[0], dtype=DTYPE)
        op.diagonal()
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_to_scipy_against_dense():
    np = pytest.importorskip("numpy")
    pytest.importorskip("scipy")
    model, loss_fn, batches, X, Y = _case(4, 2, 3, 2, [3, 2], "ce", "sum")
    A = GGNOperator(model, loss_fn, batches)
    dense = dense_ggn_of(model, loss_fn, X, Y, _all_names(model)).numpy()
    S = A.to_scipy()
    assert S.shape == A.shape and S.dtype == np.float64
    rng = np.random.default_rng(0)
    v = rng.standard_normal(A.shape[0])
    M = rng.standard_normal((A.shape[0], 3))
    assert np.abs(S @ v - dense @ v).max() < TOL
    assert np.abs(S.matvec(v) - dense @ v).max() < TOL
    assert np.abs(S @ M - dense @ M).max() < TOL
    assert np.abs(S.rmatvec(v) - dense @ v).max() < TOL


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_monte_carlo_fisher_is_one_fixed_matrix_and_near_the_fisher(kind):
    model, loss_fn, batches, X, Y = _case(6, 2, 3, 3, [4, 4, 2], kind, "mean")
    exact = dense_ggn_of(model, loss_fn, X, Y, _all_names(model))
    F = FisherOperator(
        model, loss_fn, batches, num_samples=1000, generator=torch.Generator().manual_seed(0)
    )
    dense = F @ torch.eye(F.shape[0], dtype=DTYPE)
    assert_close(dense, dense.T)
    assert_close(F @ torch.eye(F.shape[0], dtype=DTYPE), dense)  # the same draws every pass
    assert_close(F.diagonal(), torch.diagonal(dense))
    assert_close(F.block(["2.weight"]).diagonal(), torch.diagonal(dense)[9:18])
    assert torch.linalg.eigvalsh(dense).min() > -1e-12
    # 1000 draws per sample: relative error about sqrt(2 / 1000) = 4.5% (fixed seed: no flakes)
    assert torch.linalg.norm(dense - exact) < 0.15 * torch.linalg.norm(exact)
    other = FisherOperator(
        model, loss_fn, batches, num_samples=1000, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(other.diagonal(), F.diagonal(), rtol=0, atol=1e-12)
