"""Stochastic Lanczos quadrature and the CG / MINRES solvers against dense float64 oracles.

Oracles: ``torch.linalg.eigh`` / ``eigvalsh`` of dense matrices (and of the dense
Hessian from ``torch.func.hessian`` through ``conftest.dense_hessian``), and
``torch.linalg.solve``.  Statistical tests use fixed seeds and state their
false-alarm rate under the estimator's own (normal) sampling distribution.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import dense_hessian, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from torch_secorder.func import hessian_matmat
from torch_secorder.linalg import (
    SolveResult,
    SpectralDensity,
    conjugate_gradient,
    minres,
    stochastic_lanczos_quadrature,
)

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sym_with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    n = eigenvalues.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    A = (Q * eigenvalues) @ Q.T
    return (A + A.T) / 2


def matmat_of(A: torch.Tensor):
    return lambda V: V @ A


@pytest.fixture(scope="module")
def mixed_spectrum():
    """n = 200: a bulk of 150 eigenvalues around 0 and 50 outliers in [3, 5]."""
    g = gen(1)
    ev = torch.cat(
        [
            0.5 * torch.randn(150, generator=g, dtype=DT),
            3 + 2 * torch.rand(50, generator=g, dtype=DT),
        ]
    )
    return sym_with_spectrum(ev, 2), ev.sort().values


@pytest.fixture(scope="module")
def mixed_density(mixed_spectrum):
    A, _ = mixed_spectrum
    return stochastic_lanczos_quadrature(
        matmat_of(A), 200, 40, 100, generator=gen(3), dtype=DT, progress=False
    )


# ----------------------------------------------------------------------------- SLQ


def test_slq_weights_sum_to_one_and_nodes_in_spectrum(mixed_spectrum, mixed_density):
    _, ev = mixed_spectrum
    res = mixed_density
    assert isinstance(res, SpectralDensity)
    assert res.nodes.shape == res.weights.shape == (100, 40)
    assert bool((res.weights >= 0).all())
    torch.testing.assert_close(res.weights.sum(1), torch.ones(100, dtype=DT), rtol=0, atol=1e-12)
    # Ritz values of a symmetric matrix lie in [lambda_min, lambda_max] (Cauchy interlacing)
    scale = float(ev.abs().max())
    assert float(res.nodes.min()) >= float(ev[0]) - 1e-10 * scale
    assert float(res.nodes.max()) <= float(ev[-1]) + 1e-10 * scale
    assert bool((res.nodes[:, 1:] >= res.nodes[:, :-1]).all())
    assert res.matvecs == 100 * 40
    assert res.steps.tolist() == [40] * 100


def test_slq_density_integrates_to_one(mixed_density):
    res = mixed_density
    for sigma in (None, 0.05, 0.5):
        grid = res.grid(1000, sigma)
        total = torch.trapezoid(res.density(grid, sigma), grid)
        assert abs(float(total) - 1.0) < 1e-6
    # a wide grid of the user's, too
    grid = torch.linspace(-20, 20, 4001, dtype=DT)
    assert abs(float(torch.trapezoid(res.density(grid, 0.1), grid)) - 1.0) < 1e-9


def test_slq_density_matches_eigenvalue_distribution(mixed_spectrum, mixed_density):
    """Kolmogorov-Smirnov distance between the SLQ and the true spectral distributions.

    n = 200, m = 40 steps, 100 probes.  Two error sources: each probe's Gauss rule
    differs from its own spectral measure by at most the largest weight next to a
    point (Chebyshev-Markov-Stieltjes), of order 1/m, and the probe measures
    fluctuate around the true distribution by about 1/sqrt(n * probes).  Bounds:
    0.06 for the quadrature CDF, 0.035 for the integral of the smoothed density
    (sigma = 1% of the range), measured 0.041 and 0.019 at these seeds.
    """
    _, ev = mixed_spectrum
    res = mixed_density

    def true_cdf(t):
        return (ev[None, :] <= t[:, None]).to(DT).mean(1)

    # the sup of |F_hat - F| over the jump points of both step functions
    eps = 1e-9
    points = torch.cat([ev, ev - eps, res.nodes.reshape(-1), res.nodes.reshape(-1) - eps])
    assert float((res.cdf(points) - true_cdf(points)).abs().max()) < 0.06

    grid = res.grid(2000)
    smoothed_cdf = torch.cumulative_trapezoid(res.density(grid), grid)
    assert float((smoothed_cdf - true_cdf(grid[1:])).abs().max()) < 0.035


def test_slq_density_formula_and_default_sigma(mixed_density):
    res = mixed_density
    nodes, weights = res.nodes.reshape(-1), res.weights.reshape(-1)
    sigma = 0.01 * float(nodes.max() - nodes.min())
    assert res.default_sigma() == pytest.approx(sigma, rel=1e-14)
    t = torch.tensor([-1.0, 0.0, 0.3, 4.0], dtype=DT)
    expected = [
        float((weights * torch.exp(-0.5 * ((ti - nodes) / sigma) ** 2)).sum())
        / (100 * math.sqrt(2 * math.pi) * sigma)
        for ti in t
    ]
    torch.testing.assert_close(res.density(t), torch.tensor(expected, dtype=DT), rtol=1e-12, atol=0)


def test_slq_gauss_quadrature_exact_per_probe():
    """n sum_j w_j theta_j^k == n v^T A^k v for k <= 2m - 1 (m = 4 steps)."""
    n, m = 40, 4
    A = sym_with_spectrum(torch.linspace(-1, 1, n, dtype=DT), 5)
    start = torch.randn(6, n, generator=gen(6), dtype=DT)
    res = stochastic_lanczos_quadrature(matmat_of(A), n, m, 6, start=start, progress=False)
    v = start / start.norm(dim=1, keepdim=True)
    Ak = torch.eye(n, dtype=DT)
    for k in range(2 * m):
        exact = n * ((v @ Ak) * v).sum(1)
        torch.testing.assert_close(
            res.trace_samples(lambda t, k=k: t**k), exact, rtol=1e-10, atol=1e-10
        )
        Ak = Ak @ A
    # degree 2m is not exact in general
    exact = n * ((v @ Ak) * v).sum(1)
    assert float((res.trace_samples(lambda t: t ** (2 * m)) - exact).abs().max()) > 1e-6


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_slq_moments_unbiased(distribution):
    """E[n v^T A^k v] = tr(A^k): z-test of the estimates of k = 1, 2, 3 over 3000 probes.

    With m = 2 steps the rule is exact up to degree 3, so each sample is
    n v^T A^k v.  Each |z| < 4 fails by chance with probability 6e-5 (normal
    approximation of a mean of 3000 i.i.d. samples): 2e-4 for the three.
    """
    n = 30
    A = sym_with_spectrum(torch.randn(n, generator=gen(7), dtype=DT), 8)
    res = stochastic_lanczos_quadrature(
        matmat_of(A),
        n,
        2,
        3000,
        distribution=distribution,
        generator=gen(9),
        dtype=DT,
        progress=False,
    )
    Ak = torch.eye(n, dtype=DT)
    for k in (1, 2, 3):
        Ak = Ak @ A
        est = res.trace_estimate(lambda t, k=k: t**k)
        z = (float(est.estimate) - float(torch.trace(Ak))) / float(est.std_error)
        assert abs(z) < 4.0, (k, z)
    est = res.trace_estimate()
    assert est.matvecs == res.matvecs == 3000 * 2
    assert float(est.estimate) == pytest.approx(float(res.trace_samples().mean()), rel=1e-14)
    one = stochastic_lanczos_quadrature(
        matmat_of(A), n, 2, 1, generator=gen(9), dtype=DT, progress=False
    )
    assert one.trace_estimate().std_error is None
    moments = res.moments(3)
    assert float(moments[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(moments[1]) == pytest.approx(float(res.trace_estimate().estimate) / n, rel=1e-12)


def test_slq_few_distinct_eigenvalues_recovered_exactly():
    """Three distinct eigenvalues: every probe breaks down after 3 steps, exactly."""
    n = 30
    ev = torch.tensor([-1.0] * 10 + [2.0] * 15 + [5.0] * 5, dtype=DT)
    g = gen(10)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * ev) @ Q.T
    A = (A + A.T) / 2
    start = torch.randn(4, n, generator=g, dtype=DT)
    res = stochastic_lanczos_quadrature(matmat_of(A), n, 10, 4, start=start, progress=False)
    assert res.steps.tolist() == [3, 3, 3, 3]
    assert res.matvecs == 12
    torch.testing.assert_close(
        res.nodes[:, :3], torch.tensor([[-1.0, 2.0, 5.0]] * 4, dtype=DT), rtol=0, atol=1e-12
    )
    # weight of an eigenvalue = squared norm of the projection of v on its eigenspace
    v = start / start.norm(dim=1, keepdim=True)
    coef = (v @ Q) ** 2
    expected = torch.stack([coef[:, :10].sum(1), coef[:, 10:25].sum(1), coef[:, 25:].sum(1)], 1)
    torch.testing.assert_close(res.weights[:, :3], expected, rtol=0, atol=1e-12)
    assert bool((res.weights[:, 3:] == 0).all())
    assert bool((res.nodes[:, 3:] == res.nodes[:, 2:3]).all())
    # after breakdown the rule is exact for every function
    exact = n * ((v @ torch.linalg.matrix_exp(A)) * v).sum(1)
    torch.testing.assert_close(res.trace_samples(torch.exp), exact, rtol=1e-12, atol=0)


def test_slq_breakdown_in_part_of_the_batch():
    """Probes that break down stop; the others run on, one product per active probe."""
    n = 12
    A = torch.diag(torch.arange(1.0, n + 1, dtype=DT))
    start = torch.randn(3, n, generator=gen(11), dtype=DT)
    start[1] = 0.0
    start[1, :2] = 1.0  # Krylov space of dimension 2
    res = stochastic_lanczos_quadrature(matmat_of(A), n, 6, 3, start=start, progress=False)
    assert res.steps.tolist() == [6, 2, 6]
    assert res.matvecs == 14
    torch.testing.assert_close(
        res.nodes[1, :2], torch.tensor([1.0, 2.0], dtype=DT), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        res.weights[1], torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=DT), rtol=0, atol=1e-12
    )
    alone = stochastic_lanczos_quadrature(matmat_of(A), n, 6, 1, start=start[:1], progress=False)
    torch.testing.assert_close(res.nodes[0], alone.nodes[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(res.weights[0], alone.weights[0], rtol=0, atol=1e-12)


def test_slq_chunks_and_no_reorthogonalisation(mixed_spectrum):
    A, _ = mixed_spectrum
    start = torch.randn(7, 200, generator=gen(12), dtype=DT)
    full = stochastic_lanczos_quadrature(matmat_of(A), 200, 15, 7, start=start, progress=False)
    chunked = stochastic_lanczos_quadrature(
        matmat_of(A), 200, 15, 7, start=start, chunk_size=3, progress=False
    )
    torch.testing.assert_close(chunked.nodes, full.nodes, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked.weights, full.weights, rtol=0, atol=1e-10)
    assert chunked.matvecs == full.matvecs == 7 * 15
    plain = stochastic_lanczos_quadrature(
        matmat_of(A), 200, 15, 7, start=start, reorthogonalize=False, progress=False
    )
    torch.testing.assert_close(plain.weights.sum(1), torch.ones(7, dtype=DT), rtol=0, atol=1e-12)
    # low moments do not depend on the (lost) orthogonality of late vectors
    torch.testing.assert_close(plain.moments(3), full.moments(3), rtol=1e-8, atol=1e-10)


def test_slq_seeded_and_float32():
    A = sym_with_spectrum(torch.linspace(0, 1, 50, dtype=DT), 13)
    a = stochastic_lanczos_quadrature(
        matmat_of(A), 50, 8, 3, generator=gen(14), dtype=DT, progress=False
    )
    b = stochastic_lanczos_quadrature(
        matmat_of(A), 50, 8, 3, generator=gen(14), dtype=DT, progress=False
    )
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    A32 = A.float()
    c = stochastic_lanczos_quadrature(matmat_of(A32), 50, 8, 3, generator=gen(14), progress=False)
    assert c.nodes.dtype == torch.float32
    torch.testing.assert_close(c.nodes.double(), a.nodes, rtol=0, atol=1e-4)


def small_model_problem():
    model = make_mlp([3, 4, 2], "tanh", seed=20)
    g = gen(21)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, 2, generator=g, dtype=DT)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    return f, params


def test_slq_on_a_model_hessian():
    f, params = small_model_problem()
    H = dense_hessian(f, params)
    n = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    start = torch.randn(3, n, generator=gen(22), dtype=DT)
    res = stochastic_lanczos_quadrature(
        hessian_matmat(f, params), n, n, 3, start=start, progress=False
    )
    scale = float(ev.abs().max())
    for row in range(3):
        k = int(res.steps[row])
        assert abs(float(res.nodes[row, 0]) - float(ev[0])) < 1e-8 * scale
        assert abs(float(res.nodes[row, k - 1]) - float(ev[-1])) < 1e-8 * scale
    # n steps on an n x n matrix: each probe's rule is exact for every function
    v = start / start.norm(dim=1, keepdim=True)
    for fn, dense in ((lambda t: t, H), (lambda t: t**2, H @ H)):
        exact = n * ((v @ dense) * v).sum(1)
        torch.testing.assert_close(res.trace_samples(fn), exact, rtol=1e-8, atol=1e-10 * scale)


def test_slq_bad_input():
    A = torch.eye(4, dtype=DT)
    mm = matmat_of(A)
    with pytest.raises(TypeError, match="matmat"):
        stochastic_lanczos_quadrature(A, 4)
    with pytest.raises(ValueError, match="dim"):
        stochastic_lanczos_quadrature(mm, 0)
    with pytest.raises(TypeError, match="dim"):
        stochastic_lanczos_quadrature(mm, 4.0)
    with pytest.raises(ValueError, match="num_steps"):
        stochastic_lanczos_quadrature(mm, 4, 0)
    with pytest.raises(TypeError, match="num_probes"):
        stochastic_lanczos_quadrature(mm, 4, 2, True)
    with pytest.raises(ValueError, match="chunk_size"):
        stochastic_lanczos_quadrature(mm, 4, chunk_size=0)
    with pytest.raises(ValueError, match="distribution"):
        stochastic_lanczos_quadrature(mm, 4, distribution="sparse_rademacher")
    with pytest.raises(TypeError, match="dtype"):
        stochastic_lanczos_quadrature(mm, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="start"):
        stochastic_lanczos_quadrature(mm, 4, 2, 2, start=torch.ones(3, 4, dtype=DT))
    with pytest.raises(ValueError, match="start"):
        stochastic_lanczos_quadrature(mm, 4, 2, 2, start=torch.zeros(2, 4, dtype=DT))
    with pytest.raises(TypeError, match="start"):
        stochastic_lanczos_quadrature(mm, 4, 2, 2, start=[[1.0] * 4] * 2)
    with pytest.raises(ValueError, match="matmat must map"):
        stochastic_lanczos_quadrature(lambda V: V[:, :2], 4, dtype=DT, progress=False)
    with pytest.raises(ValueError, match="nan or inf"):
        stochastic_lanczos_quadrature(lambda V: V / 0.0, 4, dtype=DT, progress=False)
    res = stochastic_lanczos_quadrature(mm, 4, 2, 2, dtype=DT, progress=False)
    with pytest.raises(TypeError, match="grid"):
        res.density([0.0, 1.0])
    with pytest.raises(ValueError, match="grid"):
        res.density(torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="sigma"):
        res.density(torch.zeros(2, dtype=DT), sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        res.density(torch.zeros(2, dtype=DT), sigma=float("nan"))
    with pytest.raises(TypeError, match="sigma"):
        res.density(torch.zeros(2, dtype=DT), sigma="wide")
    with pytest.raises(ValueError, match="num_points"):
        res.grid(0)
    with pytest.raises(ValueError, match="max_degree"):
        res.moments(-1)
    with pytest.raises(ValueError, match="f must map"):
        res.trace_estimate(lambda t: t.sum())


def test_slq_identity_matrix_default_sigma():
    """All nodes equal (A = 3 I): the density is one Gaussian at 3 of width 0.03."""
    A = 3 * torch.eye(5, dtype=DT)
    res = stochastic_lanczos_quadrature(
        matmat_of(A), 5, 3, 2, generator=gen(0), dtype=DT, progress=False
    )
    assert res.steps.tolist() == [1, 1]
    assert res.default_sigma() == pytest.approx(0.03)
    grid = res.grid(3001)
    assert float(torch.trapezoid(res.density(grid), grid)) == pytest.approx(1.0, abs=1e-8)
    assert float(res.trace_estimate().estimate) == pytest.approx(15.0, rel=1e-14)


# --------------------------------------------------------------------------- solvers


def spd(n: int, cond: float, seed: int) -> torch.Tensor:
    return sym_with_spectrum(torch.logspace(0, math.log10(cond), n, dtype=DT), seed)


def true_residuals(A, damping, B, X):
    K = A + damping * torch.eye(A.shape[0], dtype=A.dtype)
    return (B - X @ K).norm(dim=-1)


@pytest.mark.parametrize("damping", [0.0, 0.7])
def test_cg_solves_spd_to_the_requested_residual(damping):
    n = 60
    A = spd(n, 1e3, 30)
    b = torch.randn(n, generator=gen(31), dtype=DT)
    res = conjugate_gradient(matmat_of(A), b, damping=damping, rtol=1e-10, progress=False)
    assert isinstance(res, SolveResult)
    assert res.x.shape == (n,) and res.converged.shape == () and bool(res.converged)
    assert float(true_residuals(A, damping, b, res.x)) <= 1e-10 * float(b.norm())
    expected = torch.linalg.solve(A + damping * torch.eye(n, dtype=DT), b)
    torch.testing.assert_close(res.x, expected, rtol=1e-6, atol=1e-9)
    assert res.residual_norms.shape == (int(res.iterations) + 1,)
    assert float(res.residual_norms[0]) == pytest.approx(float(b.norm()), rel=1e-14)
    assert float(res.residual_norms[-1]) <= 1e-10 * float(b.norm())
    assert res.matvecs >= int(res.iterations) + 1  # the final residual check


def test_cg_damping_makes_a_singular_psd_system_solvable():
    n = 40
    ev = torch.cat([torch.zeros(10, dtype=DT), torch.linspace(1, 5, 30, dtype=DT)])
    A = sym_with_spectrum(ev, 32)
    b = torch.randn(n, generator=gen(33), dtype=DT)
    res = conjugate_gradient(matmat_of(A), b, damping=1e-2, rtol=1e-12, progress=False)
    assert bool(res.converged)
    torch.testing.assert_close(
        res.x, torch.linalg.solve(A + 1e-2 * torch.eye(n, dtype=DT), b), rtol=1e-8, atol=1e-8
    )


def test_cg_rejects_an_indefinite_operator():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    with pytest.raises(ValueError, match="positive definite.*minres"):
        conjugate_gradient(matmat_of(A), torch.ones(3, dtype=DT), progress=False)
    # damping that makes it definite
    res = conjugate_gradient(
        matmat_of(A), torch.ones(3, dtype=DT), damping=3.0, rtol=1e-12, progress=False
    )
    torch.testing.assert_close(
        res.x, 1 / torch.tensor([4.0, 1.0, 6.0], dtype=DT), rtol=1e-10, atol=0
    )


def test_cg_preconditioners():
    n = 50
    g = gen(34)
    scales = torch.logspace(0, 4, n, dtype=DT)
    B0 = torch.randn(n, n, generator=g, dtype=DT) / n**0.5
    A = scales.sqrt()[:, None] * (torch.eye(n, dtype=DT) + B0 @ B0.T / 4) * scales.sqrt()[None, :]
    b = torch.randn(n, generator=g, dtype=DT)
    expected = torch.linalg.solve(A, b)
    plain = conjugate_gradient(matmat_of(A), b, rtol=1e-10, progress=False)
    jacobi = conjugate_gradient(
        matmat_of(A), b, rtol=1e-10, preconditioner=A.diagonal(), progress=False
    )
    assert bool(plain.converged) and bool(jacobi.converged)
    assert int(jacobi.iterations) < int(plain.iterations)
    torch.testing.assert_close(jacobi.x, expected, rtol=1e-6, atol=1e-12)
    Ainv = torch.linalg.inv(A)
    exact = conjugate_gradient(
        matmat_of(A), b, rtol=1e-10, preconditioner=lambda R: R @ Ainv, progress=False
    )
    assert int(exact.iterations) == 1
    torch.testing.assert_close(exact.x, expected, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("damping", [0.0, 0.3, -0.25])
def test_minres_solves_indefinite_systems(damping):
    n = 80
    ev = torch.cat([-torch.logspace(-1, 1, 30, dtype=DT), torch.logspace(-1, 1, 50, dtype=DT)])
    A = sym_with_spectrum(ev, 40)
    b = torch.randn(n, generator=gen(41), dtype=DT)
    res = minres(matmat_of(A), b, damping=damping, rtol=1e-10, progress=False)
    assert bool(res.converged)
    assert float(true_residuals(A, damping, b, res.x)) <= 1e-10 * float(b.norm())
    expected = torch.linalg.solve(A + damping * torch.eye(n, dtype=DT), b)
    torch.testing.assert_close(res.x, expected, rtol=1e-6, atol=1e-8)
    h = res.residual_norms
    assert h.shape == (int(res.iterations) + 1,)
    assert bool((h[1:] <= h[:-1]).all()), "MINRES residual history must not increase"


def test_minres_singular_consistent_system():
    """b in the range of a singular A: MINRES converges (CG would too on PSD, not here)."""
    n = 30
    ev = torch.cat(
        [
            torch.zeros(5, dtype=DT),
            torch.linspace(-3, -1, 10, dtype=DT),
            torch.linspace(1, 2, 15, dtype=DT),
        ]
    )
    A = sym_with_spectrum(ev, 42)
    b = A @ torch.randn(n, generator=gen(43), dtype=DT)
    res = minres(matmat_of(A), b, rtol=1e-11, progress=False)
    assert bool(res.converged)
    assert float(true_residuals(A, 0.0, b, res.x)) <= 1e-11 * float(b.norm())


@pytest.mark.parametrize("solver", [conjugate_gradient, minres])
def test_batch_matches_one_by_one(solver):
    n, k = 50, 4
    A = spd(n, 1e2, 50)
    B = torch.randn(k, n, generator=gen(51), dtype=DT)
    B[2] *= 1e-3  # a different scale: its own tolerance
    batch = solver(matmat_of(A), B, damping=0.1, rtol=1e-9, progress=False)
    assert (
        batch.x.shape == (k, n) and batch.converged.shape == (k,) and batch.iterations.shape == (k,)
    )
    assert batch.residual_norms.shape == (int(batch.iterations.max()) + 1, k)
    total = 0
    for i in range(k):
        one = solver(matmat_of(A), B[i], damping=0.1, rtol=1e-9, progress=False)
        torch.testing.assert_close(batch.x[i], one.x, rtol=1e-9, atol=1e-12)
        assert int(batch.iterations[i]) == int(one.iterations)
        assert bool(batch.converged[i]) and bool(one.converged)
        t = int(one.iterations)
        torch.testing.assert_close(
            batch.residual_norms[: t + 1, i], one.residual_norms, rtol=1e-6, atol=0
        )
        # a finished right-hand side keeps its last value
        assert bool((batch.residual_norms[t:, i] == batch.residual_norms[t, i]).all())
        total += one.matvecs
    assert batch.matvecs == total


@pytest.mark.parametrize("solver", [conjugate_gradient, minres])
def test_max_iter_respected_and_reported(solver):
    n = 60
    A = spd(n, 1e4, 60)
    B = torch.randn(2, n, generator=gen(61), dtype=DT)
    res = solver(matmat_of(A), B, rtol=1e-12, max_iter=5, progress=False)
    assert res.iterations.tolist() == [5, 5]
    assert res.converged.tolist() == [False, False]
    assert res.matvecs == 10
    assert res.residual_norms.shape == (6, 2)
    torch.testing.assert_close(
        res.residual_norms[-1], true_residuals(A, 0.0, B, res.x), rtol=1e-8, atol=0
    )
    zero = solver(matmat_of(A), B[0], max_iter=0, progress=False)
    assert int(zero.iterations) == 0 and not bool(zero.converged) and bool((zero.x == 0).all())


@pytest.mark.parametrize("solver", [conjugate_gradient, minres])
def test_trivial_starts(solver):
    n = 20
    A = spd(n, 10.0, 70)
    b = torch.randn(n, generator=gen(71), dtype=DT)
    x_star = torch.linalg.solve(A + 0.5 * torch.eye(n, dtype=DT), b)
    res = solver(matmat_of(A), b, damping=0.5, x0=x_star, rtol=1e-8, progress=False)
    assert int(res.iterations) == 0 and bool(res.converged) and res.matvecs == 1
    zero = solver(matmat_of(A), torch.zeros(n, dtype=DT), progress=False)
    assert bool(zero.converged) and int(zero.iterations) == 0 and zero.matvecs == 0
    assert bool((zero.x == 0).all())
    # atol: a tolerance that the start already meets
    loose = solver(matmat_of(A), 1e-9 * b, atol=1e-6, rtol=0.0, progress=False)
    assert bool(loose.converged) and int(loose.iterations) == 0


@pytest.mark.parametrize("solver", [conjugate_gradient, minres])
def test_recurrence_drift_is_caught_by_the_true_residual(solver):
    """A matmat that is wrong for its first 3 calls: the recurrence lies, the check restarts."""
    n = 30
    A = spd(n, 10.0, 80)
    b = torch.randn(n, generator=gen(81), dtype=DT)
    calls = [0]

    def drifting(V):
        calls[0] += 1
        return V @ (A * (1.05 if calls[0] <= 3 else 1.0))

    res = solver(drifting, b, rtol=1e-10, progress=False)
    assert bool(res.converged)
    assert float(true_residuals(A, 0.0, b, res.x)) <= 1e-10 * float(b.norm())
    assert res.matvecs > int(res.iterations) + 1  # at least one failed check and a restart


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 25),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    damping=st.floats(0.0, 2.0),
    indefinite=st.booleans(),
)
def test_solvers_random_systems(n, k, seed, damping, indefinite):
    g = gen(seed)
    ev = 0.1 + torch.rand(n, generator=g, dtype=DT) * 10
    if indefinite:
        ev = ev * torch.where(torch.rand(n, generator=g, dtype=DT) < 0.5, -1.0, 1.0)
    A = sym_with_spectrum(ev, seed + 1)
    B = torch.randn(k, n, generator=g, dtype=DT)
    solvers = [minres] if indefinite else [minres, conjugate_gradient]
    d = 0.0 if indefinite else damping  # a shift could make an indefinite system singular
    for solver in solvers:
        res = solver(matmat_of(A), B, damping=d, rtol=1e-10, progress=False)
        assert bool(res.converged.all())
        assert bool((true_residuals(A, d, B, res.x) <= 1e-10 * B.norm(dim=1)).all())


def test_solvers_on_a_model_hessian():
    f, params = small_model_problem()
    H = dense_hessian(f, params)
    n = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    assert float(ev[0]) < 0 < float(ev[-1])  # an indefinite Hessian: MINRES territory
    mm = hessian_matmat(f, params)
    B = torch.randn(2, n, generator=gen(90), dtype=DT)
    damping = 0.1
    res = minres(mm, B, damping=damping, rtol=1e-10, progress=False)
    expected = torch.linalg.solve(H + damping * torch.eye(n, dtype=DT), B.T).T
    assert bool(res.converged.all())
    cond = float(torch.linalg.cond(H + damping * torch.eye(n, dtype=DT)))
    torch.testing.assert_close(res.x, expected, rtol=10 * cond * 1e-10, atol=1e-12)
    # CG with damping past the most negative eigenvalue (influence functions / Newton-CG)
    shift = 1.0 - float(ev[0])
    res = conjugate_gradient(mm, B, damping=shift, rtol=1e-12, progress=False)
    expected = torch.linalg.solve(H + shift * torch.eye(n, dtype=DT), B.T).T
    assert bool(res.converged.all())
    torch.testing.assert_close(res.x, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", [conjugate_gradient, minres])
def test_solver_bad_input(solver):
    A = torch.eye(3, dtype=DT)
    mm = matmat_of(A)
    b = torch.ones(3, dtype=DT)
    with pytest.raises(TypeError, match="matmat"):
        solver(A, b)
    with pytest.raises(TypeError, match="b must be a tensor"):
        solver(mm, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="b must be a floating"):
        solver(mm, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="b must have shape"):
        solver(mm, torch.ones(1, 2, 3, dtype=DT))
    with pytest.raises(ValueError, match="b must be finite"):
        solver(mm, torch.tensor([1.0, float("nan"), 0.0], dtype=DT))
    with pytest.raises(TypeError, match="damping"):
        solver(mm, b, damping="0.1")
    with pytest.raises(ValueError, match="damping"):
        solver(mm, b, damping=float("inf"))
    with pytest.raises(ValueError, match="rtol"):
        solver(mm, b, rtol=-1e-3)
    with pytest.raises(ValueError, match="atol"):
        solver(mm, b, atol=float("nan"))
    with pytest.raises(TypeError, match="max_iter"):
        solver(mm, b, max_iter=2.5)
    with pytest.raises(ValueError, match="max_iter"):
        solver(mm, b, max_iter=-1)
    with pytest.raises(ValueError, match="x0 must have"):
        solver(mm, b, x0=torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="matmat must map"):
        solver(lambda V: V.sum(0), b, progress=False)
    with pytest.raises(ValueError, match="nan or inf"):
        solver(lambda V: V * float("nan"), b, progress=False)


def test_cg_bad_preconditioner():
    A = torch.eye(3, dtype=DT)
    b = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="preconditioner"):
        conjugate_gradient(matmat_of(A), b, preconditioner=torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="preconditioner"):
        conjugate_gradient(matmat_of(A), b, preconditioner=torch.tensor([1.0, 0.0, 1.0], dtype=DT))
    with pytest.raises(TypeError, match="preconditioner"):
        conjugate_gradient(matmat_of(A), b, preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner must be positive definite"):
        conjugate_gradient(matmat_of(A), b, preconditioner=lambda R: -R, progress=False)
    with pytest.raises(ValueError, match="preconditioner must map"):
        conjugate_gradient(matmat_of(A), b, preconditioner=lambda R: R[:, :2], progress=False)


def test_docs_page_example_runs():
    """The example of docs/spectral_density_and_solvers.rst runs and gives what it says."""
    page = Path(__file__).resolve().parents[1] / "docs" / "spectral_density_and_solvers.rst"
    block = re.search(r"\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", page.read_text())
    assert block is not None
    code = "\n".join(line[4:] for line in block.group(1).splitlines())
    scope: dict = {}
    exec(compile(code, str(page), "exec"), scope)
    grid, phi = scope["grid"], scope["phi"]
    assert abs(float(torch.trapezoid(phi, grid)) - 1.0) < 1e-4  # float32
    assert scope["dens"].nodes.shape == (10, 30)
    assert bool(scope["sol"].converged.all())
