"""core.hvp.approximate_hvp and gauss_newton_product against dense float64 oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPE,
    LOSSES,
    TOL,
    assert_close,
    cubic_problems,
    make_mlp,
    mlp_problems,
    quadratic_problems,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

from torch_secorder.core.hvp import approximate_hvp, exact_hvp, gauss_newton_product

SETTINGS = settings(max_examples=15, deadline=None)


def flat(tensors) -> Tensor:
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------- approximate_hvp


def fd_tolerance(theta: Tensor, v: Tensor, levels: int, dtype: torch.dtype, scale: float) -> float:
    r"""Error bound of the Richardson-extrapolated central difference with the library's step.

    The perturbation is :math:`\delta = h\|v\| = \varepsilon^{1/(2k+1)}(1 + \|\theta\|)`.
    Truncation: :math:`O(\delta^{2k} \|v\|)` (the :math:`(2k+2)`-th derivatives of the loss
    times :math:`v`); rounding: :math:`O(\varepsilon \|v\| / \delta)` per difference,
    amplified by at most :math:`2^{k-1}` (the smallest step) times the extrapolation
    weights (< 2).  ``scale`` bounds the derivatives of the (order-one) test problems.
    """
    eps = torch.finfo(dtype).eps
    delta = eps ** (1 / (2 * levels + 1)) * (1 + float(theta.norm()))
    vn = float(v.norm())
    return scale * vn * (delta ** (2 * levels) + 2**levels * eps / delta)


@SETTINGS
@given(
    problem=st.one_of(mlp_problems(), quadratic_problems(), cubic_problems()),
    seed=st.integers(0, 2**31 - 1),
    levels=st.integers(1, 3),
)
def test_approximate_hvp_within_step_derived_tolerance(problem, seed, levels):
    func, params = problem.closure()
    before = [p.detach().clone() for p in params]
    v = problem.random_vector(seed)
    expected = problem.list_hessian() @ flat(v)
    got = approximate_hvp(func, params, v if len(v) > 1 else v[0], richardson_levels=levels)
    tol = fd_tolerance(flat(params).detach(), flat(v), levels, DTYPE, scale=10.0)
    err = float((flat(got) - expected).abs().max())
    assert err <= tol, f"error {err:.3g} > bound {tol:.3g}"
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)  # bit for bit
        assert p.grad is None


def test_central_difference_is_exact_up_to_rounding_on_cubics():
    """Cubic losses have zero fourth derivative: only the rounding term remains."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=DTYPE)
    A = A + A.T
    c = torch.randn(6, generator=g, dtype=DTYPE)
    x = torch.randn(6, generator=g, dtype=DTYPE, requires_grad=True)
    v = torch.randn(6, generator=g, dtype=DTYPE)

    def func():
        return 0.5 * x @ A @ x + (c * x**3).sum()

    exact = exact_hvp(func, [x], v)
    got = approximate_hvp(func, [x], v)
    eps = torch.finfo(DTYPE).eps
    delta = eps ** (1 / 3) * (1 + float(x.detach().norm()))
    assert float((got - exact).abs().max()) <= 100 * float(v.norm()) * eps / delta


def test_float32_accuracy_and_damping():
    model = make_mlp([3, 4, 2], "tanh", seed=1).float()
    x = torch.randn(6, 3)
    y = torch.randint(0, 2, (6,))
    params = list(model.parameters())

    def func():
        return F.cross_entropy(model(x), y)

    v = [torch.randn_like(p) for p in params]
    exact = flat(exact_hvp(func, params, v))
    got = flat(approximate_hvp(func, params, v))
    tol = fd_tolerance(flat(params).detach(), flat(v), 1, torch.float32, scale=100.0)
    assert float((got - exact).abs().max()) <= tol
    damped = flat(approximate_hvp(func, params, v, 1, 0.25))
    assert_close(damped, got + 0.25 * flat(v), tol=1e-6)


def test_damping_zero_vector_and_frozen_tensor():
    x = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    w = torch.tensor([3.0], dtype=DTYPE)  # does not require grad: Hessian block counts as zero

    def func():
        return (x**3).sum() * w.sum()

    v = [torch.tensor([1.0, -1.0], dtype=DTYPE), torch.tensor([2.0], dtype=DTYPE)]
    got = approximate_hvp(func, [x, w], v, damping=0.5)
    assert_close(got[0], torch.tensor([18.0, -36.0], dtype=DTYPE) + 0.5 * v[0], tol=1e-8)
    assert_close(got[1], 0.5 * v[1])
    zero = approximate_hvp(func, [x], torch.zeros(2, dtype=DTYPE), damping=3.0)
    assert torch.equal(zero, torch.zeros(2, dtype=DTYPE))
    unused = approximate_hvp(lambda: w.sum() ** 2, [x], v[0], damping=0.5)
    assert torch.equal(unused, 0.5 * v[0])


