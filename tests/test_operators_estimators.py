"""Estimators of ``linalg`` on curvature operators; the ``data=`` form of the model functions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_secorder import model_hessian_diagonal, model_hessian_trace
from torch_secorder.core.hessian_trace import model_hessian_trace_estimate
from torch_secorder.linalg import hutchinson, lanczos_eigsh, xtrace
from torch_secorder.operators import GGNOperator, HessianOperator

DTYPE = torch.float64


def _data(seed, sizes, d_in=2, d_out=2, kind="mse"):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    X = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    if kind == "ce":
        Y = torch.randint(0, d_out, (n,), generator=g)
    else:
        Y = torch.randn(n, d_out, generator=g, dtype=DTYPE)
    batches, start = [], 0
    for size in sizes:
        batches.append((X[start : start + size], Y[start : start + size]))
        start += size
    return X, Y, batches


def _dense(A):
    return A @ torch.eye(A.shape[0], dtype=A.dtype)


def test_estimators_run_on_an_operator_as_on_its_dense_matrix():
    model = make_mlp([2, 3, 2], "tanh", 1)
    _, _, batches = _data(1, [3, 3, 2])
    A = HessianOperator(model, nn.MSELoss(), batches)
    dense = _dense(A)
    n = A.shape[0]

    def dense_matmat(V):
        return V @ dense

    for estimator, count in ((hutchinson, 5), (xtrace, 8)):
        on_operator = estimator(
            A.matmat,
            n,
            count,
            dtype=DTYPE,
            progress=False,
            generator=torch.Generator().manual_seed(3),
        )
        on_dense = estimator(
            dense_matmat,
            n,
            count,
            dtype=DTYPE,
            progress=False,
            generator=torch.Generator().manual_seed(3),
        )
        assert_close(on_operator.estimate, on_dense.estimate)
    top = lanczos_eigsh(
        A.matmat,
        n,
        2,
        which="LA",
        tol=1e-10,
        dtype=DTYPE,
        generator=torch.Generator().manual_seed(0),
    )
    assert_close(top.eigenvalues, torch.linalg.eigvalsh(dense).flip(0)[:2], tol=1e-8)
    assert bool(top.converged.all())


@settings(max_examples=8, deadline=None)
@given(
    st.integers(0, 10**5),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.sampled_from(["mean", "sum"]),
    st.sampled_from(["mse", "ce"]),
)
def test_data_form_equals_one_batch(seed, sizes, reduction, kind):
    model = make_mlp([2, 3, 2], "tanh", seed)
    X, Y, batches = _data(seed, sizes, kind=kind)
    loss_fn = (
        nn.MSELoss(reduction=reduction)
        if kind == "mse"
        else nn.CrossEntropyLoss(reduction=reduction)
    )
    assert_close(
        model_hessian_trace(model, loss_fn, data=batches, progress=False),
        model_hessian_trace(model, loss_fn, X, Y, progress=False),
    )
    assert_close(
        model_hessian_diagonal(model, loss_fn, data=batches, progress=False),
        model_hessian_diagonal(model, loss_fn, X, Y, progress=False),
    )


def test_data_form_with_a_dataloader_frozen_parameters_and_hutchinson():
    model = make_mlp([2, 3, 2], "tanh", 5)
    model[0].bias.requires_grad_(False)
    X, Y, _ = _data(5, [7])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3)
    diag = model_hessian_diagonal(model, nn.MSELoss(), data=loader)
    assert_close(diag, model_hessian_diagonal(model, nn.MSELoss(), X, Y))
    assert torch.equal(diag[1], torch.zeros(3, dtype=DTYPE))
    est = model_hessian_trace_estimate(
        model,
        nn.functional.mse_loss,
        data=loader,
        num_samples=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    dense = _dense(HessianOperator(model, nn.MSELoss(), (X, Y)))
    same = hutchinson(
        lambda V: V @ dense,
        dense.shape[0],
        4,
        dtype=DTYPE,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert_close(est.estimate, same.estimate)
    assert_close(est.std_error, same.std_error)


def test_data_form_errors():
    model = make_mlp([2, 3, 2], "tanh", 0)
    X, Y, batches = _data(0, [2, 2])
    with pytest.raises(TypeError, match="either inputs and targets or data="):
        model_hessian_trace(model, nn.MSELoss(), X, Y, data=batches)
    with pytest.raises(TypeError, match="either inputs and targets or data="):
        model_hessian_diagonal(model, nn.MSELoss(), X, data=batches)
    with pytest.raises(TypeError, match="needs inputs and targets"):
        model_hessian_trace(model, nn.MSELoss(), X)
    with pytest.raises(ValueError, match="create_graph=True is not supported with data="):
        model_hessian_trace(model, nn.MSELoss(), data=batches, create_graph=True)
    with pytest.raises(ValueError, match="reduction='mean'"):
        model_hessian_trace(model, lambda o, y: ((o - y) ** 2).sum(), data=batches)
    with pytest.raises(ValueError, match="data is empty"):
        model_hessian_diagonal(model, nn.MSELoss(), data=[])


def test_ggn_operator_is_positive_semidefinite_for_xnystrace_users():
    model = make_mlp([2, 3, 3], "tanh", 2)
    _, _, batches = _data(2, [3, 2], d_out=3, kind="ce")
    G = GGNOperator(model, nn.CrossEntropyLoss(), batches)
    assert torch.linalg.eigvalsh(_dense(G)).min() > -1e-12


def test_targets_none_stays_a_one_batch_call():
    model = make_mlp([2, 3, 1], "tanh", 0)
    X, _, _ = _data(0, [4])

    def loss_fn(out, targets):  # a loss that ignores its targets
        return out.pow(2).mean()

    H = HessianOperator(model, loss_fn, [(X, torch.zeros(4))], reduction="mean")
    assert_close(model_hessian_trace(model, loss_fn, X, None), H.trace())
    assert_close(model_hessian_diagonal(model, loss_fn, X, None), H.unflatten(H.diagonal()))
