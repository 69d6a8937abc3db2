"""Stochastic trace and diagonal estimators of ``torch_secorder.linalg`` on dense float64 matrices.

Statistical tests are deterministic (fixed seeds) and state their false-alarm rate:
the z-test of unbiasedness over ``SEEDS = 400`` runs rejects a correct estimator
with probability ``ALPHA = 1e-3`` (two-sided, normal approximation of the mean
of 400 independent estimates); per-entry tests of a diagonal split ``ALPHA``
over the ``n`` entries (Bonferroni).  The error estimates are called calibrated
when ``estimate +- 1.96 * std_error`` covers the truth in at least 90% of runs.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from tests.conftest import assert_close, dense_hessian, make_mlp
from torch_secorder.func import hessian_matmat
from torch_secorder.linalg import (
    Estimate,
    hutchinson_adaptive,
    hutchinson_diagonal,
    hutchpp,
    xdiag,
    xnystrace,
    xtrace,
)

DTYPE = torch.float64
SEEDS = 400
ALPHA = 1e-3
Z_CRIT = NormalDist().inv_cdf(1 - ALPHA / 2)  # 3.29
COVERAGE = 0.90
N = 30


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny factorisations: threads only add start-up costs (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- matrices


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE)).Q


def indefinite(n: int = N, seed: int = 0) -> torch.Tensor:
    """Symmetric, indefinite, with a decaying spectrum (where sketching pays)."""
    Q = _orthogonal(n, seed)
    k = torch.arange(n, dtype=DTYPE)
    eigenvalues = (-1.0) ** k * 10 * 0.8**k + 0.5
    return (Q * eigenvalues) @ Q.T


def psd(n: int = N, seed: int = 1) -> torch.Tensor:
    Q = _orthogonal(n, seed)
    eigenvalues = 10 * 0.7 ** torch.arange(n, dtype=DTYPE) + 0.05
    return (Q * eigenvalues) @ Q.T


def low_rank(n: int, rank: int, seed: int, definite: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, rank, generator=g, dtype=DTYPE)
    signs = torch.ones(rank, dtype=DTYPE) if definite else (-1.0) ** torch.arange(rank)
    return (B * signs) @ B.T


def matmat_of(A: torch.Tensor):
    return lambda V: V @ A


class Counting:
    """A matmat that counts the rows it multiplies and the size of each call."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.rows, self.calls = A, 0, []

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.rows += V.shape[0]
        self.calls.append(V.shape[0])
        return V @ self.A


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------- the estimators, uniformly

# name -> (call(matmat, n, seed) -> Estimate, matrix the estimator applies to, what it estimates)
TRACE_ESTIMATORS = {
    "hutchpp-rademacher": (
        lambda mm, n, s: hutchpp(
            mm, n, 24, sketch_size=4, generator=gen(s), dtype=DTYPE, progress=False
        ),
        indefinite,
    ),
    "hutchpp-gaussian": (
        lambda mm, n, s: hutchpp(
            mm,
            n,
            24,
            sketch_size=4,
            distribution="gaussian",
            generator=gen(s),
            dtype=DTYPE,
            progress=False,
        ),
        indefinite,
    ),
    "xtrace-gaussian": (
        lambda mm, n, s: xtrace(mm, n, 12, generator=gen(s), dtype=DTYPE, progress=False),
        indefinite,
    ),
    "xtrace-rademacher": (
        lambda mm, n, s: xtrace(
            mm, n, 12, distribution="rademacher", generator=gen(s), dtype=DTYPE, progress=False
        ),
        indefinite,
    ),
    "xnystrace-gaussian": (
        lambda mm, n, s: xnystrace(mm, n, 8, generator=gen(s), dtype=DTYPE, progress=False),
        psd,
    ),
    "xnystrace-rademacher": (
        lambda mm, n, s: xnystrace(
            mm, n, 8, distribution="rademacher", generator=gen(s), dtype=DTYPE, progress=False
        ),
        psd,
    ),
    "hutchinson-fixed": (  # rtol = atol = 0: never stops early, plain Hutchinson
        lambda mm, n, s: hutchinson_adaptive(
            mm, n, rtol=0.0, max_matvecs=20, generator=gen(s), dtype=DTYPE, progress=False
        ),
        indefinite,
    ),
}

