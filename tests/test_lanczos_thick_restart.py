"""Thick-restart (block) Lanczos against torch.linalg.eigh of dense float64 matrices.

Every answer is checked against the oracle: the eigenvalues wanted by ``which`` from
``torch.linalg.eigh``, within the residual norm of the returned pairs (Kahan: for
orthonormal ``Y`` and ``R = A Y - Y diag(theta)``, ``k`` eigenvalues of ``A`` lie within
``||R||_2`` of the Ritz values); the reported residuals equal the recomputed
``||A y - theta y||``; the converged flags agree with the tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_secorder.errors import ShapeError
from torch_secorder.linalg import lanczos_eigsh
from torch_secorder.linalg.eigen import ROUNDING_FLOOR

DT = torch.float64
EPS = torch.finfo(DT).eps


def with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = values.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * values) @ Q.T
    return (A + A.T) / 2


def wanted(eigs: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LM":
        return eigs[torch.argsort(eigs.abs(), descending=True, stable=True)][:k]
    if which == "LA":
        return eigs.flip(0)[:k]
    return eigs[:k]


def tolerance_bound(theta: torch.Tensor, tol: float, anorm: float) -> torch.Tensor:
    relative = tol * theta.abs().clamp_min(math.sqrt(EPS) * anorm)
    return relative.clamp_min(ROUNDING_FLOOR * EPS * anorm)


def check_against_oracle(A, res, k, which, tol, may_stall=False):
    eigs = torch.linalg.eigvalsh(A)
    anorm = float(eigs.abs().max())
    Y, theta = res.eigenvectors, res.eigenvalues
    assert Y.shape == (k, A.shape[0]) and theta.shape == (k,)
    # the reported residuals are the true ones
    R = Y @ A - theta[:, None] * Y
    torch.testing.assert_close(res.residuals, R.norm(dim=1), rtol=0, atol=1e-13 * anorm)
    # orthonormal Ritz vectors
    torch.testing.assert_close(Y @ Y.T, torch.eye(k, dtype=DT), rtol=0, atol=1e-10)
    # converged flags are what the tolerance says (up to rounding at the boundary)
    b = tolerance_bound(theta, tol, anorm)
    clear = (res.residuals - b).abs() > 1e-3 * b
    assert torch.equal(res.converged[clear], (res.residuals <= b)[clear])
    if may_stall and not bool(res.converged.all()):
        return  # reported truthfully above; nothing more is promised
    assert bool(res.converged.all())
    # the wanted eigenvalues, within the residual (spectral norm <= Frobenius norm)
    slack = float(R.norm()) + 1e-12 * anorm
    got = theta.sort().values
    expected = wanted(eigs, k, which).sort().values
    if which == "LM":
        # ties in magnitude (lambda, -lambda) may pick either sign: compare magnitudes
        got, expected = theta.abs().sort().values, expected.abs().sort().values
    torch.testing.assert_close(got, expected, rtol=0, atol=slack)
    # each pair is an eigenpair to the tolerance
    assert bool((R.norm(dim=1) <= b * (1 + 1e-6)).all())


def spectra(draw, n: int, kind: str) -> tuple[torch.Tensor, int]:
    """Eigenvalues of the chosen kind and the largest multiplicity among them."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    base = (torch.rand(n, generator=g, dtype=DT) * 2 - 1) * scale
    if kind == "indefinite":
        return base, 1
    if kind == "clustered":
        centre = draw(st.sampled_from([-1.0, 0.5, 1.0])) * scale
        m = draw(st.integers(2, max(2, n // 2)))
        base[:m] = centre * (1 + 1e-4 * torch.arange(m, dtype=DT))
        return base, 1
    # degenerate: one value repeated ``mult`` times, possibly at the wanted end
    mult = draw(st.integers(2, min(4, n)))
    value = draw(st.sampled_from([1.5, -1.5, 0.0, 0.3])) * scale
    base[:mult] = value
    return base, mult


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["indefinite", "clustered", "degenerate"]))
    if n == 1:
        kind = "indefinite"
    values, mult = spectra(draw, n, kind)
    k = draw(st.integers(1, n))
    which = draw(st.sampled_from(["LA", "SA", "LM"]))
    block_size = draw(st.integers(mult, max(mult, 3)))
    # None: no restart for n <= 50; the other: a small basis, restarted thickly
    ncv = draw(st.sampled_from([None, k + 2 * block_size + 2]))
    seed = draw(st.integers(0, 2**31 - 1))
    return values, k, which, block_size, ncv, seed


@settings(max_examples=60, deadline=None)
@given(problems())
def test_eigenpairs_equal_eigh(problem):
    values, k, which, block_size, ncv, seed = problem
    A = with_spectrum(values, seed)
    n = A.shape[0]
    tol = 1e-9
    max_iter = 100 * n + 1000
    res = lanczos_eigsh(
        lambda V: V @ A,
        n,
        k,
        which=which,
        tol=tol,
        dtype=DT,
        generator=torch.Generator().manual_seed(seed),
        ncv=ncv,
        block_size=block_size,
        max_iter=max_iter,
    )
    # A small restarted basis can stall on a tight cluster (relative gaps 1e-4) before
    # tol: it must then say so, after using every product it was allowed.
    restarted = ncv is not None and ncv < n
    if not bool(res.converged.all()):
        assert restarted and res.iterations == max_iter
    check_against_oracle(A, res, k, which, tol, may_stall=restarted)


def hessian_like(n: int, seed: int = 0) -> torch.Tensor:
    """Outliers over a flat bulk concentrated near zero, both signs (as a Hessian)."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([50.0, 30, 20, 12, 8, 5, 3, 2, 1.5, 1.2, -0.5, -1, -1.5, -2], dtype=DT)
    bulk = 0.05 * torch.randn(n - len(outliers), generator=g, dtype=DT) ** 3
    return with_spectrum(torch.cat([outliers, bulk]), seed + 1)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_hessian_like_top_and_bottom(which, k):
    A = hessian_like(400)
    res = lanczos_eigsh(
        lambda V: V @ A, 400, k, which=which, tol=1e-9, dtype=DT, generator=torch.Generator()
    )
    check_against_oracle(A, res, k, which, 1e-9)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_restarts_with_a_small_basis(which):
    A = hessian_like(300, seed=3)
    res = lanczos_eigsh(lambda V: V @ A, 300, 4, which=which, tol=1e-10, dtype=DT, ncv=12)
    assert res.iterations > 12  # it did restart
    check_against_oracle(A, res, 4, which, 1e-10)


def test_block_size_finds_every_copy_of_a_repeated_eigenvalue():
    values = torch.cat([torch.full((3,), 7.0, dtype=DT), torch.linspace(-1, 1, 197, dtype=DT)])
    A = with_spectrum(values, 0)
    res = lanczos_eigsh(lambda V: V @ A, 200, 4, which="LA", tol=1e-10, dtype=DT, block_size=3)
    check_against_oracle(A, res, 4, "LA", 1e-10)
    torch.testing.assert_close(res.eigenvalues[:3], torch.full((3,), 7.0, dtype=DT))


def test_too_few_products_is_reported_not_converged():
    A = hessian_like(300, seed=5)
    res = lanczos_eigsh(lambda V: V @ A, 300, 5, which="SA", tol=1e-10, dtype=DT, max_iter=8)
    assert res.iterations == 8
    assert not bool(res.converged.all())
    # the residuals are still the true ones, and they say why
    R = res.eigenvectors @ A - res.eigenvalues[:, None] * res.eigenvectors
    torch.testing.assert_close(res.residuals, R.norm(dim=1), rtol=1e-10, atol=1e-13)
    anorm = float(torch.linalg.eigvalsh(A).abs().max())
    b = tolerance_bound(res.eigenvalues, 1e-10, anorm)
    assert torch.equal(res.converged, res.residuals <= b)


def test_block_start_vector_and_products_counted():
    A = hessian_like(100, seed=2)
    calls = []

    def matmat(V):
        calls.append(V.shape[0])
        return V @ A

    v0 = torch.randn(2, 100, generator=torch.Generator().manual_seed(0), dtype=DT)
    res = lanczos_eigsh(matmat, 100, 3, which="LA", tol=1e-10, v0=v0, block_size=2)
    assert max(calls) <= 2 and sum(calls) == res.iterations
    check_against_oracle(A, res, 3, "LA", 1e-10)


def test_bad_options():
    with pytest.raises(ValueError, match="ncv must be >= k \\+ 2 \\* block_size = 7"):
        lanczos_eigsh(lambda V: V, 50, 3, ncv=5, block_size=2)
    with pytest.raises(ValueError, match="block_size"):
        lanczos_eigsh(lambda V: V, 50, 3, block_size=0)
    with pytest.raises(ShapeError, match="v0 must have shape"):
        lanczos_eigsh(lambda V: V, 50, 3, v0=torch.ones(3, 50), block_size=2)
    with pytest.raises(ValueError, match="max_iter must be >= the number of eigenpairs"):
        lanczos_eigsh(lambda V: V, 50, 3, max_iter=2)


def eigsh_matvecs(A: torch.Tensor, k: int, which: str, tol: float, v0: torch.Tensor) -> int:
    from scipy.sparse.linalg import LinearOperator, eigsh

    An = A.numpy()
    calls = [0]

    def mv(x):
        calls[0] += 1
        return An @ x

    op = LinearOperator(A.shape, matvec=mv, dtype=np.float64)
    eigsh(op, k=k, which=which, tol=tol, v0=v0.numpy(), maxiter=10_000)
    return calls[0]


@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_fewer_products_than_scipy_eigsh(which, k):
    """Counts products (no timing): same matrix, start vector and tolerance."""
    A = hessian_like(500)
    v0 = torch.randn(500, generator=torch.Generator().manual_seed(1), dtype=DT)
    ours = lanczos_eigsh(lambda V: V @ A, 500, k, which=which, tol=1e-8, v0=v0)
    assert bool(ours.converged.all())
    assert ours.iterations < eigsh_matvecs(A, k, which, 1e-8, v0)


# ----------------------------------------------------------------- criterion="eigenvalue"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 120),
    which=st.sampled_from(["LA", "SA", "LM"]),
    k=st.integers(1, 4),
    gap=st.sampled_from([1e-2, 0.1, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_eigenvalue_criterion_meets_tol_on_the_eigenvalue(n, which, k, gap, seed):
    """Each returned eigenvalue within tol (relative) of the true one it stands for."""
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    # wanted end well separated by ``gap`` (relative), bulk below it
    bulk = torch.rand(n, generator=g, dtype=DT)
    values = torch.where(torch.arange(n) < k, 1 + gap * (1 + torch.arange(n, dtype=DT)), bulk)
    if which == "SA":
        values = -values
    A = with_spectrum(values, seed)
    tol = 1e-8
    res = lanczos_eigsh(
        lambda V: V @ A,
        n,
        k,
        which=which,
        tol=tol,
        dtype=DT,
        criterion="eigenvalue",
        generator=torch.Generator().manual_seed(seed),
        max_iter=50 * n,
    )
    assert bool(res.converged.all())
    expected = wanted(torch.linalg.eigvalsh(A), k, which)
    got = res.eigenvalues
    if which == "LM":
        got, expected = got.abs(), expected.abs()
    scale = expected.abs().clamp_min(math.sqrt(EPS) * float(values.abs().max()))
    assert bool(((got - expected).abs() <= tol * scale + 64 * EPS * values.abs().max()).all())
    # the reported residuals are the true ones
    R = res.eigenvectors @ A - res.eigenvalues[:, None] * res.eigenvectors
    torch.testing.assert_close(res.residuals, R.norm(dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalue_criterion_costs_fewer_products_than_the_residual(k):
    A = hessian_like(500)
    v0 = torch.randn(500, generator=torch.Generator().manual_seed(1), dtype=DT)
    on_value = lanczos_eigsh(
        lambda V: V @ A, 500, k, which="LA", tol=1e-8, v0=v0, criterion="eigenvalue"
    )
    on_residual = lanczos_eigsh(lambda V: V @ A, 500, k, which="LA", tol=1e-8, v0=v0)
    assert on_value.iterations < on_residual.iterations
    top = torch.linalg.eigvalsh(A).flip(0)[:k]
    assert bool(((on_value.eigenvalues - top).abs() <= 1e-8 * top.abs()).all())
    # ... and fewer than scipy's eigsh at its cheapest tolerance giving the same accuracy
    assert on_value.iterations < min(
        eigsh_matvecs(A, k, "LA", tol, v0)
        for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
        if scipy_eigenvalue_error(A, k, tol, v0) <= 1e-8
    )


def scipy_eigenvalue_error(A: torch.Tensor, k: int, tol: float, v0: torch.Tensor) -> float:
    from scipy.sparse.linalg import eigsh

    vals = eigsh(A.numpy(), k=k, which="LA", tol=tol, v0=v0.numpy(), return_eigenvectors=False)
    top = torch.linalg.eigvalsh(A).flip(0)[:k].numpy()
    return float(np.max(np.abs(np.sort(vals)[::-1] - top) / np.abs(top)))


def test_bad_criterion():
    with pytest.raises(ValueError, match="criterion must be one of"):
        lanczos_eigsh(lambda V: V, 5, 1, criterion="value")
