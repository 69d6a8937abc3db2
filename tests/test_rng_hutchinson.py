"""Hutchinson without a ``generator`` draws from the global RNG, as ``torch.randn`` does.

Two calls in a row give two estimates (new probes); ``torch.manual_seed(s)`` before a
call reproduces it; and the global RNG is left advanced by exactly the probes drawn
(for a loss that draws nothing itself), whatever the strategy or chunking.  Every
sample is ``v^T H v`` for the probes the global RNG gives, against the dense
float64 Hessian.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dense_hessian, make_mlp
from torch.func import functional_call

from torch_secorder import hessian_trace, model_eigenvalues, model_hessian_trace_estimate
from torch_secorder.core.hessian_trace import hessian_trace_estimate
from torch_secorder.linalg.probes import draw_probes

DTYPE = torch.float64
STRATEGIES = ("vmap", "graph", "graph_batched")
M = 6


def _mlp():
    model = make_mlp([3, 4, 2], "tanh", seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 2, (5,), generator=g)
    names = [k for k, _ in model.named_parameters()]
    params = [v.detach() for v in model.parameters()]  # a list: model.parameters() order
    H = dense_hessian(
        lambda p: torch.nn.functional.cross_entropy(
            functional_call(model, dict(zip(names, p)), (x,)), y
        ),
        params,
    )
    return model, x, y, H


@pytest.fixture(scope="module")
def mlp():
    return _mlp()


def _model_estimate(model, x, y, strategy, chunk_size):
    return model_hessian_trace_estimate(
        model,
        torch.nn.functional.cross_entropy,
        x,
        y,
        M,
        strategy=strategy,
        chunk_size=chunk_size,
        progress=False,
    )


def _closure_estimate(model, x, y, strategy, chunk_size):
    params = list(model.parameters())
    return hessian_trace_estimate(
        lambda: torch.nn.functional.cross_entropy(model(x), y),
        params,
        M,
        strategy=strategy,
        chunk_size=chunk_size,
        progress=False,
    )


@pytest.mark.parametrize("form", ["model", "closure"])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_probes_come_from_the_global_rng_and_advance_it(mlp, form, strategy, chunk_size):
    model, x, y, H = mlp
    estimate = _model_estimate if form == "model" else _closure_estimate
    torch.manual_seed(21)
    first = estimate(model, x, y, strategy, chunk_size)
    after_first = torch.get_rng_state()
    second = estimate(model, x, y, strategy, chunk_size)
    torch.manual_seed(21)
    again = estimate(model, x, y, strategy, chunk_size)

    assert not torch.equal(first.samples, second.samples), "two calls, two sets of probes"
    torch.testing.assert_close(again.samples, first.samples, rtol=0, atol=0)
    # the probes are those the global RNG gives from the seed, in chunks as drawn
    torch.manual_seed(21)
    step = M if chunk_size is None else chunk_size
    probes = torch.cat(
        [draw_probes(min(step, M - s), H.shape[0], dtype=DTYPE) for s in range(0, M, step)]
    )
    assert torch.equal(torch.get_rng_state(), after_first), "the RNG advances by the probes"
    torch.testing.assert_close(
        first.samples, ((probes @ H) * probes).sum(1), rtol=1e-10, atol=1e-10
    )


def test_the_float_api_is_reproducible_by_seed_only(mlp):
    model, x, y, _ = mlp
    params = list(model.parameters())

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)

    torch.manual_seed(5)
    a = hessian_trace(loss, params, num_samples=3, progress=False)
    b = hessian_trace(loss, params, num_samples=3, progress=False)
    torch.manual_seed(5)
    c = hessian_trace(loss, params, num_samples=3, progress=False)
    assert float(a) != float(b)
    assert float(a) == float(c)


def test_eigenvalue_start_vector_comes_from_the_global_rng(mlp):
    model, x, y, H = mlp

    def loss(m, a, b):
        return torch.nn.functional.cross_entropy(m(a), b)

    before = torch.get_rng_state()
    values, _ = model_eigenvalues(model, loss, x, y, 1, num_iterations=H.shape[0], tol=1e-12)
    assert not torch.equal(torch.get_rng_state(), before)
    exact = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(values[0], exact[exact.abs().argmax()], rtol=1e-8, atol=1e-10)
