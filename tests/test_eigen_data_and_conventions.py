"""model_eigenvalues and model_spectral_density: both loss_fn conventions, data sets.

Oracle: the dense Hessian of the loss over the whole data set as one batch (float64,
``torch.func``); for a data set of unequal batches and a mean loss that is the loss the
operators define (batches weighted by their size).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, dense_hessian, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from torch_secorder import model_eigenvalues, model_hessian_trace, model_spectral_density
from torch_secorder.linalg import stochastic_lanczos_quadrature

DTYPE = torch.float64


def _case(seed: int, sizes: list[int], reduction: str = "mean"):
    g = torch.Generator().manual_seed(seed)
    model = make_mlp([3, 4, 2], "tanh", seed)
    n = sum(sizes)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    Y = torch.randn(n, 2, generator=g, dtype=DTYPE)
    batches, start = [], 0
    for size in sizes:
        batches.append((X[start : start + size], Y[start : start + size]))
        start += size
    loss_fn = nn.MSELoss(reduction=reduction)
    names = [k for k, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]  # a list: model.parameters() order
    H = dense_hessian(
        lambda p: loss_fn(functional_call(model, dict(zip(names, p)), (X,)), Y), params
    )
    return model, loss_fn, X, Y, batches, H


def _flat(vec: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in vec])


def _state(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()], [p.grad for p in model.parameters()]


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    reduction=st.sampled_from(["mean", "sum"]),
    which=st.sampled_from(["LA", "SA"]),
)
def test_eigenvalues_over_a_data_set_equal_the_dense_hessian(seed, sizes, reduction, which):
    model, loss_fn, X, Y, batches, H = _case(seed, sizes, reduction)
    before, grads = _state(model)
    vals, vecs, info = model_eigenvalues(
        model,
        loss_fn,
        batches,
        num_eigenvalues=2,
        num_iterations=H.shape[0] * 4,
        tol=1e-12,
        which=which,
        return_info=True,
    )
    exact = torch.linalg.eigvalsh(H)
    expected = exact.flip(0)[:2] if which == "LA" else exact[:2]
    assert_close(vals, expected, 1e-9)
    assert bool(info.converged.all())
    for value, vec, residual in zip(vals, vecs, info.residuals, strict=True):
        y = _flat(vec)
        true_residual = torch.linalg.vector_norm(H @ y - value * y)
        assert float(true_residual) <= 1e-9
        assert abs(float(residual) - float(true_residual)) <= 1e-9
    after, grads_after = _state(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert grads_after == grads


def test_both_loss_conventions_give_the_same_eigenpairs():
    model, _, X, Y, _, H = _case(1, [6])
    top = torch.linalg.eigvalsh(H).abs().max()
    kwargs = dict(num_eigenvalues=1, num_iterations=200, tol=1e-12)
    by_output, _ = model_eigenvalues(model, F.mse_loss, X, Y, **kwargs)
    by_module, _ = model_eigenvalues(model, nn.MSELoss(), X, Y, **kwargs)
    by_model, _ = model_eigenvalues(model, lambda m, d, t: F.mse_loss(m(d), t), X, Y, **kwargs)
    for vals in (by_output, by_module, by_model):
        assert_close(vals.abs(), top.reshape(1), 1e-9)
    # A loader of one batch with target omitted: the same matrix.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    by_loader, _ = model_eigenvalues(model, nn.MSELoss(), loader, **kwargs)
    assert_close(by_loader.abs(), top.reshape(1), 1e-9)


def test_loss_fn_that_fits_neither_convention_is_a_type_error_naming_it():
    model, _, X, Y, batches, _ = _case(2, [3])
    with pytest.raises(TypeError, match=r"loss_fn must take \(outputs, targets\)"):
        model_eigenvalues(model, lambda out: out.sum(), X, Y)
    with pytest.raises(TypeError, match=r"loss_fn takes \(model, data, target\).*pass target"):
        model_eigenvalues(model, lambda m, d, t: F.mse_loss(m(d), t), batches)
    with pytest.raises(TypeError, match=r"loss_fn takes \(model, data, target\)"):
        model_hessian_trace(model, lambda m, d, t: F.mse_loss(m(d), t), X, Y)
    with pytest.raises(ValueError, match="reduction= is for the data set form"):
        model_eigenvalues(model, F.mse_loss, X, Y, reduction="sum")


def test_a_plain_function_loss_over_several_batches_needs_its_reduction():
    model, _, X, Y, batches, H = _case(3, [2, 3])

    def mean_sq(out, y):
        return ((out - y) ** 2).mean()

    with pytest.raises(ValueError, match="reduction"):
        model_eigenvalues(model, mean_sq, batches)
    vals, _ = model_eigenvalues(model, mean_sq, batches, reduction="mean", tol=1e-12)
    assert_close(vals.abs(), torch.linalg.eigvalsh(H).abs().max().reshape(1), 1e-9)


def test_spectral_density_over_a_data_set_equals_slq_on_the_dense_matrix():
    model, loss_fn, X, Y, batches, H = _case(4, [2, 3, 1])
    n = H.shape[0]
    start = torch.randn(3, n, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    expected = stochastic_lanczos_quadrature(lambda V: V @ H, n, 6, 3, start=start.clone())
    for kwargs in (dict(data=batches), dict(inputs=X, targets=Y)):
        g = torch.Generator().manual_seed(0)
        got = model_spectral_density(
            model,
            loss_fn,
            num_steps=6,
            num_probes=3,
            generator=g,
            distribution="gaussian",
            **kwargs,
        )
        # The same start vectors: the generator draws them as randn does here.
        assert_close(got.nodes, expected.nodes, 1e-8)
        assert_close(got.weights, expected.weights, 1e-8)
    # The smoothed density integrates to 1.
    grid = got.grid(4000)
    assert abs(float(torch.trapezoid(got.density(grid), grid)) - 1.0) < 1e-6


def test_spectral_density_argument_errors():
    model, loss_fn, X, Y, batches, _ = _case(5, [2])
    with pytest.raises(TypeError, match="needs inputs and targets"):
        model_spectral_density(model, loss_fn, X)
    with pytest.raises(TypeError, match="not both"):
        model_spectral_density(model, loss_fn, X, Y, data=batches)
    with pytest.raises(TypeError, match="num_steps"):
        model_spectral_density(model, loss_fn, X, Y, num_steps=2.5)