def test_parameters_unchanged_when_func_raises():
    x = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    before = x.detach().clone()
    calls = []

    def func():
        calls.append(1)
        if len(calls) > 1:  # the up-front check passes, the differences fail
            raise RuntimeError("boom")
        return (x**3).sum()

    with pytest.raises(RuntimeError, match="boom"):
        approximate_hvp(func, [x], torch.ones(2, dtype=DTYPE))
    assert torch.equal(x, before) and x.grad is None and x.requires_grad


@SETTINGS
@given(
    problem=st.one_of(mlp_problems(), quadratic_problems(), cubic_problems()),
    seed=st.integers(0, 2**31 - 1),
    num_samples=st.sampled_from([2, 7, 200, 10**6]),
    levels=st.integers(1, 2),
)
def test_num_samples_keeps_its_001_meaning(problem, seed, num_samples, levels):
    """0.0.1 averaged ``num_samples`` identical differences: any count gives the same product.

    (Until this release ``num_samples`` was the Richardson level count, and 0.0.1's
    ``num_samples=200`` raised ``OverflowError`` on ``4**199``.)
    """
    func, params = problem.closure()
    v = problem.random_vector(seed)
    v_arg = v if len(v) > 1 else v[0]
    once = approximate_hvp(func, params, v_arg, richardson_levels=levels)
    many = approximate_hvp(func, params, v_arg, num_samples, 0.0, richardson_levels=levels)
    assert torch.equal(flat(many), flat(once))  # bit for bit: computed once
    expected = problem.list_hessian() @ flat(v)
    tol = fd_tolerance(flat(params).detach(), flat(v), levels, DTYPE, scale=10.0)
    assert float((flat(many) - expected).abs().max()) <= tol


def test_richardson_levels_reduce_the_error():
    """Against the exact product of a smooth non-polynomial loss, in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, generator=g, dtype=DTYPE, requires_grad=True)
    v = torch.randn(5, generator=g, dtype=DTYPE)

    def func():
        return torch.sin(x).pow(2).sum() * torch.exp(0.3 * x).sum()

    exact = exact_hvp(func, [x], v)
    errors = [
        float((approximate_hvp(func, [x], v, richardson_levels=k) - exact).abs().max())
        for k in (1, 2, 3)
    ]
    for k, err in zip((1, 2, 3), errors, strict=True):
        assert err <= fd_tolerance(x.detach(), v, k, DTYPE, scale=10.0)
    assert errors[1] < errors[0] and errors[2] < errors[0]


def test_kink_between_the_shifted_points_is_stepped_over():
    """A ReLU kink 1e-6 from the point, inside the first step: halving clears it.

    loss = relu(z) w + w**2 is piecewise quadratic, so away from the kink the central
    difference is exact up to rounding; across it the gradient in z jumps by w.
    """
    theta = torch.tensor([1e-6, 1.5], dtype=DTYPE, requires_grad=True)

    def func():
        return torch.relu(theta[0]) * theta[1] + theta[1] ** 2

    v = torch.tensor([1.0, 1.0], dtype=DTYPE)
    expected = exact_hvp(func, [theta], v)
    assert_close(expected, torch.tensor([1.0, 3.0], dtype=DTYPE))
    for levels in (1, 2, 3):
        got = approximate_hvp(func, [theta], v, richardson_levels=levels)
        assert_close(got, expected, tol=1e-8)


def test_kink_at_the_point_warns():
    theta = torch.tensor([0.0, 1.5], dtype=DTYPE, requires_grad=True)

    def func():
        return torch.relu(theta[0]) * theta[1] + theta[1] ** 2

    with pytest.warns(UserWarning, match="did not settle"):
        approximate_hvp(func, [theta], torch.tensor([1.0, 1.0], dtype=DTYPE))


@pytest.mark.parametrize("seed", [297, 316, 336, 380, 483])
def test_float32_relu_net_close_to_exact(seed):
    """0.0.1's test_hvp_consistency model: these draws put a ReLU kink inside the first step
    (error above 0.2 before the kink guard); now within float32 finite-difference accuracy."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    x, y = torch.randn(1, 2), torch.randn(1, 1)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def func():
        return F.mse_loss(model(x), y)

    exact = flat(exact_hvp(func, params, v))
    got = flat(approximate_hvp(func, params, v))
    assert float((got - exact).abs().max()) <= 1e-2 * (1 + float(exact.abs().max()))


