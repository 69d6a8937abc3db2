"""The exact GGN diagonal against the dense J^T H_out J, on every route."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torch_secorder.func import ggn_diagonal

sys.path.insert(0, str(Path(__file__).parent))
from test_fast_diagonal import ACTS, DT, build, loss_and_target  # noqa: E402


def dense_ggn_diagonal(model, loss_fn, x, y, params):
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def out_of(flat):
        pieces = torch.split(flat, sizes)
        p = {k: c.view_as(params[k]) for k, c in zip(names, pieces, strict=False)}
        return functional_call(model, p, (x,))

    flat = torch.cat([params[k].reshape(-1) for k in names])
    out = out_of(flat)
    J = jacrev(out_of)(flat).reshape(out.numel(), -1)
    H = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ H @ J
    return dict(zip(names, torch.split(torch.diagonal(G), sizes), strict=False))


@settings(max_examples=12, deadline=None)
@given(
    arch=st.sampled_from(["mlp", "layernorm", "bn_eval", "conv1d", "attention", "tied"]),
    act=st.sampled_from(sorted(ACTS)),
    loss=st.sampled_from(["mse", "ce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_ggn(arch, act, loss, reduction, seed):
    n, classes = 3, 3
    model, x = build(arch, act, seed, n, classes)
    loss_fn, y = loss_and_target(loss, reduction, n, classes)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fast = ggn_diagonal(lambda p: functional_call(model, p, (x,)), lambda o: loss_fn(o, y), params)
    dense = dense_ggn_diagonal(model, loss_fn, x, y, params)
    for k in params:
        assert torch.allclose(fast[k].reshape(-1), dense[k], atol=1e-10, rtol=0), k


@pytest.mark.parametrize("chunk_size", [1, None])
def test_ggn_is_hessian_for_linear_model_and_psd_for_convex_loss(chunk_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    params = {k: v.detach() for k, v in model.named_parameters()}
    ce = nn.CrossEntropyLoss()
    fast = ggn_diagonal(
        lambda p: functional_call(model, p, (x,)), lambda o: ce(o, y), params, chunk_size
    )
    assert all(bool((d >= -1e-15).all()) for d in fast.values())
    # the last layer enters linearly: its GGN block is its Hessian block
    from torch_secorder.func import hessian_diagonal

    h = hessian_diagonal(lambda p: ce(functional_call(model, p, (x,)), y), params)
    assert torch.allclose(fast["2.weight"], h["2.weight"], atol=1e-12, rtol=0)
