"""Batches that do not fit the model, on the routes without a validating forward of their own.

The empirical Fisher (per-sample gradients) and the loss landscapes run one plain
checking forward pass (``problems._batch_checks.check_batch_fits``): a target of the
wrong shape names both shapes, an input of the wrong dtype both dtypes; nothing of
the user's changes, and a batch that fits still gives the oracle's numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_secorder import ShapeError, empirical_fisher_diagonal, empirical_fisher_trace
from torch_secorder.analysis.landscape import compute_loss_surface_1d, compute_loss_surface_2d


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    return x, y


def _directions(model):
    return [torch.ones_like(p) for p in model.parameters()]


CALLS = {
    "empirical_fisher_diagonal": lambda m, x, y: empirical_fisher_diagonal(m, F.mse_loss, x, y),
    "empirical_fisher_trace": lambda m, x, y: empirical_fisher_trace(m, F.mse_loss, x, y),
    "loss_surface_1d": lambda m, x, y: compute_loss_surface_1d(
        m, F.mse_loss, x, y, _directions(m), num_points=3
    ),
    "loss_surface_2d": lambda m, x, y: compute_loss_surface_2d(
        m, F.mse_loss, x, y, _directions(m), _directions(m), num_points=3
    ),
}


def _snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [(b, b._version, b.clone()) for b in model.buffers()],
        torch.get_rng_state(),
    )


def _assert_unchanged(model, snapshot):
    params, buffers, rng = snapshot
    for p, saved in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, saved)
    for (b, version, value), now in zip(buffers, model.buffers(), strict=True):
        assert now is b and b._version == version and torch.equal(b, value)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_target_that_does_not_fit_names_both_shapes(name):
    model = _model()
    x, _ = _batch()
    bad = torch.zeros(6, 3, dtype=torch.float64)
    before = _snapshot(model)
    with pytest.raises(ShapeError, match=r"\(6, 3\).*\(6, 2\)"):
        CALLS[name](model, x, bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_an_input_of_another_dtype_names_both_dtypes(name):
    model = _model()
    x, y = _batch()
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"torch\.float32.*torch\.float64"):
        CALLS[name](model, x.float(), y)
    _assert_unchanged(model, before)


def test_a_fitting_batch_still_gives_the_oracles_numbers():
    model = _model().eval()
    x, y = _batch()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return F.mse_loss(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    expected = [(grads[k] ** 2).mean(0) for k in params]
    got = empirical_fisher_diagonal(model, F.mse_loss, x, y)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    d = _directions(model)
    alphas, losses = compute_loss_surface_1d(model, F.mse_loss, x, y, d, num_points=3)
    for a, loss in zip(alphas, losses, strict=True):
        moved = {k: v + a * torch.ones_like(v) for k, v in params.items()}
        reference = F.mse_loss(torch.func.functional_call(model, moved, (x,)), y)
        torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
