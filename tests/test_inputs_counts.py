"""One rule for counts and chunk sizes in every public function (issue 7, section 5).

``chunk_size`` (``None`` or an int >= 1) and every count-like argument (``num_samples``,
``k``, ``max_iter``, ``num_points``, ...): a float, a bool or a string is a
``TypeError``, an int below the minimum a ``ValueError``, and the message names the
argument, what was expected and what came.  The list of functions taking
``chunk_size`` is discovered from the package, so a new one without the check fails
here.  A valid ``chunk_size`` still gives the dense oracle's numbers.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, assert_close, dense_hessian, ravel
from torch import nn
from torch.func import functional_call

import torch_secorder
from torch_secorder import analysis, approximations, core, func, linalg
from torch_secorder.approximations import fisher_diagonal, fisher_trace
from torch_secorder.core import gvp
from torch_secorder.core import hvp as core_hvp
from torch_secorder.func import diagonal as func_diagonal
from torch_secorder.linalg import eigen, probes
from torch_secorder.linalg import trace as linalg_trace

BAD_TYPES = (2.0, 2.5, True, False, "3", torch.tensor(2))
BAD_VALUES = (0, -1)


def tiny_model():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    x = torch.randn(4, 2, generator=g, dtype=DTYPE)
    y = torch.randn(4, 2, generator=g, dtype=DTYPE)
    return model, x, y


def closure_setup():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE, requires_grad=True)
    return (lambda: (x**3).sum() + x.prod() ** 2), x


def pure_loss(p):
    return (p["x"] ** 3).sum() + p["x"].prod() ** 2


POINT = {"x": torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)}
A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, -1.0]], dtype=DTYPE)


def matmat(V):
    return V @ A


def _chunk_calls():
    model, x, y = tiny_model()
    func_c, t = closure_setup()
    gen = torch.Generator().manual_seed(0)
    out = model(x)
    classes = torch.tensor([0, 1, 1, 0])
    v3 = torch.eye(3, dtype=DTYPE)

    def mf(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    mp = {n: p.detach() for n, p in model.named_parameters()}
    direction = [torch.ones_like(p) for p in model.parameters()]
    q = dict(progress=False)
    return {
        "core.hessian_trace.hessian_trace": lambda c: core.hessian_trace(
            func_c, [t], chunk_size=c, **q
        ),
        "core.hessian_trace.hessian_trace_estimate": lambda c: core.hessian_trace_estimate(
            func_c, [t], 2, generator=gen, chunk_size=c, **q
        ),
        "core.hessian_trace.model_hessian_trace": lambda c: core.model_hessian_trace(
            model, F.mse_loss, x, y, chunk_size=c, **q
        ),
        "core.hessian_trace.model_hessian_trace_estimate": (
            lambda c: core.model_hessian_trace_estimate(
                model, F.mse_loss, x, y, 2, generator=gen, chunk_size=c, **q
            )
        ),
        "core.hessian_diagonal.hessian_diagonal": lambda c: core.hessian_diagonal(
            func_c, [t], chunk_size=c, **q
        ),
        "core.hessian_diagonal.model_hessian_diagonal": lambda c: core.model_hessian_diagonal(
            model, F.mse_loss, x, y, chunk_size=c, **q
        ),
        "core.hvp.hessian_trace": lambda c: core_hvp.hessian_trace(
            func_c, [t], 2, generator=gen, chunk_size=c, **q
        ),
        "core.gvp.batch_jvp": lambda c: gvp.batch_jvp(lambda: t**2, [t], v3, chunk_size=c),
        "core.gvp.batch_vjp": lambda c: gvp.batch_vjp(lambda: t**2, [t], v3, chunk_size=c),
        "core.gvp.full_jacobian": lambda c: gvp.full_jacobian(lambda: t**2, [t], chunk_size=c),
        "approximations.fisher_diagonal.empirical_fisher_diagonal": (
            lambda c: fisher_diagonal.empirical_fisher_diagonal(
                model, nn.MSELoss(), x, y, chunk_size=c
            )
        ),
        "approximations.fisher_diagonal.generalized_fisher_diagonal": (
            lambda c: fisher_diagonal.generalized_fisher_diagonal(model, out, classes, chunk_size=c)
        ),
        "approximations.fisher_trace.empirical_fisher_trace": (
            lambda c: fisher_trace.empirical_fisher_trace(model, nn.MSELoss(), x, y, chunk_size=c)
        ),
        "approximations.fisher_trace.generalized_fisher_trace": (
            lambda c: fisher_trace.generalized_fisher_trace(model, out, classes, chunk_size=c)
        ),
        "approximations.gauss_newton.gauss_newton_matrix_approximation": (
            lambda c: approximations.gauss_newton_matrix_approximation(
                model, F.mse_loss, x, y, chunk_size=c
            )
        ),
        "approximations.gauss_newton.gauss_newton_matrix": (
            lambda c: approximations.gauss_newton_matrix(model, F.mse_loss, x, y, chunk_size=c)
        ),
        "analysis.eigensolvers.model_eigenvalues": lambda c: analysis.model_eigenvalues(
            model, F.mse_loss, x, y, chunk_size=c, tol=1e-3
        ),
        "analysis.eigensolvers.estimate_eigenvalues": lambda c: analysis.estimate_eigenvalues(
            model, F.mse_loss, [(x, y)], chunk_size=c, tol=1e-3
        ),
        "analysis.spectral_density.model_spectral_density": (
            lambda c: analysis.model_spectral_density(
                model, F.mse_loss, x, y, 3, 4, generator=gen, chunk_size=c, progress=False
            )
        ),
        "analysis.landscape.compute_loss_surface_1d": lambda c: analysis.compute_loss_surface_1d(
            model, nn.MSELoss(), x, y, direction, num_points=3, chunk_size=c
        ),
        "analysis.landscape.compute_loss_surface_2d": lambda c: analysis.compute_loss_surface_2d(
            model, nn.MSELoss(), x, y, direction, direction, num_points=2, chunk_size=c
        ),
        "func.hvp.hvp_batched": lambda c: func.hvp_batched(
            pure_loss, POINT, {"x": v3}, chunk_size=c
        ),
        "func.hvp.hessian_matmat": lambda c: func.hessian_matmat(pure_loss, POINT, c)(v3),
        "func.trace.hutchinson_trace": lambda c: func.hutchinson_trace(
            pure_loss, POINT, 2, gen, chunk_size=c
        ),
        "func.trace.hutchinson_trace_estimate": lambda c: func.hutchinson_trace_estimate(
            pure_loss, POINT, 2, gen, chunk_size=c
        ),
        "func.diagonal.hessian_diagonal": lambda c: func.hessian_diagonal(pure_loss, POINT, c),
        "func.diagonal.hessian_trace": lambda c: func.hessian_trace(pure_loss, POINT, c),
        "func.diagonal.leaf_hessian_diagonal": lambda c: func_diagonal.leaf_hessian_diagonal(
            pure_loss, POINT, 0, c
        ),
        "func.fast_diagonal.fast_hessian_diagonal": lambda c: func.fast_hessian_diagonal(
            mf, mp, c, False
        ),
        "func.fast_diagonal.ggn_diagonal": lambda c: func.ggn_diagonal(
            lambda p: functional_call(model, p, (x,)), lambda o: F.mse_loss(o, y), mp, c
        ),
        "linalg.trace.hutchinson": lambda c: linalg.hutchinson(
            matmat, 3, 4, dtype=DTYPE, chunk_size=c, generator=gen, **q
        ),
        "linalg.trace.chunk_ranges": lambda c: linalg_trace.chunk_ranges(5, c),
    }


CHUNK_CALLS = _chunk_calls()


def _linalg_generic(module_name: str, name: str):
    """A call of a matmat-based ``linalg`` estimator with defaults for its counts."""
    fn = getattr(importlib.import_module(module_name), name)
    sig = inspect.signature(fn)

    def call(chunk_size=None, **overrides):
        kwargs = {}
        for p in sig.parameters.values():
            if p.name == "matmat":
                kwargs[p.name] = matmat
            elif p.name == "dim":
                kwargs[p.name] = 3
            elif p.default is inspect.Parameter.empty and p.name not in overrides:
                kwargs[p.name] = 6  # a count (num_samples, num_matvecs)
        for key, value in (("dtype", DTYPE), ("progress", False), ("chunk_size", chunk_size)):
            if key in sig.parameters:
                kwargs[key] = value
        if "generator" in sig.parameters:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        kwargs.update(overrides)
        return fn(**kwargs)

    return call, sig


def _public_functions_with(parameter: str):
    """``(key, module, name)`` of every public function of the package taking ``parameter``."""
    found = {}
    for info in pkgutil.walk_packages(torch_secorder.__path__, "torch_secorder."):
        if info.name.endswith("__main__") or info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if not inspect.isfunction(obj) or obj.__module__ != info.name:
                continue
            if parameter in inspect.signature(obj).parameters:
                key = info.name.removeprefix("torch_secorder.") + "." + name
                found[key] = (info.name, name)
    return found


CHUNKED = _public_functions_with("chunk_size")


def _chunk_call(key: str):
    if key in CHUNK_CALLS:
        return CHUNK_CALLS[key]
    module_name, name = CHUNKED[key]
    call, sig = _linalg_generic(module_name, name)
    assert "matmat" in sig.parameters, f"{key}: add a call to CHUNK_CALLS in this file"
    return call


def test_every_public_function_with_chunk_size_is_covered():
    assert set(CHUNK_CALLS) <= set(CHUNKED), set(CHUNK_CALLS) - set(CHUNKED)
    for key in CHUNKED:
        _chunk_call(key)  # a call is known for each


@pytest.mark.parametrize("key", sorted(CHUNKED))
def test_chunk_size_of_the_wrong_type_or_value_is_refused(key):
    call = _chunk_call(key)
    for bad in BAD_TYPES:
        with pytest.raises(TypeError, match=r"chunk_size must be an int.*got"):
            call(bad)
    for bad in BAD_VALUES:
        with pytest.raises(ValueError, match=rf"chunk_size must be .*1.*got {bad}"):
            call(bad)
    call(None)
    call(1)


def test_a_valid_chunk_size_gives_the_dense_oracle():
    func_c, t = closure_setup()
    H = dense_hessian(pure_loss, POINT)
    model, x, y = tiny_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    Hm = dense_hessian(lambda p: F.mse_loss(functional_call(model, p, (x,)), y), params)
    D = torch.diag(torch.tensor([1.0, -2.0, 5.0], dtype=DTYPE))
    for chunk in (None, 1, 2, 5, 1000):
        assert_close(core.hessian_diagonal(func_c, [t], chunk_size=chunk)[0], H.diagonal())
        assert_close(core.hessian_trace(func_c, [t], chunk_size=chunk), H.trace())
        assert_close(func.hessian_diagonal(pure_loss, POINT, chunk)["x"], H.diagonal())
        diag = core.model_hessian_diagonal(model, F.mse_loss, x, y, chunk_size=chunk)
        assert_close(ravel(dict(zip(params, diag, strict=True))), Hm.diagonal())
        V = torch.eye(3, dtype=DTYPE)
        assert_close(func.hessian_matmat(pure_loss, POINT, chunk)(V), H)
        # Rademacher probes are exact on a diagonal matrix, whatever the chunks.
        est = linalg.hutchinson(lambda V: V @ D, 3, 7, dtype=DTYPE, chunk_size=chunk)
        assert_close(est.estimate, torch.tensor(4.0, dtype=DTYPE))


# --------------------------------------------------------------------------- counts


def _count_calls():
    model, x, y = tiny_model()
    func_c, t = closure_setup()
    out = model(x)
    classes = torch.tensor([0, 1, 1, 0])
    direction = [torch.ones_like(p) for p in model.parameters()]
    q = dict(progress=False)

    def loss_of_model(m, data, target):
        return F.mse_loss(m(data), target)

    # (label, argument name, call(value), smallest valid value)
    return [
        ("hessian_trace", "num_samples", lambda n: core.hessian_trace(func_c, [t], n, **q), 1),
        (
            "hessian_trace_estimate",
            "num_samples",
            lambda n: core.hessian_trace_estimate(func_c, [t], n, **q),
            1,
        ),
        (
            "model_hessian_trace",
            "num_samples",
            lambda n: core.model_hessian_trace(model, F.mse_loss, x, y, n, **q),
            1,
        ),
        (
            "model_hessian_trace_estimate",
            "num_samples",
            lambda n: core.model_hessian_trace_estimate(model, F.mse_loss, x, y, n, **q),
            1,
        ),
        ("hvp.hessian_trace", "num_samples", lambda n: core_hvp.hessian_trace(func_c, [t], n), 1),
        (
            "approximate_hvp",
            "num_samples",
            lambda n: core.approximate_hvp(func_c, [t], torch.ones(3, dtype=DTYPE), n),
            1,
        ),
        (
            "empirical_fisher_trace",
            "num_samples",
            lambda n: approximations.empirical_fisher_trace(model, nn.MSELoss(), x, y, n),
            1,
        ),
        (
            "generalized_fisher_trace",
            "num_samples",
            lambda n: approximations.generalized_fisher_trace(model, out, classes, "nll", n),
            1,
        ),
        (
            "generalized_fisher_diagonal",
            "num_samples",
            lambda n: approximations.generalized_fisher_diagonal(
                model, out, classes, num_samples=n
            ),
            1,
        ),
        (
            "power_iteration",
            "num_iterations",
            lambda n: analysis.power_iteration(lambda V: A @ V, 3, n, device="cpu", dtype=DTYPE),
            1,
        ),
        (
            "power_iteration",
            "num_vectors",
            lambda n: analysis.power_iteration(
                lambda V: A @ V, 3, 10, n, device="cpu", dtype=DTYPE
            ),
            1,
        ),
        (
            "power_iteration",
            "dim",
            lambda n: analysis.power_iteration(lambda V: V, n, 10, device="cpu", dtype=DTYPE),
            1,
        ),
        (
            "lanczos",
            "num_iterations",
            lambda n: analysis.lanczos(lambda V: A @ V, 3, n, device="cpu", dtype=DTYPE),
            1,
        ),
        (
            "lanczos",
            "num_vectors",
            lambda n: analysis.lanczos(lambda V: A @ V, 3, 10, n, device="cpu", dtype=DTYPE),
            1,
        ),
        (
            "model_eigenvalues",
            "num_eigenvalues",
            lambda n: analysis.model_eigenvalues(model, loss_of_model, x, y, n),
            1,
        ),
        (
            "model_eigenvalues",
            "num_iterations",
            lambda n: analysis.model_eigenvalues(model, loss_of_model, x, y, 1, num_iterations=n),
            1,
        ),
        (
            "compute_loss_surface_1d",
            "num_points",
            lambda n: analysis.compute_loss_surface_1d(
                model, nn.MSELoss(), x, y, direction, num_points=n
            ),
            1,
        ),
        (
            "compute_loss_surface_2d",
            "num_points",
            lambda n: analysis.compute_loss_surface_2d(
                model, nn.MSELoss(), x, y, direction, direction, num_points=n
            ),
            1,
        ),
        (
            "func.hutchinson_trace",
            "num_samples",
            lambda n: func.hutchinson_trace(pure_loss, POINT, n),
            1,
        ),
        (
            "func.hutchinson_trace_estimate",
            "num_samples",
            lambda n: func.hutchinson_trace_estimate(pure_loss, POINT, n),
            1,
        ),
        (
            "linalg.hutchinson",
            "num_samples",
            lambda n: linalg.hutchinson(matmat, 3, n, dtype=DTYPE, **q),
            1,
        ),
        ("linalg.hutchinson", "dim", lambda n: linalg.hutchinson(lambda V: V, n, 2, **q), 1),
        ("draw_probes", "num", lambda n: probes.draw_probes(n, 3), 0),
        ("draw_probes", "dim", lambda n: probes.draw_probes(2, n), 0),
        ("lanczos_eigsh", "dim", lambda n: eigen.lanczos_eigsh(lambda V: V, n), 1),
        ("lanczos_eigsh", "k", lambda n: eigen.lanczos_eigsh(matmat, 3, n, dtype=DTYPE), 1),
        (
            "lanczos_eigsh",
            "max_iter",
            lambda n: eigen.lanczos_eigsh(matmat, 3, 1, max_iter=n, dtype=DTYPE),
            1,
        ),
        ("subspace_iteration", "dim", lambda n: eigen.subspace_iteration(lambda V: V, n), 1),
        (
            "subspace_iteration",
            "k",
            lambda n: eigen.subspace_iteration(matmat, 3, n, dtype=DTYPE),
            1,
        ),
        (
            "subspace_iteration",
            "max_iter",
            lambda n: eigen.subspace_iteration(matmat, 3, 1, max_iter=n, dtype=DTYPE),
            1,
        ),
        (
            "ritz_pairs",
            "k",
            lambda n: eigen.ritz_pairs(torch.ones(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE), n),
            1,
        ),
    ]


COUNT_CALLS = _count_calls()


@pytest.mark.parametrize(
    "label, name, call, minimum", COUNT_CALLS, ids=[f"{c[0]}-{c[1]}" for c in COUNT_CALLS]
)
def test_counts_follow_one_rule(label, name, call, minimum):
    for bad in (2.0, 1.5, True, "3"):
        with pytest.raises(TypeError, match=rf"{name}.*must be an int"):
            call(bad)
    for bad in sorted({minimum - 1, -1}):
        with pytest.raises(ValueError, match=rf"{name}.*must be >= {minimum}, got {bad}"):
            call(bad)
    call(max(minimum, 1))  # the smallest count that computes something is accepted


@pytest.mark.parametrize(
    "key", sorted(k for k in CHUNKED if k not in CHUNK_CALLS and k.startswith("linalg."))
)
def test_counts_of_the_matmat_estimators_follow_one_rule(key):
    call, sig = _linalg_generic(*CHUNKED[key])
    counts = [
        p.name
        for p in sig.parameters.values()
        if "int" in str(p.annotation) and p.name not in ("chunk_size",)
    ]
    assert counts, key
    for name in counts:
        for bad in (2.5, True):
            with pytest.raises(TypeError, match=rf"{name}.*int"):
                call(**{name: bad})
        with pytest.raises(ValueError, match=name):
            call(**{name: -1})


def test_counts_accept_numpy_integers_and_return_the_same_number():
    numpy = pytest.importorskip("numpy")
    func_c, t = closure_setup()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = core.hessian_trace(func_c, [t], numpy.int64(2), generator=gen(), progress=False)
    b = core.hessian_trace(func_c, [t], 2, generator=gen(), progress=False)
    assert torch.equal(a, b)
    H = dense_hessian(pure_loss, POINT)
    exact = core.hessian_trace(func_c, [t], numpy.int64(3), progress=False)  # m >= n: exact
    assert_close(exact, H.trace())
