r"""Hutchinson's trace estimators: unbiased, honest error bars, exact on diagonal Hessians.

Statistical checks use non-asymptotic tail bounds, so each stated false-alarm rate is a
guarantee (no normal approximation), and every check that can fail by chance has rate
``DELTA = 1e-7``:

* Mean of ``m`` Rademacher (or sparse Rademacher) values :math:`X = v^\top H v`:
  Bernstein's inequality with the exact variance and a bound :math:`M \ge |X - \mu|`,
  :math:`P(|\bar X - \mu| \ge t) \le 2\exp\!\big(-m t^2 / (2\sigma^2 + 2Mt/3)\big)`.
  The Rademacher variance is :math:`2(\|H\|_F^2 - \sum_i H_{ii}^2)`; with the sparse
  probes of density ``p`` (entries :math:`\pm 1/\sqrt p`) it is
  :math:`(1/p - 1)\sum_i H_{ii}^2 + 2\sum_{i\ne j} H_{ij}^2`.  The checks are also
  reported as a z-score, :math:`z = (\bar X - \mu)/(\sigma/\sqrt m)`.
* Gaussian probes: :math:`X - \operatorname{tr} H = \sum_i \lambda_i (g_i^2 - 1)`, and the
  Laurent-Massart bound for weighted chi-squares, applied separately to the positive and
  the negative eigenvalues.
* The reported standard error :math:`s/\sqrt m`: the sample variance :math:`s^2` is a
  U-statistic with kernel :math:`(X_1 - X_2)^2/2`, whose variance is
  :math:`(\mu_4 + \sigma^4)/2`; Hoeffding's (1963) reduction gives Bernstein's bound with
  :math:`\lfloor m/2 \rfloor` terms.  The exact :math:`\sigma^2` and :math:`\mu_4` come from
  enumerating all :math:`2^n` Rademacher vectors (``n <= 12``).

Every test is seeded, so it is deterministic; the rate says how unlikely a correct
implementation is to fail for a seed chosen in advance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import (
    DTYPE,
    assert_close,
    dense_hessian,
    diagonal_problems,
    make_mlp,
    random_symmetric,
    smooth_problems,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import torch_secorder.func as sf
from torch_secorder.core import hvp as core_hvp
from torch_secorder.core.hessian_trace import (
    hessian_trace,
    hessian_trace_estimate,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.linalg.probes import draw_probes

#: False-alarm rate of every statistical check in this file.
DELTA = 1e-7
#: Probes per statistical check.
M = 4000
#: Density of the sparse probes of ``core.hvp.hessian_trace(sparse=True)``.
SPARSE_DENSITY = 0.1
STRATEGIES = ("vmap", "graph", "graph_batched")


# ------------------------------------------------------------------- tail bounds


def bernstein_radius(variance: float, bound: float, m: int, delta: float = DELTA) -> float:
    """``t`` with ``2 exp(-m t^2 / (2 variance + 2 bound t / 3)) = delta``."""
    L = math.log(2 / delta)
    b = 2 * bound * L / 3
    return (b + math.sqrt(b * b + 8 * m * variance * L)) / (2 * m)


def assert_mean_consistent(mean: float, exact: float, variance: float, bound: float, m: int):
    """Bernstein check of a mean of ``m`` iid values with known mean, variance and range."""
    radius = bernstein_radius(variance, bound, m)
    z = (mean - exact) / math.sqrt(variance / m)
    assert abs(mean - exact) <= radius, (
        f"estimate {mean} vs exact {exact}: |error| {abs(mean - exact):.4g} > {radius:.4g} "
        f"(z = {z:.2f}; false-alarm rate {DELTA})"
    )


def rademacher_law(H: torch.Tensor) -> dict[str, float]:
    """Exact law of ``v^T H v`` for uniform ``v`` in ``{-1, 1}^n``, by enumeration."""
    n = H.shape[0]
    assert n <= 12, "enumeration of 2^n sign vectors"
    V = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=H.dtype)
    values = ((V @ H) * V).sum(-1)
    mu = values.mean()
    centred = values - mu
    return {
        "mean": float(mu),
        "var": float((centred**2).mean()),
        "mu4": float((centred**4).mean()),
        "max_dev": float(centred.abs().max()),
        "range": float(values.max() - values.min()),
    }


def rademacher_variance(H: torch.Tensor) -> float:
    return float(2 * ((H**2).sum() - (torch.diagonal(H) ** 2).sum()))


def sparse_variance_and_bound(H: torch.Tensor, p: float) -> tuple[float, float]:
    """Variance of ``v^T H v`` with sparse probes, and a bound on ``|v^T H v - tr H|``."""
    d = torch.diagonal(H)
    off = H - torch.diag(d)
    variance = float((1 / p - 1) * (d**2).sum() + 2 * (off**2).sum())
    bound = float(max(1.0, 1 / p - 1) * d.abs().sum() + off.abs().sum() / p)
    return variance, bound


def assert_std_error_consistent(std_error: float, law: dict[str, float], m: int):
    """The reported ``s / sqrt(m)`` against the true ``sigma / sqrt(m)`` (U-statistic bound)."""
    s2 = std_error**2 * m
    sigma2 = law["var"]
    kernel_var = (law["mu4"] + sigma2**2) / 2
    kernel_bound = max(law["range"] ** 2 / 2 - sigma2, sigma2)
    radius = bernstein_radius(kernel_var, kernel_bound, m // 2)
    ratio = std_error / math.sqrt(sigma2 / m)
    assert abs(s2 - sigma2) <= radius, (
        f"sample variance {s2:.5g} vs exact {sigma2:.5g}: std_error / true std = {ratio:.4f}, "
        f"allowed [{math.sqrt(max(0, 1 - radius / sigma2)):.4f}, "
        f"{math.sqrt(1 + radius / sigma2):.4f}] (false-alarm rate {DELTA})"
    )


# -------------------------------------------------------------------- problems


def indefinite_quadratic(n: int = 12, shift: float = 3.0, seed: int = 0):
    """``0.5 x^T A x`` with ``A`` symmetric, indefinite, trace about ``n * shift``; two leaves."""
    g = torch.Generator().manual_seed(seed)
    A = random_symmetric(n, g) * 2 + shift * torch.eye(n, dtype=DTYPE)
    eig = torch.linalg.eigvalsh(A)
    assert eig.min() < 0 < eig.max(), "the test matrix must be indefinite"
    x = torch.randn(n, generator=g, dtype=DTYPE)
    k = n // 3
    params = {"a": x[:k].clone(), "b": x[k:].reshape(2, -1).clone()}

    def f(p):
        z = torch.cat([p["a"], p["b"].reshape(-1)])
        return 0.5 * z @ A @ z + z.sum()

    return f, params, A


def small_mlp():
    """A 2-2-2 tanh MLP (12 parameters) with a summed cross-entropy: a real, indefinite Hessian."""
    model = make_mlp([2, 2, 2], "tanh", seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=g, dtype=DTYPE) * 2
    y = torch.randint(0, 2, (6,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return torch.nn.functional.cross_entropy(
            functional_call(model, p, (x,)), y, reduction="sum"
        )

    H = dense_hessian(f, params)
    eig = torch.linalg.eigvalsh(H)
    assert eig.min() < 0 < eig.max(), "the test MLP's Hessian must be indefinite"
    return f, params, H, model, x, y


def closure_of(f, params):
    tensors = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    return (lambda: f(tensors)), list(tensors.values())


# ---------------------------------------------------------- unbiasedness (engine)


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_rademacher_is_unbiased_on_an_indefinite_quadratic(seed):
    f, params, A = indefinite_quadratic()
    law = rademacher_law(A)
    assert law["var"] == pytest.approx(rademacher_variance(A), rel=1e-12)
    est = sf.hutchinson_trace_estimate(
        f, params, M, generator=torch.Generator().manual_seed(seed), chunk_size=1000
    )
    assert est.samples.shape == (M,)
    assert_mean_consistent(
        float(est.estimate), float(torch.trace(A)), law["var"], law["max_dev"], M
    )
    assert_std_error_consistent(float(est.std_error), law, M)


def test_engine_rademacher_is_unbiased_on_an_mlp():
    f, params, H, *_ = small_mlp()
    law = rademacher_law(H)
    est = sf.hutchinson_trace_estimate(f, params, M, generator=torch.Generator().manual_seed(2))
    assert_mean_consistent(
        float(est.estimate), float(torch.trace(H)), law["var"], law["max_dev"], M
    )
    assert_std_error_consistent(float(est.std_error), law, M)


def test_engine_gaussian_probes_are_unbiased():
    f, params, A = indefinite_quadratic(seed=3)
    m = M
    est = sf.hutchinson_trace_estimate(
        f, params, m, generator=torch.Generator().manual_seed(0), distribution="gaussian"
    )
    eig = torch.linalg.eigvalsh(A)
    x = math.log(4 / DELTA)
    radius = 0.0
    for part in (eig[eig > 0], -eig[eig < 0]):
        if part.numel():
            radius += 2 * float(part.norm()) * math.sqrt(x / m) + 2 * float(part.max()) * x / m
    error = abs(float(est.estimate) - float(torch.trace(A)))
    z = error / math.sqrt(2 * float((A**2).sum()) / m)
    assert error <= radius, f"|error| {error:.4g} > {radius:.4g} (z = {z:.2f}, rate {DELTA})"
    # Gaussian probes are not exact on a diagonal matrix: the values vary.
    assert float(est.samples.std()) > 0


def test_engine_sparse_probes_are_unbiased():
    f, params, A = indefinite_quadratic(seed=4)
    est = sf.hutchinson_trace_estimate(
        f, params, M, generator=torch.Generator().manual_seed(0), distribution="sparse_rademacher"
    )
    variance, bound = sparse_variance_and_bound(A, SPARSE_DENSITY)
    assert_mean_consistent(float(est.estimate), float(torch.trace(A)), variance, bound, M)


def test_engine_samples_are_the_quadratic_forms_of_the_generators_probes():
    """Each reported sample is ``v^T H v`` for the probes the generator gives, to 1e-10."""
    f, params, A = indefinite_quadratic(n=9)
    one_leaf = {"x": torch.cat([params["a"], params["b"].reshape(-1)])}

    def g(p):
        return f({"a": p["x"][:3], "b": p["x"][3:].reshape(2, -1)})

    for distribution in ("rademacher", "gaussian", "sparse_rademacher"):
        est = sf.hutchinson_trace_estimate(
            g, one_leaf, 7, generator=torch.Generator().manual_seed(11), distribution=distribution
        )
        V = draw_probes(
            7,
            9,
            distribution=distribution,
            generator=torch.Generator().manual_seed(11),
            dtype=DTYPE,
        )
        expected = ((V @ A) * V).sum(-1)
        torch.testing.assert_close(est.samples, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(est.estimate, expected.mean(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            est.std_error, expected.std() / math.sqrt(7), rtol=1e-10, atol=1e-10
        )


# ------------------------------------------------------------ unbiasedness (API)
#
# The documented API computes the exact trace when ``num_samples >= n``, so on problems
# small enough for the exact law (n = 12) it is run RUNS times with API_M = 11 probes,
# each run with its own seed: the pooled samples are RUNS * API_M iid values, and the
# reported error bars are checked through the mean of the RUNS sample variances.

RUNS, API_M = 120, 11


def check_api_runs(estimates, law):
    """Per run: estimate and error bar are the mean and ``s/sqrt(m)`` of its samples;
    pooled: the mean is unbiased and the mean reported variance is the true one."""
    for est in estimates:
        assert est.samples.shape == (API_M,)
        torch.testing.assert_close(est.estimate, est.samples.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            est.std_error, est.samples.std() / math.sqrt(API_M), rtol=1e-12, atol=1e-12
        )
    samples = torch.cat([est.samples for est in estimates])
    assert_mean_consistent(
        float(samples.mean()), law["mean"], law["var"], law["max_dev"], samples.numel()
    )
    # Mean over runs of s^2 = m * std_error^2: unbiased for sigma^2, each term bounded.
    s2 = torch.stack([est.std_error for est in estimates]) ** 2 * API_M
    m, sigma2 = API_M, law["var"]
    var_s2 = law["mu4"] / m - sigma2**2 * (m - 3) / (m * (m - 1))
    bound = max(law["range"] ** 2 * m / (4 * (m - 1)) - sigma2, sigma2)
    radius = bernstein_radius(var_s2, bound, len(estimates))
    assert abs(float(s2.mean()) - sigma2) <= radius, (
        f"mean reported variance {float(s2.mean()):.5g} vs exact {sigma2:.5g} "
        f"(allowed +-{radius:.4g}, false-alarm rate {DELTA})"
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_api_samples_are_the_quadratic_forms_of_the_generators_probes(strategy):
    """Every strategy: sample ``j`` is ``v_j^T H v_j`` for the generator's probe ``v_j``."""
    f, params, H, *_ = small_mlp()
    keys = list(params)
    H_list = dense_hessian(
        lambda values: f(dict(zip(keys, values, strict=True))), list(params.values())
    )
    func, tensors = closure_of(f, params)
    est = hessian_trace_estimate(
        func,
        tensors,
        9,
        generator=torch.Generator().manual_seed(5),
        strategy=strategy,
        chunk_size=4,
        progress=False,
    )
    V = draw_probes(9, 12, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    torch.testing.assert_close(est.samples, ((V @ H_list) * V).sum(-1), rtol=1e-10, atol=1e-10)


def test_api_hutchinson_is_unbiased_with_an_honest_error_bar():
    f, params, H, *_ = small_mlp()
    law = rademacher_law(H)
    assert law["mean"] == pytest.approx(float(torch.trace(H)), rel=1e-12)
    func, tensors = closure_of(f, params)
    estimates = [
        hessian_trace_estimate(
            func,
            tensors,
            API_M,
            generator=torch.Generator().manual_seed(run),
            strategy="graph_batched",
            chunk_size=4,
            progress=False,
        )
        for run in range(RUNS)
    ]
    check_api_runs(estimates, law)


def test_api_hutchinson_without_a_generator_draws_fresh_probes_for_every_chunk():
    """With the global RNG (no ``generator``), no chunk may reuse another chunk's probes.

    Every strategy, chunked or not, draws the same probes as the unchunked ``"graph"``
    run from the same global seed.
    """
    f, params, A = indefinite_quadratic(n=12, seed=9)
    func, tensors = closure_of(f, params)
    results = {}
    for strategy in STRATEGIES:
        for chunk_size in (None, 3):
            torch.manual_seed(123)
            est = hessian_trace_estimate(
                func, tensors, 9, strategy=strategy, chunk_size=chunk_size, progress=False
            )
            results[strategy, chunk_size] = est.samples
    reference = results["graph", None]
    assert len(set(reference.tolist())) > 3, "the probes must differ"
    for key, samples in results.items():
        torch.testing.assert_close(samples, reference, rtol=1e-10, atol=1e-10, msg=str(key))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_samples_are_the_quadratic_forms_of_the_generators_probes(strategy):
    """The module API draws the same probes as the closure API (whose statistics are
    checked above) and its samples are ``v^T H v`` in ``model.parameters()`` order."""
    f, params, H, model, x, y = small_mlp()
    keys = list(params)
    H_list = dense_hessian(
        lambda values: f(dict(zip(keys, values, strict=True))), list(params.values())
    )

    def loss_fn(out, target):
        return torch.nn.functional.cross_entropy(out, target, reduction="sum")

    est = model_hessian_trace_estimate(
        model,
        loss_fn,
        x,
        y,
        API_M,
        generator=torch.Generator().manual_seed(1),
        strategy=strategy,
        chunk_size=3,
        progress=False,
    )
    V = draw_probes(API_M, 12, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    torch.testing.assert_close(est.samples, ((V @ H_list) * V).sum(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(est.estimate, est.samples.mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_hvp_module_hutchinson_is_unbiased_and_sparse_probes_are_rescaled(sparse):
    """``core.hvp.hessian_trace``; with ``sparse=True`` the 0.0.1 bias (x0.1) would be caught."""
    f, params, A = indefinite_quadratic(seed=5)
    func, tensors = closure_of(f, params)
    estimate = core_hvp.hessian_trace(
        func,
        tensors,
        num_samples=M,
        sparse=sparse,
        generator=torch.Generator().manual_seed(3),
        strategy="vmap",
        progress=False,
    )
    assert isinstance(estimate, float)
    if sparse:
        variance, bound = sparse_variance_and_bound(A, SPARSE_DENSITY)
    else:
        law = rademacher_law(A)
        variance, bound = law["var"], law["max_dev"]
    exact = float(torch.trace(A))
    assert_mean_consistent(estimate, exact, variance, bound, M)
    # The check has the power to see the unrescaled sparse probes of 0.0.1.
    assert abs(SPARSE_DENSITY * estimate - exact) > bernstein_radius(variance, bound, M)


# --------------------------------------------------------------- exactness


@settings(max_examples=10, deadline=None)
@given(diagonal_problems(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_rademacher_hutchinson_is_exact_on_diagonal_hessians(problem, m, seed):
    exact = torch.trace(problem.known_hessian)
    est = sf.hutchinson_trace_estimate(
        problem.f, problem.params, m, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(est.estimate, exact, rtol=1e-10, atol=1e-10)
    if m == 1:
        assert torch.isnan(est.std_error)
    else:
        assert float(est.std_error) <= 1e-10 * (1 + float(exact.abs()))
    func, tensors = problem.closure()
    for strategy in STRATEGIES:
        api = hessian_trace(
            func,
            tensors,
            m,
            generator=torch.Generator().manual_seed(seed),
            strategy=strategy,
            progress=False,
        )
        torch.testing.assert_close(api, exact, rtol=1e-10, atol=1e-10)
    old = core_hvp.hessian_trace(
        func, tensors, m, generator=torch.Generator().manual_seed(seed), progress=False
    )
    assert old == pytest.approx(float(exact), rel=1e-10, abs=1e-10)


@settings(max_examples=6, deadline=None)
@given(smooth_problems(), st.integers(0, 2**31 - 1))
def test_hutchinson_with_one_probe_is_the_quadratic_form(problem, seed):
    """One probe: the estimate is ``v^T H v`` exactly (the estimator has no other error)."""
    H = problem.hessian()
    est = sf.hutchinson_trace(
        problem.f, problem.params, 1, generator=torch.Generator().manual_seed(seed)
    )
    v = draw_probes(1, problem.n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)[0]
    torch.testing.assert_close(est, v @ H @ v, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- seeds


def test_same_seed_same_number_different_seed_different_number():
    f, params, H, model, x, y = small_mlp()
    func, tensors = closure_of(f, params)

    def loss_fn(out, target):
        return torch.nn.functional.cross_entropy(out, target, reduction="sum")

    runs = {
        "engine": lambda s: sf.hutchinson_trace(f, params, 5, generator=s),
        "engine gaussian": lambda s: sf.hutchinson_trace(
            f, params, 5, generator=s, distribution="gaussian"
        ),
        "engine estimate": lambda s: sf.hutchinson_trace_estimate(f, params, 5, generator=s)[1],
        "api": lambda s: hessian_trace(func, tensors, 5, generator=s, progress=False),
        "api vmap": lambda s: hessian_trace(
            func, tensors, 5, generator=s, strategy="vmap", progress=False
        ),
        "model": lambda s: model_hessian_trace(
            model, loss_fn, x, y, 5, generator=s, progress=False
        ),
        "hvp": lambda s: torch.tensor(
            core_hvp.hessian_trace(func, tensors, 5, generator=s, progress=False)
        ),
        "hvp sparse": lambda s: torch.tensor(
            core_hvp.hessian_trace(func, tensors, 5, sparse=True, generator=s, progress=False)
        ),
    }
    for name, run in runs.items():
        first = run(torch.Generator().manual_seed(42))
        again = run(torch.Generator().manual_seed(42))
        other = run(torch.Generator().manual_seed(43))
        assert torch.equal(first, again), name
        assert not torch.equal(first, other), name


def test_engine_hutchinson_equals_the_mean_over_the_same_probes_for_any_chunk_size():
    f, params, H, *_ = small_mlp()
    reference = sf.hutchinson_trace_estimate(
        f, params, 10, generator=torch.Generator().manual_seed(8)
    )
    for chunk_size in (1, 3, 4, 10, 50):
        est = sf.hutchinson_trace_estimate(
            f, params, 10, generator=torch.Generator().manual_seed(8), chunk_size=chunk_size
        )
        assert_close(tuple(est), tuple(reference))
