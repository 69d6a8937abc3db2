"""The graph route on MLPs through every elementwise activation torch ships, against the dense
Hessian.

The graph route needs each activation's first and second derivatives.  They come
from autograd's double backward of the recorded call (nested forward mode under
``no_grad`` has no rule for ``silu_backward`` or ``mish``), or are zero for the
piecewise-linear activations (``hardsigmoid`` has no double backward at all).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torch_secorder.core import (
    hessian_diagonal,
    hessian_trace,
    model_hessian_diagonal,
    model_hessian_trace,
)
from torch_secorder.func import diagonal_plan, ggn_diagonal
from torch_secorder.problems._problem import module_problem

DT = torch.float64


class Hardsigmoid(nn.Module):
    """``hardsigmoid`` written with ``clamp`` (which has a double backward), for the oracle."""

    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0.0, 1.0)


#: name -> (the activation, the same function for the oracle where torch's lacks a rule)
ACTIVATIONS = {
    "silu": (nn.SiLU, None),
    "gelu": (nn.GELU, None),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), None),
    "elu": (lambda: nn.ELU(alpha=0.7), None),
    "celu": (lambda: nn.CELU(alpha=1.3), None),
    "selu": (nn.SELU, None),
    "softplus": (lambda: nn.Softplus(beta=2.0, threshold=3.0), None),
    "mish": (nn.Mish, None),
    "hardswish": (nn.Hardswish, None),
    "hardsigmoid": (nn.Hardsigmoid, Hardsigmoid),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), None),
    "relu": (nn.ReLU, None),
    "relu6": (nn.ReLU6, None),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 1.5), None),
    "logsigmoid": (nn.LogSigmoid, None),
    "softsign": (nn.Softsign, None),
    "tanhshrink": (nn.Tanhshrink, None),
    "sigmoid": (nn.Sigmoid, None),
    "tanh": (nn.Tanh, None),
    "softshrink": (lambda: nn.Softshrink(0.3), None),
    "hardshrink": (lambda: nn.Hardshrink(0.3), None),
    "threshold": (lambda: nn.Threshold(0.1, -0.2), None),
    "functional_silu": (lambda: Lambda(F.silu), None),
    "functional_relu6": (lambda: Lambda(F.relu6), None),
    "tensor_relu": (lambda: Lambda(torch.Tensor.relu), None),
}


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def build(act: str, seed: int, n: int, loss: str):
    torch.manual_seed(seed)
    make, _ = ACTIVATIONS[act]
    model = nn.Sequential(nn.Linear(3, 5), make(), nn.Linear(5, 4), make(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(n, 3, dtype=DT) * 2
    if loss == "mse":
        return model, x, torch.randn(n, 3, dtype=DT), nn.MSELoss()
    return model, x, torch.randint(0, 3, (n,)), nn.CrossEntropyLoss()


def oracle_model(model: nn.Sequential, act: str) -> nn.Sequential:
    """The same network, with the oracle's spelling of the activation where needed."""
    _, reference = ACTIVATIONS[act]
    if reference is None:
        return model
    layers = [reference() if not isinstance(m, nn.Linear) else m for m in model]
    return nn.Sequential(*layers)


def flat_of(model):
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for p in model.parameters()]
    sizes = [v.numel() for v in values]

    def unflat(flat):
        pieces = torch.split(flat, sizes)
        return {n: c.view_as(v) for n, c, v in zip(names, pieces, values, strict=True)}

    return torch.cat([v.reshape(-1) for v in values]), unflat, sizes


def dense_diagonal(model, loss_fn, x, y):
    flat, unflat, sizes = flat_of(model)
    H = torch.autograd.functional.hessian(
        lambda v: loss_fn(functional_call(model, unflat(v), (x,)), y), flat
    )
    return torch.split(torch.diagonal(H), sizes)


def dense_ggn_diagonal(model, loss_fn, x, y):
    flat, unflat, sizes = flat_of(model)

    def out_of(v):
        return functional_call(model, unflat(v), (x,))

    out = out_of(flat)
    J = jacrev(out_of)(flat).reshape(out.numel(), -1)
    H = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return torch.split(torch.diagonal(J.T @ H @ J), sizes)


@settings(max_examples=40, deadline=None)
@given(
    act=st.sampled_from(sorted(ACTIVATIONS)),
    loss=st.sampled_from(["mse", "ce"]),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_graph_route_through_the_activation_matches_dense(act, loss, n, seed):
    model, x, y, loss_fn = build(act, seed, n, loss)
    with module_problem(model, loss_fn, x, y) as problem:
        assert set(diagonal_plan(problem.pure, problem.primals)) == {"graph"}
    dense = dense_diagonal(oracle_model(model, act), loss_fn, x, y)
    trace = float(sum(d.sum() for d in dense))
    params = list(model.parameters())

    def closure():
        return loss_fn(model(x), y)

    for found in (
        model_hessian_diagonal(model, loss_fn, x, y, progress=False),
        hessian_diagonal(closure, params, progress=False),
    ):
        for a, b in zip(found, dense, strict=True):
            assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0), (
                (a.reshape(-1) - b).abs().max()
            )
    assert math.isclose(float(model_hessian_trace(model, loss_fn, x, y)), trace, abs_tol=1e-9)
    assert math.isclose(float(hessian_trace(closure, params)), trace, abs_tol=1e-9)


@pytest.mark.parametrize("act", ["silu", "mish", "hardswish", "hardsigmoid", "selu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_graph_route_through_the_activation(act, loss):
    model, x, y, loss_fn = build(act, 7, 4, loss)
    params = {k: v.detach() for k, v in model.named_parameters()}
    found = ggn_diagonal(lambda p: functional_call(model, p, (x,)), lambda o: loss_fn(o, y), params)
    dense = dense_ggn_diagonal(oracle_model(model, act), loss_fn, x, y)
    for a, b in zip(found.values(), dense, strict=True):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)


def test_an_activation_without_derivatives_has_none():
    """Where torch has no derivative for an activation, the rules' derivatives are
    ``None`` (the graph route does not cross it; the other routes decide); the
    piecewise-linear rules (as registered) give a zero second derivative."""

    class NoDerivative(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("no derivative here")

    from torch_secorder.func._rules import elementwise_derivatives, rule_for
    from torch_secorder.func._tape import Call

    def _derivatives(call, z):
        rule = rule_for(call)
        return elementwise_derivatives(call, z, getattr(rule, "piecewise_linear", False))

    z = torch.randn(3, 2, dtype=DT)
    assert _derivatives(Call(NoDerivative.apply, (z,), {}, z), z) is None
    d1, d2 = _derivatives(Call(F.hardsigmoid, (z,), {}, F.hardsigmoid(z)), z)
    inside = (z.abs() < 3).to(DT)
    assert torch.equal(d1, inside / 6) and torch.equal(d2, torch.zeros_like(z))
    d1, d2 = _derivatives(Call(F.relu6, (z * 4,), {}, F.relu6(z * 4)), z * 4)
    inside = ((z * 4 > 0) & (z * 4 < 6)).to(DT)
    assert torch.equal(d1, inside) and torch.equal(d2, torch.zeros_like(z))
