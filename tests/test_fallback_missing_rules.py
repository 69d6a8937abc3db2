"""An operator without a batching rule takes the autograd-graph route.

``F.rrelu`` in training mode: ``rrelu_with_noise`` has no vmap rule, which torch
says in a message that ``problems._fallback.FUNCTIONAL_REFUSALS`` recognises; every
quantity is then computed on the autograd graph.  Its random slopes are drawn
once, by the first (plain) forward pass, and replayed in every later evaluation
(``problems._random_draws``), derivatives included.  Oracle: double backward of one
plain forward pass drawn from the same seed (the same slopes), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from torch_secorder import (
    compute_loss_surface_1d,
    hessian_trace,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hvp,
)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _rrelu_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.LayerNorm(4), nn.Linear(4, 2))
    model = model.double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    return model, x, y


def _graph_hessian(model, x, y, seed):
    """Dense Hessian by double backward of one plain forward pass drawn after ``seed``."""
    params = list(model.parameters())
    torch.manual_seed(seed)
    loss = F.mse_loss(model(x), y)
    grads = _flat(torch.autograd.grad(loss, params, create_graph=True))
    rows = [_flat(torch.autograd.grad(g, params, retain_graph=True)) for g in grads]
    return torch.stack(rows)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "graph", "graph_batched"])
def test_training_mode_rrelu_hvp(strategy):
    model, x, y = _rrelu_problem()
    H = _graph_hessian(model, x, y, seed=5)
    v = [torch.randn_like(p) for p in model.parameters()]
    torch.manual_seed(5)
    hv = model_hvp(model, F.mse_loss, x, y, v, strategy=strategy)
    assert_close(_flat(hv), H @ _flat(v))


def test_training_mode_rrelu_diagonal_and_trace():
    model, x, y = _rrelu_problem()
    H = _graph_hessian(model, x, y, seed=7)
    torch.manual_seed(7)
    assert_close(_flat(model_hessian_diagonal(model, F.mse_loss, x, y)), H.diagonal())
    torch.manual_seed(7)
    assert_close(model_hessian_trace(model, F.mse_loss, x, y), H.trace())


def test_closure_trace_and_landscape_replay_the_slopes():
    model, x, y = _rrelu_problem()
    H = _graph_hessian(model, x, y, seed=9)
    torch.manual_seed(9)
    assert_close(
        hessian_trace(lambda: F.mse_loss(model(x), y), list(model.parameters())), H.trace()
    )
    # A landscape holds the slopes of its first evaluation (at the point itself): there
    # its value is the plain forward's; elsewhere entries that were positive keep slope 1.
    direction = [torch.randn_like(p) for p in model.parameters()]
    torch.manual_seed(11)
    alphas, losses = compute_loss_surface_1d(model, F.mse_loss, x, y, direction, num_points=3)
    assert float(alphas[1]) == 0.0
    torch.manual_seed(11)
    assert_close(losses[1], F.mse_loss(model(x), y))