def test_approximate_hvp_bad_input():
    x = torch.ones(2, dtype=DTYPE, requires_grad=True)

    def func():
        return (x**3).sum()

    v = torch.ones(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        approximate_hvp(func, [x], v, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be an int, got float"):
        approximate_hvp(func, [x], v, num_samples=1.5)
    with pytest.raises(TypeError, match="damping must be a real number, got str"):
        approximate_hvp(func, [x], v, damping="a")
    with pytest.raises(ValueError, match="richardson_levels must be between 1 and 8, got 0"):
        approximate_hvp(func, [x], v, richardson_levels=0)
    with pytest.raises(ValueError, match="richardson_levels must be between 1 and 8, got 200"):
        approximate_hvp(func, [x], v, richardson_levels=200)
    with pytest.raises(TypeError, match="richardson_levels must be an int, got float"):
        approximate_hvp(func, [x], v, richardson_levels=2.0)
    with pytest.raises(TypeError, match="richardson_levels must be an int, got bool"):
        approximate_hvp(func, [x], v, richardson_levels=True)
    with pytest.raises(ValueError, match="damping must be finite"):
        approximate_hvp(func, [x], v, damping=float("inf"))
    with pytest.raises(ValueError, match=r"v\[0\] has shape \(3,\)"):
        approximate_hvp(func, [x], torch.ones(3))
    with pytest.raises(ValueError, match="scalar tensor"):
        approximate_hvp(lambda: x**2, [x], v)


# ----------------------------------------------------------------------- gauss_newton_product


def dense_ggn(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """Oracle: ``J^T H_out J`` from the dense Jacobian (jacrev) and output Hessian (hessian)."""
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())
    out = model(x).detach()

    def outputs(*vals):
        return functional_call(model, dict(zip(names, vals, strict=True)), (x,)).reshape(-1)

    blocks = torch.func.jacrev(outputs, argnums=tuple(range(len(values))))(*values)
    J = torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)
    H = torch.func.hessian(lambda z: loss_fn(z.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H @ J


@settings(max_examples=20, deadline=None)
@given(problem=mlp_problems(), seed=st.integers(0, 2**31 - 1))
def test_gauss_newton_product_matches_dense_ggn(problem, seed):
    model, loss_fn, x, y = problem.model, problem.loss_fn, problem.inputs, problem.targets
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    v = problem.random_vector(seed)  # named_parameters order == dict order
    G = dense_ggn(model, loss_fn, x, y)
    got = gauss_newton_product(model, loss_fn, x, y, v)
    assert_close(flat(got), G @ flat(v))
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b) and p.grad is None


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_gauss_newton_each_loss_and_reduction(loss_name):
    loss_fn, kind = LOSSES[loss_name]
    model = make_mlp([3, 4, 3], "tanh", seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    y = (
        torch.randint(0, 3, (5,), generator=g)
        if kind == "class"
        else torch.randn(5, 3, generator=g, dtype=DTYPE)
    )
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in model.parameters()]
    G = dense_ggn(model, loss_fn, x, y)
    assert_close(flat(gauss_newton_product(model, loss_fn, x, y, v)), G @ flat(v))
    # nn.Module losses work too.
    module_loss = nn.CrossEntropyLoss() if kind == "class" else nn.MSELoss()
    G2 = dense_ggn(model, module_loss, x, y)
    assert_close(flat(gauss_newton_product(model, module_loss, x, y, v)), G2 @ flat(v))


def test_gauss_newton_equals_hessian_for_linear_model_with_mse():
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=DTYPE)
    y = torch.randn(4, 2, dtype=DTYPE)
    v = [torch.randn_like(p) for p in model.parameters()]
    params = list(model.parameters())
    hv = exact_hvp(lambda: F.mse_loss(model(x), y), params, v)
    assert_close(flat(gauss_newton_product(model, F.mse_loss, x, y, v)), flat(hv))


def test_gauss_newton_create_graph_and_single_parameter():
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(4, 3, dtype=DTYPE)
    y = torch.randn(4, 1, dtype=DTYPE)
    v = torch.randn(1, 3, dtype=DTYPE)
    got = gauss_newton_product(model, F.mse_loss, x, y, v)
    assert isinstance(got, Tensor)
    # For a linear model with MSE: G = 2/N * X^T X (per output).
    assert_close(got.reshape(-1), (2 / 4) * x.T @ x @ v.reshape(-1))
    vv = v.clone().requires_grad_(True)
    g2 = gauss_newton_product(model, F.mse_loss, x, y, vv, create_graph=True)
    (dv,) = torch.autograd.grad((g2 * v).sum(), [vv])
    assert_close(dv, got)  # d/dv (v^T G v0) = G v0 (G symmetric)


def test_gauss_newton_bad_input_and_state_on_error():
    model = make_mlp([2, 2], "tanh", seed=0)
    model.train()
    x = torch.randn(3, 2, dtype=DTYPE)
    y = torch.randn(3, 2, dtype=DTYPE)
    v = [torch.randn_like(p) for p in model.parameters()]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gauss_newton_product(lambda t: t, F.mse_loss, x, y, v)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gauss_newton_product(model, None, x, y, v)
    with pytest.raises(ValueError, match=r"v\[0\] has shape \(2,\)"):
        gauss_newton_product(model, F.mse_loss, x, y, [torch.ones(2), v[1]])
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        gauss_newton_product(model, lambda o, t: (o - t) ** 2, x, y, v)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        gauss_newton_product(model, F.mse_loss, x, torch.randn(5, 7, dtype=DTYPE), v)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None and p.requires_grad
    assert model.training


def test_exports():
    import torch_secorder
    from torch_secorder.core import hvp

    for name in ("approximate_hvp", "gauss_newton_product"):
        assert name in hvp.__all__
        assert getattr(torch_secorder, name) is getattr(hvp, name)
    assert TOL == 1e-10
