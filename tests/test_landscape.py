"""Loss surfaces against a plain loop over functional_call in float64; the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_secorder.analysis import (
    compute_loss_surface_1d,
    compute_loss_surface_2d,
    create_random_direction,
)

DT = torch.float64


def problem(seed: int, batch: int = 6):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.0), nn.Linear(5, 2)
    ).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
        model[1].running_mean.copy_(torch.randn(5, generator=g, dtype=DT))
    x = torch.randn(batch, 3, generator=g, dtype=DT)
    y = torch.randn(batch, 2, generator=g, dtype=DT)
    dirs = [
        [torch.randn(p.shape, generator=g, dtype=DT) for p in model.parameters()] for _ in range(2)
    ]
    return model, x, y, dirs


def oracle(model, loss_fn, x, y, coeffs, dirs):
    """Loss at theta + sum_k c_k d_k, one point at a time, on a copy of the model."""
    clone = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    base = [p.detach() for p in model.parameters()]
    values = {
        n: b + sum(c * d[i] for c, d in zip(coeffs, dirs, strict=True))
        for i, (n, b) in enumerate(zip(names, base, strict=True))
    }
    with torch.no_grad():
        return loss_fn(functional_call(clone, values, (x,)), y)


def snapshot(model):
    return (
        [
            (p, p.detach().clone(), p.data_ptr(), p.requires_grad, p.grad)
            for p in model.parameters()
        ],
        [b.clone() for b in model.buffers()],
        [m.training for m in model.modules()],
    )


def assert_untouched(model, snap):
    params, buffers, modes = snap
    for (p, value, ptr, flag, grad), q in zip(params, model.parameters(), strict=True):
        assert p is q and q.data_ptr() == ptr and torch.equal(q, value)
        assert q.requires_grad == flag and q.grad is grad
    for b, saved in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, saved)
    assert [m.training for m in model.modules()] == modes


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.sampled_from([None, 1, 3]))
def test_surface_1d_matches_pointwise_oracle(seed, train, chunk_size):
    model, x, y, (d, _) = problem(seed)
    model.train(train)
    loss_fn = nn.MSELoss()
    snap = snapshot(model)
    alphas, losses = compute_loss_surface_1d(
        model, loss_fn, x, y, d, (-0.5, 0.5), 7, chunk_size=chunk_size
    )
    assert_untouched(model, snap)
    torch.testing.assert_close(alphas, torch.linspace(-0.5, 0.5, 7, dtype=DT))
    expected = torch.stack([oracle(model, loss_fn, x, y, [a], [d]) for a in alphas])
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    # alpha = 0 is the loss itself (on a copy: a training-mode call updates batch norm)
    with torch.no_grad():
        loss = loss_fn(copy.deepcopy(model)(x), y)
    torch.testing.assert_close(losses[3], loss, rtol=1e-12, atol=1e-14)


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 1, 4]))
def test_surface_2d_matches_pointwise_oracle(seed, chunk_size):
    model, x, y, (d1, d2) = problem(seed)
    model.eval()
    loss_fn = nn.MSELoss()
    snap = snapshot(model)
    a, b, L = compute_loss_surface_2d(
        model, loss_fn, x, y, d1, d2, (-1.0, 1.0), (-0.5, 0.5), 5, chunk_size=chunk_size
    )
    assert_untouched(model, snap)
    torch.testing.assert_close(a, torch.linspace(-1, 1, 5, dtype=DT))
    torch.testing.assert_close(b, torch.linspace(-0.5, 0.5, 5, dtype=DT))
    expected = torch.stack(
        [torch.stack([oracle(model, loss_fn, x, y, [ai, bj], [d1, d2]) for bj in b]) for ai in a]
    )
    torch.testing.assert_close(L, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(L[2, 2], loss_fn(model(x), y), rtol=1e-12, atol=1e-14)


class ItemNet(nn.Module):
    """Calls .item() in forward: vmap cannot batch it, the loop fallback must."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1).to(DT)

    def forward(self, x):
        scale = 1.0 + 0.0 * float(self.lin.weight.sum())
        return self.lin(x) * scale


def test_fallback_loop_when_vmap_cannot_batch():
    model = ItemNet()
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    d = [torch.ones_like(p) for p in model.parameters()]
    alphas, losses = compute_loss_surface_1d(model, nn.MSELoss(), x, y, d, num_points=5)
    expected = torch.stack([oracle(model, nn.MSELoss(), x, y, [a], [d]) for a in alphas])
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


def test_model_untouched_when_loss_raises():
    model, x, y, (d, _) = problem(1)
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    snap = snapshot(model)
    calls = []

    def flaky(out, target):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return nn.functional.mse_loss(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        compute_loss_surface_1d(model, flaky, x, y, d, num_points=4, chunk_size=1)
    assert_untouched(model, snap)


def direction_models():
    """Linear, convolution, batch norm (1-D scale and shift) and a frozen tensor, float64."""
    return st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 3)).map(
        lambda t: _direction_model(*t)
    )


def _direction_model(seed: int, channels: int, hidden: int):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, channels, 3),
        nn.BatchNorm2d(channels),
        nn.Flatten(),
        nn.Linear(4 * channels, hidden),
    ).to(DT)
    model[1].bias.requires_grad_(False)
    return model, seed


