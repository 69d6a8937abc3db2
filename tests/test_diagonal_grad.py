"""The fast diagonals compose with ``torch.func.grad`` and autograd: derivatives, not zeros.

The graph and layer routes compute without autograd; a caller who differentiates the
diagonal (inside a ``torch.func`` transform, or through tensors that require grad)
gets the sweep, whose result carries the derivatives.  Oracle: the derivative of the
diagonal of the dense Hessian (``torch.func.hessian``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from torch_secorder.func import diagonal_plan, fast_hessian_diagonal, ggn_diagonal

DT = torch.float64


def problem(act: str, loss: str, seed: int, n: int = 5):
    torch.manual_seed(seed)
    acts = {"tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus}
    model = nn.Sequential(nn.Linear(3, 4), acts[act](), nn.Linear(4, 2)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    if loss == "mse":
        y, loss_fn = torch.randn(n, 2, dtype=DT), F.mse_loss
    else:
        y, loss_fn = torch.randint(0, 2, (n,)), F.cross_entropy
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, loss_fn, x, y, params


def flat_of(params):
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def unflat(flat):
        pieces = torch.split(flat, sizes)
        return {k: c.view_as(params[k]) for k, c in zip(names, pieces, strict=True)}

    return torch.cat([params[k].reshape(-1) for k in names]), unflat


@settings(max_examples=10, deadline=None)
@given(
    act=st.sampled_from(["tanh", "silu", "softplus"]),
    loss=st.sampled_from(["mse", "ce"]),
    scaled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grad_of_the_hessian_diagonal_wrt_scale_and_input(act, loss, scaled, seed):
    """Unscaled or scaled by ``s**2`` (a captured tensor), the loss takes the graph route
    without a transform; differentiated, the sweep, whose derivatives match the dense
    Hessian's."""
    model, loss_fn, x, y, params = problem(act, loss, seed)
    flat, unflat = flat_of(params)

    def loss_at(p, s, xx):  # a loss scale and the input, both differentiated below
        value = loss_fn(functional_call(model, p, (xx,)), y)
        return s**2 * value if scaled else value

    def fast_total(s, xx):
        diag = fast_hessian_diagonal(lambda p: loss_at(p, s, xx), params)
        return sum(d.sum() for d in diag.values())

    def dense_total(s, xx):
        return torch.diagonal(hessian(lambda v: loss_at(unflat(v), s, xx))(flat)).sum()

    s = torch.tensor(1.5, dtype=DT)
    with torch.no_grad():  # outside a transform: the fast routes, same value
        routes = set(diagonal_plan(lambda p: loss_at(p, s, x), params).values())
        value = fast_total(s, x)
    assert routes == {"graph"}
    assert torch.allclose(value, dense_total(s, x), atol=1e-10, rtol=0)
    for argnums in (0, 1) if scaled else (1,):
        found = grad(fast_total, argnums=argnums)(s, x)
        expected = grad(dense_total, argnums=argnums)(s, x)
        assert found.abs().max() > 0
        assert torch.allclose(found, expected, atol=1e-10, rtol=0), (found - expected).abs().max()


def test_grad_wrt_the_parameters_gives_third_derivatives():
    model, loss_fn, x, y, params = problem("tanh", "ce", 0)
    flat, unflat = flat_of(params)

    def f(p):
        return loss_fn(functional_call(model, p, (x,)), y)

    def fast_total(p):
        return sum(d.sum() for d in fast_hessian_diagonal(f, p).values())

    found, _ = flat_of(grad(fast_total)(params))
    expected = grad(lambda v: torch.diagonal(hessian(lambda u: f(unflat(u)))(v)).sum())(flat)
    assert torch.allclose(found, expected, atol=1e-10, rtol=0)


def test_autograd_through_a_captured_tensor_that_requires_grad():
    model, loss_fn, x, y, params = problem("silu", "mse", 1)
    flat, unflat = flat_of(params)
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def loss_at(p, scale):
        return scale**2 * loss_fn(functional_call(model, p, (x,)), y)

    # grad mode on and ``s`` requires grad: the routes must carry its derivative
    assert set(diagonal_plan(lambda p: loss_at(p, s), params).values()) == {"sweep"}
    with torch.no_grad():
        assert "sweep" not in set(diagonal_plan(lambda p: loss_at(p, s), params).values())
    diag = fast_hessian_diagonal(lambda p: loss_at(p, s), params)
    (found,) = torch.autograd.grad(sum(d.sum() for d in diag.values()), s)
    expected = grad(
        lambda sc: torch.diagonal(hessian(lambda v: loss_at(unflat(v), sc))(flat)).sum()
    )(s.detach())
    assert torch.allclose(found, expected, atol=1e-10, rtol=0)


def test_vmap_over_loss_scales():
    model, loss_fn, x, y, params = problem("tanh", "mse", 2)
    flat, unflat = flat_of(params)

    def f(p, s):
        return s * loss_fn(functional_call(model, p, (x,)), y) ** 2

    scales = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    found = vmap(lambda s: fast_hessian_diagonal(lambda p: f(p, s), params)["0.weight"])(scales)
    for scale, row in zip(scales, found, strict=True):
        dense = torch.diagonal(hessian(lambda v, s=scale: f(unflat(v), s))(flat))
        assert torch.allclose(row.reshape(-1), dense[: row.numel()], atol=1e-10, rtol=0)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_grad_of_the_ggn_diagonal(loss):
    model, loss_fn, x, y, params = problem("tanh", loss, 3)
    flat, unflat = flat_of(params)

    def fast_total(s, xx):
        diag = ggn_diagonal(
            lambda p: functional_call(model, p, (xx,)), lambda o: s * loss_fn(o, y), params
        )
        return sum(d.sum() for d in diag.values())

    def dense_total(s, xx):
        out_of = lambda v: functional_call(model, unflat(v), (xx,))  # noqa: E731
        out = out_of(flat)
        J = torch.func.jacrev(out_of)(flat).reshape(out.numel(), -1)
        H = hessian(lambda o: s * loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
        return torch.diagonal(J.T @ H @ J).sum()

    s = torch.tensor(1.3, dtype=DT)
    with torch.no_grad():
        value = fast_total(s, x)
    assert torch.allclose(value, dense_total(s, x), atol=1e-10, rtol=0)
    for argnums in (0, 1):
        found = grad(fast_total, argnums=argnums)(s, x)
        expected = grad(dense_total, argnums=argnums)(s, x)
        assert found.abs().max() > 0
        assert torch.allclose(found, expected, atol=1e-10, rtol=0)
