"""Eigensolvers against torch.linalg.eigvalsh of dense float64 matrices and Hessians."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian

import torch_secorder
from torch_secorder.analysis import (
    estimate_eigenvalues,
    lanczos,
    lanczos_iteration,
    model_eigenvalues,
    power_iteration,
)
from torch_secorder.analysis.eigensolvers import EigenInfo
from torch_secorder.linalg import lanczos_eigsh, ritz_pairs, subspace_iteration

DT = torch.float64


@functools.cache
def planted(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric A with eigenvalues 20, -15, 12, 9 and a bulk in [-1, 1] (and its spectrum)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    values = torch.cat(
        [torch.tensor([20.0, -15.0, 12.0, 9.0], dtype=DT), torch.rand(n - 4, generator=g) * 2 - 1]
    ).to(DT)
    A = (Q * values) @ Q.T
    return A, values.sort().values


def wanted(eigs: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LM":
        return eigs[torch.argsort(eigs.abs(), descending=True)][:k]
    if which == "LA":
        return eigs.flip(0)[:k]
    return eigs[:k]


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_lanczos_top3_on_planted_spectrum(which):
    A, eigs = planted()
    g = torch.Generator().manual_seed(1)
    for fn in (lanczos, lanczos_iteration):
        vals, vecs = fn(
            lambda v: A @ v, 300, 200, 3, 1e-10, "cpu", which=which, dtype=DT, generator=g
        )
        expected = wanted(eigs, 3, which)
        if which == "SA":
            # the bulk in [-1, 1] has no gap after -15: check the isolated one tightly
            torch.testing.assert_close(vals[0], expected[0], rtol=1e-8, atol=0)
            assert bool((vals[1:] >= -1).all() and (vals[1:] <= 1).all())
        else:
            torch.testing.assert_close(vals, expected, rtol=1e-8, atol=0)
        assert vecs.shape == (300, 3)
        torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=DT), atol=1e-10, rtol=0)
        residual = (A @ vecs - vecs * vals).norm(dim=0)
        assert bool((residual <= 1e-8 * vals.abs().clamp_min(1)).all())


def test_lanczos_stops_on_residuals_before_max_iter():
    A, eigs = planted()
    res = lanczos_eigsh(lambda V: V @ A, 300, 3, max_iter=300, tol=1e-8, dtype=DT)
    assert bool(res.converged.all())
    assert res.iterations < 120
    torch.testing.assert_close(res.eigenvalues, wanted(eigs, 3, "LM"), rtol=1e-8, atol=0)


def test_power_iteration_top3_and_shifted():
    A, eigs = planted()
    g = torch.Generator().manual_seed(2)
    vals, vecs = power_iteration(lambda V: A @ V, 300, 500, 3, 1e-10, "cpu", dtype=DT, generator=g)
    torch.testing.assert_close(vals, wanted(eigs, 3, "LM"), rtol=1e-8, atol=0)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=DT), atol=1e-10, rtol=0)
    for which in ("LA", "SA"):
        vals, _ = power_iteration(
            lambda V: A @ V, 300, 2000, 1, 1e-10, "cpu", which=which, dtype=DT, generator=g
        )
        torch.testing.assert_close(vals, wanted(eigs, 1, which), rtol=1e-8, atol=0)


def test_repeated_eigenvalues_are_found_by_both_solvers():
    A = torch.diag(torch.tensor([5.0, 5.0, 1.0, 0.5, 0.25], dtype=DT))
    g = torch.Generator().manual_seed(0)
    res = lanczos_eigsh(lambda V: V @ A, 5, 3, dtype=DT, generator=g, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0, 1.0], dtype=DT))
    res = subspace_iteration(lambda V: V @ A, 5, 2, dtype=DT, generator=g, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0], dtype=DT))


def test_ritz_pairs_of_a_tridiagonal():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    b = torch.tensor([0.5, 0.25, 0.1], dtype=DT)
    T = torch.diag(a) + torch.diag(b[:2], 1) + torch.diag(b[:2], -1)
    theta, S, res = ritz_pairs(a, b, 3, "LA")
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(T).flip(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res, (0.1 * S[-1]).abs())


def mlp(seed: int, d_in: int, hidden: int, d_out: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(batch, d_in, generator=g, dtype=DT)
    y = torch.randn(batch, d_out, generator=g, dtype=DT)
    return model, x, y


def dense_hessian(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = sum(p.numel() for p in params.values())

    def loss(p):
        return nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    H = hessian(loss)(params)
    names = list(params)
    rows = [torch.cat([H[a][b].reshape(params[a].numel(), -1) for b in names], 1) for a in names]
    return torch.cat(rows, 0).reshape(n, n)


def loss_of_model(m, data, target):
    return nn.functional.mse_loss(m(data), target)


@settings(max_examples=5, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 3),
    st.integers(2, 4),
    st.integers(1, 3),
    st.sampled_from(["LM", "LA", "SA"]),
)
def test_model_eigenvalues_against_dense_hessian(seed, d_in, hidden, d_out, which):
    model, x, y = mlp(seed, d_in, hidden, d_out, 5)
    H = dense_hessian(model, x, y)
    eigs = torch.linalg.eigvalsh(H)
    n = H.shape[0]
    k = min(3, n)
    g = torch.Generator().manual_seed(seed)
    vals, vecs = model_eigenvalues(
        model, loss_of_model, x, y, k, "lanczos", n, 1e-10, which=which, generator=g
    )
    scale = float(eigs.abs().max())
    torch.testing.assert_close(vals, wanted(eigs, k, which), rtol=0, atol=1e-8 * scale)
    assert len(vecs) == k
    for val, vec in zip(vals, vecs, strict=True):
        assert [t.shape for t in vec] == [p.shape for p in model.parameters()]
        v = torch.cat([t.reshape(-1) for t in vec])
        torch.testing.assert_close(H @ v, val * v, rtol=0, atol=1e-7 * scale)


def test_model_eigenvalues_power_iteration_and_alias_keep_state():
    model, x, y = mlp(7, 3, 5, 2, 8)
    H = dense_hessian(model, x, y)
    eigs = torch.linalg.eigvalsh(H)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    g = torch.Generator().manual_seed(0)
    vals, vecs = estimate_eigenvalues(
        model, loss_of_model, x, y, 1, "POWER_ITERATION", 3000, 1e-11, generator=g
    )
    torch.testing.assert_close(vals, wanted(eigs, 1, "LM"), rtol=1e-8, atol=0)
    assert torch_secorder.estimate_eigenvalues is torch_secorder.model_eigenvalues
    assert model.training
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, torch.full_like(p, 3.0))


def test_frozen_parameters_have_zero_eigenvector_entries():
    model, x, y = mlp(3, 2, 3, 2, 4)
    model[0].weight.requires_grad_(False)
    vals, vecs = model_eigenvalues(model, loss_of_model, x, y, 2, num_iterations=50, tol=1e-10)
    assert torch.equal(vecs[0][0], torch.zeros_like(vecs[0][0]))
    assert not model[0].weight.requires_grad


def test_bad_input():
    model, x, y = mlp(0, 2, 3, 1, 4)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_eigenvalues(lambda z: z, loss_of_model, x, y)
    with pytest.raises(ValueError, match="method must be one of"):
        model_eigenvalues(model, loss_of_model, x, y, method="arnoldi")
    with pytest.raises(ValueError, match="which must be one of"):
        model_eigenvalues(model, loss_of_model, x, y, which="BE")
    with pytest.raises(ValueError, match="num_eigenvalues"):
        model_eigenvalues(model, loss_of_model, x, y, 0)
    with pytest.raises(ValueError, match=r"\[1, dim=3\]"):
        lanczos(lambda v: v, 3, num_vectors=4, device="cpu")
    with pytest.raises(ValueError, match="matmat must map"):
        lanczos(lambda v: v[:2], 3, device="cpu")
    with pytest.raises(ValueError, match="matmat must map"):
        power_iteration(lambda V: V[:2], 3, device="cpu")
    with pytest.raises(TypeError, match="matrix_vector_product must be callable"):
        power_iteration("A", 3, device="cpu")
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        lanczos_eigsh(lambda V: V, 0)


def test_return_info_carries_true_residuals_and_flags():
    """``return_info=True``: residuals equal ``||A y - theta y||``, flags match tol, counts."""
    A, eigs = planted()
    calls = []

    def product(v):
        calls.append(v.shape[-1] if v.ndim == 2 else 1)
        return A @ v

    for fn in (lanczos, power_iteration):
        calls.clear()
        vals, vecs, info = fn(
            product,
            300,
            2000,
            3,
            1e-10,
            "cpu",
            dtype=DT,
            generator=torch.Generator(),
            return_info=True,
        )
        assert isinstance(info, EigenInfo)
        torch.testing.assert_close(
            info.residuals, (A @ vecs - vecs * vals).norm(dim=0), rtol=1e-6, atol=1e-13
        )
        assert bool(info.converged.all())
        assert bool((info.residuals <= 1e-10 * vals.abs()).all())
        assert info.matvecs == sum(calls)
        torch.testing.assert_close(vals, wanted(eigs, 3, "LM"), rtol=1e-8, atol=0)


def test_unconverged_runs_say_so():
    A, _ = planted()
    with pytest.warns(RuntimeWarning, match="did not reach the relative residual"):
        vals, vecs = lanczos(lambda v: A @ v, 300, 5, 3, 1e-10, "cpu", dtype=DT)
    assert vals.shape == (3,)
    vals, vecs, info = lanczos(lambda v: A @ v, 300, 5, 3, 1e-10, "cpu", dtype=DT, return_info=True)
    assert not bool(info.converged.all()) and info.matvecs == 5
    torch.testing.assert_close(
        info.residuals, (A @ vecs - vecs * vals).norm(dim=0), rtol=1e-6, atol=1e-13
    )
    with pytest.warns(RuntimeWarning, match="power_iteration: .* did not reach"):
        power_iteration(lambda V: A @ V, 300, 2, 2, 1e-10, "cpu", dtype=DT)


@pytest.mark.parametrize("method", ["lanczos", "power_iteration"])
def test_model_eigenvalues_return_info_against_dense_hessian(method):
    model, x, y = mlp(11, 3, 4, 2, 6)
    H = dense_hessian(model, x, y)
    eigs = torch.linalg.eigvalsh(H)
    vals, vecs, info = model_eigenvalues(
        model,
        loss_of_model,
        x,
        y,
        2,
        method,
        3000,
        1e-10,
        which="LA",
        generator=torch.Generator().manual_seed(0),
        return_info=True,
    )
    torch.testing.assert_close(vals, wanted(eigs, 2, "LA"), rtol=1e-8, atol=1e-12)
    flat = [torch.cat([t.reshape(-1) for t in vec]) for vec in vecs]
    true = torch.stack([(H @ v - val * v).norm() for val, v in zip(vals, flat, strict=True)])
    torch.testing.assert_close(info.residuals, true, rtol=1e-5, atol=1e-12)
    assert bool(info.converged.all()) and info.matvecs > 0
    # too few products: flags false, and the warning without return_info
    _, _, info = model_eigenvalues(
        model, loss_of_model, x, y, 2, method, 2, 1e-12, which="LA", return_info=True
    )
    assert not bool(info.converged.all())
    with pytest.warns(RuntimeWarning, match="did not reach"):
        model_eigenvalues(model, loss_of_model, x, y, 2, method, 2, 1e-12, which="LA")


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["LA", "SA"]))
def test_model_eigenvalues_on_the_eigenvalue_criterion(seed, which):
    """``criterion="eigenvalue"``: the eigenvalues to tol (relative) against the dense Hessian."""
    model, x, y = mlp(seed, 4, 6, 3, 12)
    H = dense_hessian(model, x, y)
    eigs = torch.linalg.eigvalsh(H)
    n = H.shape[0]
    vals, _, info = model_eigenvalues(
        model,
        loss_of_model,
        x,
        y,
        2,
        "lanczos",
        10 * n,
        1e-9,
        which=which,
        generator=torch.Generator().manual_seed(seed),
        return_info=True,
        criterion="eigenvalue",
    )
    assert bool(info.converged.all())
    expected = wanted(eigs, 2, which)
    scale = float(eigs.abs().max())
    torch.testing.assert_close(vals, expected, rtol=1e-9, atol=1e-12 * scale)


def test_eigenvalue_criterion_in_lanczos_and_its_errors():
    A, eigs = planted()
    vals, _, on_value = lanczos(
        lambda v: A @ v,
        300,
        300,
        2,
        1e-10,
        "cpu",
        dtype=DT,
        return_info=True,
        criterion="eigenvalue",
        generator=torch.Generator().manual_seed(0),
    )
    _, _, on_residual = lanczos(
        lambda v: A @ v,
        300,
        300,
        2,
        1e-10,
        "cpu",
        dtype=DT,
        return_info=True,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(vals, wanted(eigs, 2, "LM"), rtol=1e-10, atol=0)
    assert on_value.matvecs < on_residual.matvecs
    with pytest.warns(RuntimeWarning, match="relative eigenvalue error"):
        lanczos(lambda v: A @ v, 300, 4, 2, 1e-10, "cpu", dtype=DT, criterion="eigenvalue")
    model, x, y = mlp(0, 2, 3, 1, 4)
    with pytest.raises(ValueError, match="criterion must be one of"):
        model_eigenvalues(model, loss_of_model, x, y, criterion="value")
    with pytest.raises(ValueError, match="needs method='lanczos'"):
        model_eigenvalues(
            model, loss_of_model, x, y, method="power_iteration", criterion="eigenvalue"
        )