DIAGONAL_ESTIMATORS = {
    "hutchinson_diagonal": (
        lambda mm, n, s: hutchinson_diagonal(
            mm, n, 12, generator=gen(s), dtype=DTYPE, progress=False
        ),
        indefinite,
    ),
    "hutchinson_diagonal-gaussian": (
        lambda mm, n, s: hutchinson_diagonal(
            mm, n, 12, distribution="gaussian", generator=gen(s), dtype=DTYPE, progress=False
        ),
        indefinite,
    ),
    "xdiag": (
        lambda mm, n, s: xdiag(mm, n, 12, generator=gen(s), dtype=DTYPE, progress=False),
        indefinite,
    ),
}


def _runs(call, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    estimates, errors = [], []
    for seed in range(SEEDS):
        est = call(matmat_of(A), A.shape[0], seed)
        estimates.append(est.estimate)
        errors.append(est.std_error)
    return torch.stack(estimates), torch.stack(errors)


@pytest.mark.parametrize("name", list(TRACE_ESTIMATORS))
def test_trace_estimator_unbiased_and_calibrated(name):
    call, matrix = TRACE_ESTIMATORS[name]
    A = matrix()
    truth = A.trace()
    estimates, errors = _runs(call, A)
    # z-test of the mean over SEEDS independent runs, false alarm ALPHA
    z = (estimates.mean() - truth) / (estimates.std() / math.sqrt(SEEDS))
    assert abs(float(z)) < Z_CRIT, f"{name}: z = {float(z):.2f}"
    # the 95% interval from each run's own error estimate covers the truth often enough
    coverage = float(((estimates - truth).abs() <= 1.96 * errors).to(DTYPE).mean())
    assert coverage >= COVERAGE, f"{name}: coverage {coverage:.3f}"
    # and the error estimate has the size of the actual spread (within a factor 2)
    ratio = float(errors.mean() / estimates.std())
    assert 0.5 < ratio < 2.0, f"{name}: mean std_error / std = {ratio:.2f}"


@pytest.mark.parametrize("name", list(DIAGONAL_ESTIMATORS))
def test_diagonal_estimator_unbiased_and_calibrated(name):
    call, matrix = DIAGONAL_ESTIMATORS[name]
    A = matrix()
    truth = A.diagonal()
    estimates, errors = _runs(call, A)
    z = (estimates.mean(0) - truth) / (estimates.std(0) / math.sqrt(SEEDS))
    z_crit = NormalDist().inv_cdf(1 - ALPHA / (2 * A.shape[0]))  # Bonferroni over entries
    assert float(z.abs().max()) < z_crit, f"{name}: max |z| = {float(z.abs().max()):.2f}"
    covered = ((estimates - truth).abs() <= 1.96 * errors).to(DTYPE)
    assert float(covered.mean()) >= COVERAGE, f"{name}: coverage {float(covered.mean()):.3f}"


def test_sketching_beats_hutchinson_on_decaying_spectrum():
    """Same budget of 12 products: XTrace's and Hutch++'s spread is far below Hutchinson's."""
    Q = _orthogonal(N, 5)
    k = torch.arange(N, dtype=DTYPE)
    A = (Q * ((-1.0) ** k * 10 * 0.5**k)) @ Q.T
    spread = {}
    for name, call in {
        "hutchinson": lambda s: hutchinson_adaptive(
            matmat_of(A),
            N,
            rtol=0.0,
            max_matvecs=12,
            generator=gen(s),
            dtype=DTYPE,
            progress=False,
        ),
        "hutchpp": lambda s: hutchpp(matmat_of(A), N, 12, generator=gen(s), dtype=DTYPE),
        "xtrace": lambda s: xtrace(matmat_of(A), N, 12, generator=gen(s), dtype=DTYPE),
    }.items():
        spread[name] = float(torch.stack([call(s).estimate for s in range(100)]).std())
    assert spread["xtrace"] < spread["hutchinson"] / 3
    assert spread["hutchpp"] < spread["hutchinson"] / 2


# --------------------------------------------------------------- exact on low rank


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(12, 40),
    rank=st.integers(1, 5),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_on_low_rank(n, rank, extra, seed):
    """Exact: Hutch++ (sketch >= rank), XTrace/XDiag (k > rank), XNysTrace (m - 2 >= rank)."""
    A = low_rank(n, rank, seed)
    P = low_rank(n, rank, seed, definite=True)
    tol = 1e-10 * float(torch.linalg.matrix_norm(A)) * n
    budget_pp = 3 * (rank + extra)  # sketch of rank + extra columns
    budget_x = 2 * (rank + 1 + extra)  # k = rank + 1 + extra test vectors
    budget_nys = rank + 2 + extra  # rank = m - 1 is exact only to ~1e-7 (see xnystrace)
    for budget, call, M, target in [
        (budget_pp, hutchpp, A, A.trace()),
        (budget_x, xtrace, A, A.trace()),
        (budget_nys, xnystrace, P, P.trace()),
        (budget_x, xdiag, A, A.diagonal()),
    ]:
        if budget >= n or (call is xnystrace and budget < 2) or budget < 3:
            continue
        kwargs = {"distribution": "rademacher"} if call is xtrace and seed % 2 else {}
        est = call(matmat_of(M), n, budget, generator=gen(seed), dtype=DTYPE, **kwargs)
        assert_close(est.estimate, target, tol=tol / max(1.0, float(target.abs().max())))


def test_exact_on_low_rank_fixed_examples():
    """Rank exactly at the limit of each method, to 1e-10."""
    n = 40
    A, P = low_rank(n, 4, 3), low_rank(n, 4, 4, definite=True)
    scale = float(A.abs().max()) * n
    assert (
        abs(float(hutchpp(matmat_of(A), n, 12, generator=gen(0), dtype=DTYPE).estimate - A.trace()))
        < 1e-10 * scale
    )
    assert (
        abs(float(xtrace(matmat_of(A), n, 10, generator=gen(0), dtype=DTYPE).estimate - A.trace()))
        < 1e-10 * scale
    )
    assert (
        abs(
            float(xnystrace(matmat_of(P), n, 6, generator=gen(0), dtype=DTYPE).estimate - P.trace())
        )
        < 1e-10 * scale
    )
    d = xdiag(matmat_of(A), n, 10, generator=gen(0), dtype=DTYPE)
    assert_close(d.estimate, A.diagonal())


def test_diagonal_matrix_is_exact_for_rademacher_hutchinson():
    A = torch.diag(torch.linspace(-3, 5, N, dtype=DTYPE))
    est = hutchinson_diagonal(matmat_of(A), N, 3, generator=gen(0), dtype=DTYPE)
    assert_close(est.estimate, A.diagonal())
    assert_close(est.std_error, torch.zeros(N, dtype=DTYPE))
    est = hutchinson_adaptive(matmat_of(A), N, rtol=1e-8, generator=gen(0), dtype=DTYPE)
    assert_close(est.estimate, A.trace())
    assert est.matvecs == 8  # min_samples, then std_error == 0 meets the rule


@pytest.mark.parametrize(
    "call",
    [
        lambda mm, n, b: hutchpp(mm, n, b, dtype=DTYPE, generator=gen(0)),
        lambda mm, n, b: xtrace(mm, n, b, dtype=DTYPE, generator=gen(0)),
        lambda mm, n, b: xnystrace(mm, n, b, dtype=DTYPE, generator=gen(0)),
    ],
)
def test_budget_at_least_dim_gives_exact_trace(call):
    A = psd(10)
    counting = Counting(A)
    est = call(counting, 10, 12)
    assert_close(est.estimate, A.trace())
    assert float(est.std_error) == 0.0
    assert est.matvecs == counting.rows == 10


@pytest.mark.parametrize("call", [hutchinson_diagonal, xdiag])
def test_budget_at_least_dim_gives_exact_diagonal(call):
    A = indefinite(10)
    counting = Counting(A)
    est = call(counting, 10, 10, dtype=DTYPE, chunk_size=4)
    assert_close(est.estimate, A.diagonal())
    assert est.matvecs == counting.rows == 10
    assert counting.calls == [4, 4, 2]


# ------------------------------------------------------------------- counting products


@pytest.mark.parametrize(
    ("call", "budget", "used"),
    [
        (lambda mm, b, c: hutchpp(mm, N, b, chunk_size=c, dtype=DTYPE, generator=gen(1)), 14, 14),
        (
            lambda mm, b, c: hutchpp(
                mm, N, b, sketch_size=2, chunk_size=c, dtype=DTYPE, generator=gen(1)
            ),
            14,
            14,
        ),
        (lambda mm, b, c: xtrace(mm, N, b, chunk_size=c, dtype=DTYPE, generator=gen(1)), 13, 12),
        (lambda mm, b, c: xnystrace(mm, N, b, chunk_size=c, dtype=DTYPE, generator=gen(1)), 9, 9),
        (lambda mm, b, c: xdiag(mm, N, b, chunk_size=c, dtype=DTYPE, generator=gen(1)), 11, 10),
        (
            lambda mm, b, c: hutchinson_diagonal(
                mm, N, b, chunk_size=c, dtype=DTYPE, generator=gen(1)
            ),
            11,
            11,
        ),
        (
            lambda mm, b, c: hutchinson_adaptive(
                mm, N, rtol=0.0, max_matvecs=b, chunk_size=c, dtype=DTYPE, generator=gen(1)
            ),
            11,
            11,
        ),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_matvecs_counted(call, budget, used, chunk_size):
    counting = Counting(psd())
    est = call(counting, budget, chunk_size)
    assert isinstance(est, Estimate)
    assert est.matvecs == counting.rows == used
    if chunk_size is not None:
        assert max(counting.calls) <= chunk_size


def test_same_generator_seed_same_result():
    A = indefinite()
    for call in (hutchpp, xtrace, xdiag, hutchinson_diagonal):
        first = call(matmat_of(A), N, 12, generator=gen(7), dtype=DTYPE)
        second = call(matmat_of(A), N, 12, generator=gen(7), dtype=DTYPE, chunk_size=5)
        assert_close(first.estimate, second.estimate)


def test_float32_default_dtype():
    A = psd().float()
    for call in (hutchpp, xtrace, xnystrace, xdiag, hutchinson_diagonal):
        est = call(matmat_of(A), N, 12, generator=gen(0))
        assert est.estimate.dtype == torch.float32
        assert torch.isfinite(est.estimate).all() and torch.isfinite(est.std_error).all()


# ----------------------------------------------------------- adaptive Hutchinson's rule


def _rule_stops(values: torch.Tensor, rtol, atol, min_samples) -> int:
    """First count of probes (>= min_samples) at which the documented rule holds, else all."""
    for seen in range(min_samples, values.shape[0] + 1):
        head = values[:seen]
        err = head.std() / math.sqrt(seen)
        if err <= max(atol, rtol * abs(float(head.mean()))):
            return seen
    return values.shape[0]


@pytest.mark.parametrize(
    ("rtol", "atol", "chunk_size", "min_samples"),
    [(0.05, 0.0, 4, 8), (0.0, 0.5, None, 8), (0.02, 0.3, 7, 10), (0.1, 0.0, 1, 2)],
)
def test_adaptive_stops_by_its_rule(rtol, atol, chunk_size, min_samples):
    A = indefinite()
    values = []

    def recording(V):
        out = V @ A
        values.append((V * out).sum(-1))
        return out

    est = hutchinson_adaptive(
        recording,
        N,
        rtol=rtol,
        atol=atol,
        max_matvecs=5000,
        min_samples=min_samples,
        chunk_size=chunk_size,
        generator=gen(3),
        dtype=DTYPE,
        progress=False,
    )
    step = chunk_size or min_samples
    assert all(v.shape[0] == step for v in values[:-1])
    values = torch.cat(values)
    used = est.matvecs
    assert used == _rule_stops(values, rtol, atol, min_samples)
    assert used <= values.shape[0] < used + step  # the rest of the last chunk is dropped
    assert used < 5000, "the test should stop by the rule, not the budget"
    assert_close(est.estimate, values[:used].mean())
    assert_close(est.std_error, values[:used].std() / math.sqrt(used))
    assert float(est.std_error) <= max(atol, rtol * abs(float(est.estimate))) + 1e-12


@pytest.mark.parametrize(("max_matvecs", "chunk_size"), [(23, 5), (8, None), (9, 100)])
def test_adaptive_respects_max_matvecs(max_matvecs, chunk_size):
    counting = Counting(indefinite())
    est = hutchinson_adaptive(
        counting,
        N,
        rtol=1e-12,
        max_matvecs=max_matvecs,
        chunk_size=chunk_size,
        generator=gen(0),
        dtype=DTYPE,
    )
    assert est.matvecs == counting.rows == max_matvecs
    assert float(est.std_error) > 1e-12 * abs(float(est.estimate))  # budget ran out


# ----------------------------------------------------------------- errors on bad input


ALL = {
    "hutchpp": lambda **kw: hutchpp(**{"num_matvecs": 12, **kw}),
    "xtrace": lambda **kw: xtrace(**{"num_matvecs": 12, **kw}),
    "xnystrace": lambda **kw: xnystrace(**{"num_matvecs": 12, **kw}),
    "xdiag": lambda **kw: xdiag(**{"num_matvecs": 12, **kw}),
    "hutchinson_diagonal": lambda **kw: hutchinson_diagonal(**{"num_samples": 12, **kw}),
    "hutchinson_adaptive": lambda **kw: hutchinson_adaptive(**kw),
}


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"matmat": "not a function"}, TypeError, "matmat"),
        ({"dim": 0}, ValueError, "dim"),
        ({"dim": 2.5}, TypeError, "dim"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"generator": 3}, TypeError, "generator"),
        ({"matmat": lambda V: V[:, :-1]}, ValueError, "matmat"),
        ({"matmat": lambda V: V.sum()}, ValueError, "matmat"),
    ],
)
def test_bad_common_arguments(name, change, error, match):
    A = psd()
    kwargs = {"matmat": matmat_of(A), "dim": N, "dtype": DTYPE, **change}
    with pytest.raises(error, match=match):
        ALL[name](**kwargs)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda mm: hutchpp(mm, N, 2), ValueError, "num_matvecs"),
        (lambda mm: hutchpp(mm, N, 12.0), TypeError, "num_matvecs"),
        (lambda mm: hutchpp(mm, N, 12, sketch_size=6), ValueError, "sketch_size"),
        (lambda mm: hutchpp(mm, N, 12, sketch_size=0), ValueError, "sketch_size"),
        (lambda mm: hutchpp(mm, N, 12, distribution="sparse"), ValueError, "distribution"),
        (lambda mm: xtrace(mm, N, 3), ValueError, "num_matvecs"),
        (
            lambda mm: xtrace(mm, N, 12, distribution="sparse_rademacher"),
            ValueError,
            "distribution",
        ),
        (lambda mm: xnystrace(mm, N, 1), ValueError, "num_matvecs"),
        (lambda mm: xdiag(mm, N, 3), ValueError, "num_matvecs"),
        (lambda mm: hutchinson_diagonal(mm, N, 0), ValueError, "num_samples"),
        (lambda mm: hutchinson_diagonal(mm, N, True), TypeError, "num_samples"),
        (lambda mm: hutchinson_adaptive(mm, N, rtol=-1.0), ValueError, "rtol"),
        (lambda mm: hutchinson_adaptive(mm, N, atol=float("nan")), ValueError, "atol"),
        (lambda mm: hutchinson_adaptive(mm, N, rtol="1e-2"), TypeError, "rtol"),
        (lambda mm: hutchinson_adaptive(mm, N, max_matvecs=4), ValueError, "max_matvecs"),
        (lambda mm: hutchinson_adaptive(mm, N, min_samples=1), ValueError, "min_samples"),
        (lambda mm: hutchinson_adaptive(mm, N, max_matvecs=0), ValueError, "max_matvecs"),
    ],
)
def test_bad_specific_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(matmat_of(psd()))


