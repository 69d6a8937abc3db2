"""The user's own pending graph survives a curvature call.

"Compute the loss, log the curvature, then ``loss.backward()``": the curvature call
must not write any tensor the user's graph saved (batch norm's running statistics,
a call counter), so the backward pass works and gives the same ``.grad`` as without
the curvature call; in training and evaluation mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_secorder import (
    empirical_fisher_diagonal,
    gauss_newton_product,
    generalized_fisher_diagonal,
    model_eigenvalues,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hvp,
)

LOSS = nn.functional.mse_loss


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x)) * self.calls


def _bn1d():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.randn(6, 3), torch.randn(6, 2)


def _bn2d():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2)
    )
    return model, torch.randn(5, 2, 4, 4), torch.randn(5, 2)


def _counting():
    return _Counting(), torch.randn(6, 3), torch.randn(6, 2)


MODELS = {"bn1d": _bn1d, "bn2d": _bn2d, "counting": _counting}


def _ones(model):
    return [torch.ones_like(p) for p in model.parameters()]


CALLS = {
    "trace": lambda m, x, y, out: model_hessian_trace(m, LOSS, x, y),
    "trace-estimate": lambda m, x, y, out: model_hessian_trace(m, LOSS, x, y, num_samples=3),
    "diagonal": lambda m, x, y, out: model_hessian_diagonal(m, LOSS, x, y, progress=False),
    "hvp-vmap": lambda m, x, y, out: model_hvp(m, LOSS, x, y, _ones(m), strategy="vmap"),
    "hvp-graph": lambda m, x, y, out: model_hvp(m, LOSS, x, y, _ones(m), strategy="graph"),
    "hvp-graph-batched": lambda m, x, y, out: model_hvp(
        m, LOSS, x, y, _ones(m), strategy="graph_batched"
    ),
    "ggn": lambda m, x, y, out: gauss_newton_product(m, LOSS, x, y, _ones(m)),
    "fisher-empirical": lambda m, x, y, out: empirical_fisher_diagonal(m, LOSS, x, y),
    "fisher-generalized": lambda m, x, y, out: generalized_fisher_diagonal(m, out, y, "mse"),
    "eigenvalues": lambda m, x, y, out: model_eigenvalues(
        m, lambda mm, a, b: LOSS(mm(a), b), x, y, 1, num_iterations=5
    ),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("call", list(CALLS))
def test_loss_backward_after_a_curvature_call(model_name, mode, call):
    torch.manual_seed(0)
    model, x, y = MODELS[model_name]()
    model.train(mode == "train")
    reference = copy.deepcopy(model)
    versions = {name: b._version for name, b in model.named_buffers()}
    objects = {name: b for name, b in model.named_buffers()}

    # the user's step, without a curvature call
    LOSS(reference(x), y).backward()

    # the user's step, logging the curvature in between
    out = model(x)
    loss = LOSS(out, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {name: b._version for name, b in model.named_buffers()}
    try:
        CALLS[call](model, x, y, out)
    except (RuntimeError, ValueError):
        # per-sample batch norm in training mode may be refused; the user's graph
        # must survive a call that raises too
        assert call == "fisher-empirical" and mode == "train"
    loss.backward()

    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for name, b in model.named_buffers():
        assert b is objects[name], name
        assert b._version == versions[name], name
        assert torch.equal(b, state[name]), name
