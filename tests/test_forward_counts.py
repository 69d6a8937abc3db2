"""No per-probe forward pass: the model runs as often for 6 vectors as for 2 (one chunk).

Counted with a forward pre-hook on the model (a vmapped call counts once).  Each number
is also checked against the dense oracle, so a route that skips work is caught too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_mlp
from torch import nn
from torch.func import functional_call

from torch_secorder import model_hessian_trace_estimate
from torch_secorder.operators import GGNOperator, HessianOperator

DTYPE = torch.float64


def _setup(hook: bool = False):
    g = torch.Generator().manual_seed(0)
    model = make_mlp([3, 4, 2], "tanh", 0)
    if hook:  # a full backward hook: torch.func refuses the model, the graph route runs
        model[2].register_full_backward_hook(lambda m, gi, go: None)
    X = torch.randn(5, 3, generator=g, dtype=DTYPE)
    Y = torch.randn(5, 2, generator=g, dtype=DTYPE)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    return model, X, Y, calls


def _dense(model, X, Y, kind):
    names = [n for n, _ in model.named_parameters()]
    point = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in point]
    flat = torch.cat([p.reshape(-1) for p in point])

    def values(x):
        pieces = torch.split(x, sizes)
        return {n: t.reshape(p.shape) for n, t, p in zip(names, pieces, point, strict=True)}

    def out(x):
        return functional_call(model, values(x), (X,))

    if kind == "hessian":
        return torch.func.hessian(lambda x: nn.functional.mse_loss(out(x), Y))(flat)
    J = torch.func.jacrev(lambda x: out(x).reshape(-1))(flat)
    return J.T @ J * (2.0 / Y.numel())


def _count(calls, fn):
    calls.clear()
    result = fn()
    return len(calls), result


@pytest.mark.parametrize(
    ("kind", "strategy", "hook"),
    [
        ("hessian", "vmap", False),
        ("hessian", "graph_batched", False),
        ("hessian", "graph", False),
        ("ggn", None, False),
        ("ggn", None, True),
    ],
)
def test_operator_products_share_the_forward_pass(kind, strategy, hook):
    model, X, Y, calls = _setup(hook)
    # Without the graph cache: every product rebuilds (test_operators_cache counts those).
    if kind == "hessian":
        A = HessianOperator(
            model, nn.MSELoss(), (X, Y), strategy=strategy, chunk_size=6, cache_batches=0
        )
    else:
        A = GGNOperator(model, nn.MSELoss(), (X, Y), chunk_size=6, cache_batches=0)
    dense = _dense(make_mlp([3, 4, 2], "tanh", 0), X, Y, kind)  # the same net, no hooks
    counts = []
    for k in (2, 6):
        V = torch.randn(A.shape[0], k, generator=torch.Generator().manual_seed(k), dtype=DTYPE)
        count, product = _count(calls, lambda V=V: A @ V)
        assert_close(product, dense @ V)
        counts.append(count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("strategy", ["vmap", "graph", "graph_batched"])
def test_hutchinson_probes_share_the_forward_pass(strategy):
    model, X, Y, calls = _setup()
    counts = []
    for m in (2, 6):
        g = torch.Generator().manual_seed(m)
        count, est = _count(
            calls,
            lambda m=m, g=g: model_hessian_trace_estimate(
                model, nn.MSELoss(), X, Y, m, generator=g, strategy=strategy, chunk_size=6
            ),
        )
        assert est.samples.shape == (m,)
        counts.append(count)
    assert counts[0] == counts[1], counts