def test_xnystrace_refuses_an_indefinite_operator():
    with pytest.raises(ValueError, match="positive semi-definite"):
        xnystrace(matmat_of(indefinite()), N, 12, generator=gen(0), dtype=DTYPE)


# ------------------------------------------------------------- a model's Hessian matmat


def _mlp_loss():
    model = make_mlp([4, 5, 3], "tanh", seed=0).to(DTYPE)
    g = gen(1)
    inputs = torch.randn(6, 4, generator=g, dtype=DTYPE)
    targets = torch.randn(6, 3, generator=g, dtype=DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return nn.functional.mse_loss(functional_call(model, p, (inputs,)), targets)

    return f, params


def _least_squares_loss(samples: int = 3):
    """Hessian of rank ``samples``: exact for every sketching method with budget enough."""
    model = nn.Linear(12, 1, bias=True).to(DTYPE)
    g = gen(2)
    inputs = torch.randn(samples, 12, generator=g, dtype=DTYPE)
    targets = torch.randn(samples, 1, generator=g, dtype=DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return 0.5 * ((functional_call(model, p, (inputs,)) - targets) ** 2).sum()

    return f, params


ON_MODELS = {
    "hutchpp": lambda mm, n, s: hutchpp(mm, n, 12, generator=gen(s), dtype=DTYPE),
    "xtrace": lambda mm, n, s: xtrace(mm, n, 12, generator=gen(s), dtype=DTYPE),
    "xdiag": lambda mm, n, s: xdiag(mm, n, 12, generator=gen(s), dtype=DTYPE),
    "hutchinson_diagonal": lambda mm, n, s: hutchinson_diagonal(
        mm, n, 12, generator=gen(s), dtype=DTYPE
    ),
    "hutchinson_adaptive": lambda mm, n, s: hutchinson_adaptive(
        mm, n, rtol=0.0, max_matvecs=12, generator=gen(s), dtype=DTYPE
    ),
}


@pytest.mark.parametrize("name", list(ON_MODELS))
def test_on_a_model_hessian_matmat_equals_the_dense_hessian(name):
    """Same probes: the estimate from the model's HVPs is the one from its dense Hessian."""
    f, params = _mlp_loss()
    H = dense_hessian(f, params)
    n = H.shape[0]
    on_model = ON_MODELS[name](hessian_matmat(f, params), n, 5)
    on_dense = ON_MODELS[name](matmat_of(H), n, 5)
    assert_close(on_model.estimate, on_dense.estimate)
    assert_close(on_model.std_error, on_dense.std_error)
    assert on_model.matvecs == on_dense.matvecs


def test_on_a_model_low_rank_hessian_exact():
    """A least-squares loss on 3 samples: rank-3 PSD Hessian, every sketch is exact."""
    f, params = _least_squares_loss()
    H = dense_hessian(f, params)
    n = H.shape[0]
    mm = hessian_matmat(f, params)
    for call, budget in [(hutchpp, 9), (xtrace, 8), (xnystrace, 5)]:
        est = call(mm, n, budget, generator=gen(0), dtype=DTYPE)
        assert_close(est.estimate, H.trace())
    assert_close(xdiag(mm, n, 8, generator=gen(0), dtype=DTYPE).estimate, H.diagonal())
    # XNysTrace on the PSD Hessian of the MLP with the dense one: same probes, same number
    f2, params2 = _mlp_loss()
    H2 = dense_hessian(f2, params2)
    psd_part = H2 @ H2  # a PSD operator built from the model's Hessian
    mm2 = hessian_matmat(f2, params2)
    est_model = xnystrace(lambda V: mm2(mm2(V)), H2.shape[0], 10, generator=gen(1), dtype=DTYPE)
    est_dense = xnystrace(matmat_of(psd_part), H2.shape[0], 10, generator=gen(1), dtype=DTYPE)
    assert_close(est_model.estimate, est_dense.estimate)


# ------------------------------------- the fast formulas against the definitions, naively


def _orth(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(M).Q


def _naive_xtrace(A, Om, improved):
    """The definition: for each i, a basis of the other products, probe omega_i on the rest."""
    n, k = A.shape[0], Om.shape[0]
    Y = Om @ A
    samples = []
    for i in range(k):
        Q_i = _orth(torch.cat([Y[:i], Y[i + 1 :]]).T)
        r = Om[i] - Q_i @ (Q_i.T @ Om[i])
        if improved:
            r = r * math.sqrt(n - k + 1) / r.norm()
        samples.append((Q_i.T @ A @ Q_i).trace() + r @ A @ r)
    return torch.stack(samples)


def _naive_xnystrace(A, Om, improved):
    """The definition: Nystrom approximation from the other vectors, omega_i probes the rest."""
    n, m = A.shape[0], Om.shape[0]
    samples = []
    for i in range(m):
        others = torch.cat([Om[:i], Om[i + 1 :]]).T
        Y = A @ others
        A_hat = Y @ torch.linalg.pinv(others.T @ Y, hermitian=True) @ Y.T
        scale = 1.0
        if improved:
            r = Om[i] - _orth(others) @ (_orth(others).T @ Om[i])
            scale = (n - m + 1) / (r @ r)
        samples.append(A_hat.trace() + scale * (Om[i] @ (A - A_hat) @ Om[i]))
    return torch.stack(samples)


def _naive_xdiag(A, Om):
    n, k = A.shape[0], Om.shape[0]
    Y = Om @ A
    samples = []
    for i in range(k):
        Q_i = _orth(torch.cat([Y[:i], Y[i + 1 :]]).T)
        P_i = Q_i @ Q_i.T
        samples.append(
            (P_i @ A).diagonal() + Om[i] * ((torch.eye(n, dtype=DTYPE) - P_i) @ A @ Om[i])
        )
    return torch.stack(samples)


def _naive_errors(naive, A, Om, *args):
    """(estimate, leave-one-out std error, jackknife std error) from the definitions."""
    k = Om.shape[0]
    samples = naive(A, Om, *args)
    replicates = torch.stack(
        [naive(A, torch.cat([Om[:j], Om[j + 1 :]]), *args).mean(0) for j in range(k)]
    )
    jackknife = torch.sqrt((k - 1) / k * ((replicates - replicates.mean(0)) ** 2).sum(0))
    return samples.mean(0), samples.std(0) / math.sqrt(k), jackknife


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(12, 24),  # budgets 2k <= 10 < n: no exact fallback
    k=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
    distribution=st.sampled_from(["gaussian", "rademacher"]),
)
def test_fast_formulas_match_the_definitions(n, k, seed, distribution):
    """XTrace, XNysTrace, XDiag and both error estimates against naive loops, to 1e-9."""
    from torch_secorder.linalg.probes import draw_probes

    A, P = indefinite(n, seed % 1000), psd(n, seed % 1000 + 1)
    improved = distribution == "gaussian"
    Om = draw_probes(k, n, distribution=distribution, generator=gen(seed), dtype=DTYPE)
    cases = [
        (xtrace, A, 2 * k, _naive_xtrace, (improved,), {"distribution": distribution}),
        (xnystrace, P, k, _naive_xnystrace, (improved,), {"distribution": distribution}),
    ]
    if distribution == "rademacher":
        cases.append((xdiag, A, 2 * k, _naive_xdiag, (), {}))
    for call, M, budget, naive, args, kwargs in cases:
        estimate, loo, jackknife = _naive_errors(naive, M, Om, *args)
        scale = float(M.abs().max()) * n
        for error_estimate, expected in [("leave-one-out", loo), ("jackknife", jackknife)]:
            est = call(
                matmat_of(M),
                n,
                budget,
                error_estimate=error_estimate,
                generator=gen(seed),
                dtype=DTYPE,
                **kwargs,
            )
            assert_close(est.estimate / scale, estimate / scale, tol=1e-9)
            assert_close(est.std_error / scale, expected / scale, tol=1e-9)


def test_hutchpp_matches_its_definition():
    from torch_secorder.linalg.probes import draw_probes

    A = indefinite()
    g = gen(4)
    S = draw_probes(5, N, generator=g, dtype=DTYPE)
    G = draw_probes(7, N, generator=g, dtype=DTYPE)
    Q = _orth(A @ S.T)
    P = torch.eye(N, dtype=DTYPE) - Q @ Q.T
    values = ((G @ P) @ A * (G @ P)).sum(1)
    est = hutchpp(matmat_of(A), N, 17, sketch_size=5, generator=gen(4), dtype=DTYPE)
    assert_close(est.estimate, (Q.T @ A @ Q).trace() + values.mean())
    assert_close(est.std_error, values.std() / math.sqrt(7))
    assert est.matvecs == 17


def test_global_generator_when_none():
    """generator=None draws from torch's global generator: reproducible by manual_seed."""
    A = indefinite()
    for call in (hutchpp, xtrace, xdiag, hutchinson_diagonal):
        torch.manual_seed(11)
        first = call(matmat_of(A), N, 12, dtype=DTYPE)
        after_first = torch.rand(1)
        torch.manual_seed(11)
        second = call(matmat_of(A), N, 12, dtype=DTYPE)
        assert_close(first.estimate, second.estimate)
        torch.manual_seed(11)
        assert not torch.equal(torch.rand(1), after_first)  # the estimator advanced it


def test_probe_inside_the_range_is_no_division_by_zero():
    """A test vector that is exactly in the range of a rank-1 A: its projection is 0."""
    from torch_secorder.linalg.probes import draw_probes

    n = 16
    b = draw_probes(1, n, distribution="gaussian", generator=gen(9), dtype=DTYPE)[0]
    A = torch.outer(b, b)  # the first Gaussian test vector of seed 9 spans range(A)
    for call, budget in [(xtrace, 4), (xtrace, 8), (xnystrace, 3), (xnystrace, 4)]:
        est = call(matmat_of(A), n, budget, generator=gen(9), dtype=DTYPE)
        assert_close(est.estimate, A.trace())
        assert torch.isfinite(est.std_error)