@settings(max_examples=15, deadline=None)
@given(direction_models())
def test_create_random_direction_default_has_unit_norm_per_tensor(case):
    """0.0.1's direction: a Gaussian scaled to unit Frobenius norm, every tensor (biases too)."""
    model, seed = case
    before = [p.detach().clone() for p in model.parameters()]
    d = create_random_direction(model, generator=torch.Generator().manual_seed(seed))
    assert len(d) == len(before)
    for p, di in zip(model.parameters(), d, strict=True):
        assert di.shape == p.shape and di.dtype == p.dtype and not di.requires_grad
        torch.testing.assert_close(di.norm(), torch.tensor(1.0, dtype=DT), rtol=1e-14, atol=0)
    # a Gaussian direction: the normalised draw of the same generator
    g = torch.Generator().manual_seed(seed)
    for p, di in zip(model.parameters(), d, strict=True):
        raw = torch.randn(p.shape, generator=g, dtype=DT)
        torch.testing.assert_close(di, raw / raw.norm(), rtol=1e-14, atol=1e-15)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None
    ignored = create_random_direction(model, generator=torch.Generator(), ignore_1d=True)
    for p, di in zip(model.parameters(), ignored, strict=True):
        if p.dim() < 2:
            assert torch.equal(di, torch.zeros_like(p))
        else:
            torch.testing.assert_close(di.norm(), torch.tensor(1.0, dtype=DT))


@settings(max_examples=15, deadline=None)
@given(direction_models())
def test_create_random_direction_filter_normalised(case):
    """Li et al. 2018: each filter of d has the norm of the parameter's filter; 1-D ignored."""
    model, seed = case
    g = torch.Generator().manual_seed(seed)
    d = create_random_direction(model, normalization="filter", generator=g)
    for p, di in zip(model.parameters(), d, strict=True):
        assert di.shape == p.shape
        if p.dim() < 2:
            assert torch.equal(di, torch.zeros_like(p))
        else:
            torch.testing.assert_close(
                di.reshape(p.shape[0], -1).norm(dim=1),
                p.detach().reshape(p.shape[0], -1).norm(dim=1),
                rtol=1e-13,
                atol=0,
            )
    # each filter is the same Gaussian draw, rescaled
    g = torch.Generator().manual_seed(seed)
    for p, di in zip(
        [p for p in model.parameters() if p.dim() >= 2], [x for x in d if x.dim() >= 2]
    ):
        raw = torch.randn(p.shape, generator=g, dtype=DT).reshape(p.shape[0], -1)
        rows = p.detach().reshape(p.shape[0], -1)
        expected = raw * (rows.norm(dim=1, keepdim=True) / raw.norm(dim=1, keepdim=True))
        torch.testing.assert_close(di.reshape(rows.shape), expected, rtol=1e-13, atol=1e-15)
    again = create_random_direction(
        model, normalization="filter", generator=torch.Generator().manual_seed(seed)
    )
    assert all(torch.equal(a, b) for a, b in zip(d, again, strict=True))
    full = create_random_direction(model, normalization="filter", generator=g, ignore_1d=False)
    for p, di in zip(model.parameters(), full, strict=True):
        if p.dim() < 2:
            torch.testing.assert_close(di.norm(), p.detach().norm())
    assert not any(di.requires_grad for di in full)


def test_create_random_direction_zero_filter_and_global_rng():
    model = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        model.weight[0].zero_()
    d = create_random_direction(model, normalization="filter")
    assert torch.equal(d[0][0], torch.zeros(3, dtype=DT))
    torch.testing.assert_close(d[0][1].norm(), model.weight[1].detach().norm())
    torch.manual_seed(3)
    first = create_random_direction(model)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, create_random_direction(model)))


def test_create_random_direction_bad_input():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="normalization must be one of 'unit', 'filter', got 'l2'"):
        create_random_direction(model, normalization="l2")
    with pytest.raises(TypeError, match="normalization must be a str"):
        create_random_direction(model, normalization=1)
    with pytest.raises(TypeError, match="ignore_1d must be a bool or None, got int"):
        create_random_direction(model, ignore_1d=1)


def test_surface_along_filter_normalised_directions_matches_oracle():
    model, x, y, _ = problem(7)
    g = torch.Generator().manual_seed(1)
    d1 = create_random_direction(model, normalization="filter", generator=g)
    d2 = create_random_direction(model, normalization="filter", generator=g)
    loss_fn = nn.MSELoss()
    alphas, betas, losses = compute_loss_surface_2d(model, loss_fn, x, y, d1, d2, num_points=4)
    expected = torch.stack(
        [
            torch.stack([oracle(model, loss_fn, x, y, (a, b), [d1, d2]) for b in betas])
            for a in alphas
        ]
    )
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


def test_bad_input():
    model, x, y, (d, _) = problem(0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        compute_loss_surface_1d(lambda t: t, nn.MSELoss(), x, y, d)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        create_random_direction([torch.ones(2)])
    with pytest.raises(ValueError, match="direction must have one tensor per parameter"):
        compute_loss_surface_1d(model, nn.MSELoss(), x, y, d[:-1])
    with pytest.raises(ValueError, match=r"direction\[0\] has shape"):
        compute_loss_surface_1d(model, nn.MSELoss(), x, y, [d[0].T, *d[1:]])
    with pytest.raises(ValueError, match="direction2 must have one tensor"):
        compute_loss_surface_2d(model, nn.MSELoss(), x, y, d, d[:2])
    with pytest.raises(ValueError, match="num_points"):
        compute_loss_surface_1d(model, nn.MSELoss(), x, y, d, num_points=0)
    with pytest.raises(ValueError, match="alpha_range"):
        compute_loss_surface_1d(model, nn.MSELoss(), x, y, d, alpha_range=(1.0,))
    with pytest.raises(ValueError, match="beta_range"):
        compute_loss_surface_2d(model, nn.MSELoss(), x, y, d, d, beta_range="ab")
    with pytest.raises(ValueError, match="scalar"):
        compute_loss_surface_1d(model, nn.MSELoss(reduction="none"), x, y, d)
