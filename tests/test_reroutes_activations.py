"""Activations whose derivatives torch lacks: ``F.hardsigmoid`` (no forward AD of its
backward) and ``F.rrelu`` in eval mode (no batching rule).

A layer norm follows the activation; the fast diagonal takes the graph route through
``hardsigmoid`` (a piecewise-linear rule) and, for the layer below ``rrelu`` (no rule),
the layer route, whose products go through the reroutes as the HVPs, the closure form
and the trace do.  Oracle: the dense Hessian of the
same network with the activation written out independently (``clamp`` for the
hard sigmoid, ``where`` for the leaky slope), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_hessian
from torch import nn
from torch.func import functional_call

from torch_secorder import (
    exact_hvp,
    hessian_diagonal,
    hessian_trace,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hvp,
)


def _hard_sigmoid_reference(x):
    return torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


def _rrelu_eval_reference(x, lower=1.0 / 8, upper=1.0 / 3):
    return torch.where(x >= 0, x, x * ((lower + upper) / 2))


class Net(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.activation = activation
        self.norm = nn.LayerNorm(4)
        self.last = nn.Linear(4, 2)

    def forward(self, x):
        return self.last(self.norm(self.activation(self.first(x))))


CASES = {
    "hardsigmoid": (nn.Hardsigmoid(), _hard_sigmoid_reference),
    "rrelu_eval": (nn.RReLU(), _rrelu_eval_reference),
}


def _problem(name):
    torch.manual_seed(3)
    activation, reference = CASES[name]
    model = Net(activation).double().eval()
    with torch.no_grad():
        model.first.weight.mul_(3.0)  # pre-activations on both sides of the kinks
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    params = [p.detach() for p in model.parameters()]  # a list: model order, as the results

    def f(p):
        first_w, first_b, norm_w, norm_b, last_w, last_b = p
        h = reference(F.linear(x, first_w, first_b))
        h = F.layer_norm(h, (4,), norm_w, norm_b)
        return F.mse_loss(F.linear(h, last_w, last_b), y)

    return model, x, y, params, dense_hessian(f, params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_form_hvp_diagonal_trace(name):
    model, x, y, params, H = _problem(name)
    v = [torch.randn_like(p) for p in model.parameters()]
    flat_v = torch.cat([t.flatten() for t in v])
    for strategy in ("vmap", "graph", "graph_batched"):
        hv = model_hvp(model, F.mse_loss, x, y, v, strategy=strategy)
        assert_close(torch.cat([t.flatten() for t in hv]), H @ flat_v)
    diag = model_hessian_diagonal(model, F.mse_loss, x, y)
    assert_close(torch.cat([t.flatten() for t in diag]), H.diagonal())
    assert_close(model_hessian_trace(model, F.mse_loss, x, y), H.trace())


@pytest.mark.parametrize("name", sorted(CASES))
def test_closure_form_hvp_diagonal_trace(name):
    model, x, y, params, H = _problem(name)
    tensors = list(model.parameters())

    def closure():
        return F.mse_loss(model(x), y)

    v = [torch.randn_like(p) for p in tensors]
    hv = exact_hvp(closure, tensors, v)
    assert_close(torch.cat([t.flatten() for t in hv]), H @ torch.cat([t.flatten() for t in v]))
    diag = hessian_diagonal(closure, tensors)
    assert_close(torch.cat([t.flatten() for t in diag]), H.diagonal())
    assert_close(hessian_trace(closure, tensors), H.trace())


def test_the_reroutes_keep_torchs_values():
    x = torch.linspace(-5, 5, 41, dtype=torch.float64)
    from torch_secorder.func._fixes import differentiable

    assert torch.equal(differentiable(F.hardsigmoid)(x), F.hardsigmoid(x))
    assert_close(differentiable(lambda t: F.rrelu(t, training=False))(x), F.rrelu(x))
    out = functional_call(nn.RReLU().eval(), {}, (x,))
    assert_close(differentiable(nn.RReLU().eval())(x), out)
