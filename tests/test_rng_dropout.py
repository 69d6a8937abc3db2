"""Dropout in training mode: the curvature is that of the loss a plain forward pass
would compute at the same point of the global random stream.

The oracle is independent of the library: after ``torch.manual_seed(s)`` a plain
``loss_fn(model(x), y)`` runs under a recording dispatch mode (the values of every
random operator, in call order: the dropout masks as torch's own kernels draw them);
the dense Hessian is then assembled row by row by double backward through one forward
pass that replays those values, in float64 (layer norms computed from their
definition there: torch 2.13's double backward of ``layer_norm`` is wrong).  Every
route must return that Hessian's numbers, and leave the global RNG exactly where one
plain forward pass leaves it (plus the probes it draws without a ``generator``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from torch_secorder import (
    gauss_newton_product,
    model_eigenvalues,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hessian_trace_estimate,
    model_hvp,
)
from torch_secorder.core import hvp as core_hvp
from torch_secorder.linalg.probes import draw_probes

SEED = 7
TOL = dict(rtol=1e-9, atol=1e-10)


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.nondeterministic_seeded in func.tags:
            assert func is torch.ops.aten.bernoulli_.float, func  # CPU dropout
            self.values.append(args[0].clone())
        return out


class _Replay(TorchDispatchMode):
    def __init__(self, values: list[torch.Tensor]) -> None:
        super().__init__()
        self.values = list(values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            args[0].copy_(self.values.pop(0))
            return args[0]
        return func(*args, **(kwargs or {}))


class _LayerNormByDefinition(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            bound = {**dict(zip(names, args)), **kwargs}
            x, shape, weight, bias = (bound[k] for k in names[:4])
            eps = bound.get("eps", 1e-5)
            dims = tuple(range(-len(shape), 0))
            c = x - x.mean(dims, keepdim=True)
            return c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps) * weight + bias
        return func(*args, **kwargs)


def _plain_draws(model, loss_fn, x, y, seed):
    """The random values of a plain forward pass after ``manual_seed(seed)``, and the
    global RNG state it leaves behind."""
    torch.manual_seed(seed)
    with _Record() as record:
        loss_fn(model(x), y)
    return record.values, torch.get_rng_state()


def _oracle_hessian(model, loss_fn, x, y, draws) -> torch.Tensor:
    params = list(model.parameters())
    with _Replay(draws) as replay, _LayerNormByDefinition(), sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn(model(x), y)
    assert not replay.values, "the oracle's forward pass used fewer random values"
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros_like(p).reshape(-1) if r is None else r.reshape(-1)
                    for r, p in zip(row, params)
                ]
            )
        )
    return torch.stack(rows)


def _encoder() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=4, nhead=2, dim_feedforward=8, dropout=0.3, batch_first=True
    )
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 3, 1)).double().train()
    return model, torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Linear(3, 6),
            nn.Tanh(),
            nn.Dropout(0.4),
            nn.Linear(6, 5),
            nn.Tanh(),
            nn.AlphaDropout(0.2),
            nn.Linear(5, 2),
        )
        .double()
        .train()
    )
    return model, torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(3 * 4, 2)
        )
        .double()
        .train()
    )
    return (
        model,
        torch.randn(4, 2, 4, 4, dtype=torch.float64),
        torch.randn(4, 2, dtype=torch.float64),
    )


MODELS = {"transformer": _encoder, "mlp": _mlp, "cnn": _cnn}
LOSS = nn.functional.mse_loss


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model, x, y = MODELS[request.param]()
    draws, after = _plain_draws(model, LOSS, x, y, SEED)
    assert draws, "the model draws no dropout mask"
    return request.param, model, x, y, _oracle_hessian(model, LOSS, x, y, draws), after


@pytest.mark.parametrize("strategy", ["vmap", "graph", "graph_batched"])
def test_hvp_is_the_plain_losss_hessian_and_advances_the_rng_by_one_forward(case, strategy):
    _, model, x, y, H, after = case
    v = [
        torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(3))
        for p in model.parameters()
    ]
    torch.manual_seed(SEED)
    hv = model_hvp(model, LOSS, x, y, v, strategy=strategy)
    torch.testing.assert_close(_flat(hv), H @ _flat(v), **TOL)
    assert torch.equal(torch.get_rng_state(), after)


def test_diagonal_and_trace_are_the_plain_losss(case):
    _, model, x, y, H, after = case
    torch.manual_seed(SEED)
    diag = model_hessian_diagonal(model, LOSS, x, y, progress=False)
    torch.testing.assert_close(_flat(diag), torch.diagonal(H), **TOL)
    assert torch.equal(torch.get_rng_state(), after)
    torch.manual_seed(SEED)
    trace = model_hessian_trace(model, LOSS, x, y)
    torch.testing.assert_close(trace, torch.trace(H), **TOL)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("strategy", ["vmap", "graph", "graph_batched"])
def test_hutchinson_probes_come_after_the_plain_forward_on_the_global_rng(case, strategy):
    _, model, x, y, H, after = case
    torch.manual_seed(SEED)
    est = model_hessian_trace_estimate(model, LOSS, x, y, 5, strategy=strategy, progress=False)
    after_call = torch.get_rng_state()
    # the RNG: one plain forward pass (the masks), then the probes
    torch.set_rng_state(after)
    probes = draw_probes(5, H.shape[0], dtype=torch.float64)
    expected = ((probes @ H) * probes).sum(1)
    torch.testing.assert_close(est.samples, expected, **TOL)
    assert torch.equal(after_call, torch.get_rng_state())


def test_eigenvalues_are_the_plain_losss(case):
    _, model, x, y, H, _ = case
    torch.manual_seed(SEED)
    values, _ = model_eigenvalues(
        model, lambda m, a, b: LOSS(m(a), b), x, y, 2, num_iterations=H.shape[0], tol=1e-12
    )
    exact = torch.linalg.eigvalsh(H)
    top = exact[exact.abs().argsort(descending=True)[:2]]
    torch.testing.assert_close(values.sort().values, top.sort().values, rtol=1e-7, atol=1e-8)


def test_gauss_newton_product_uses_the_plain_forwards_mask():
    model, x, y = _mlp()
    draws, after = _plain_draws(model, LOSS, x, y, SEED)
    params = list(model.parameters())

    # oracle: J^T H_out J v with J from the replayed forward (output Jacobian by autograd)
    with _Replay(draws):
        out = model(x)
    jac_rows = []
    for i in range(out.numel()):
        row = torch.autograd.grad(out.reshape(-1)[i], params, retain_graph=True)
        jac_rows.append(_flat(row))
    J = torch.stack(jac_rows)
    H_out = 2.0 / out.numel() * torch.eye(out.numel(), dtype=torch.float64)
    v = [
        torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4))
        for p in params
    ]
    torch.manual_seed(SEED)
    got = gauss_newton_product(model, LOSS, x, y, v)
    torch.testing.assert_close(_flat(got), J.T @ (H_out @ (J @ _flat(v))), **TOL)
    assert torch.equal(torch.get_rng_state(), after)


def test_two_calls_in_a_row_draw_two_masks_and_a_seed_reproduces_one():
    model, x, y = _mlp()
    torch.manual_seed(SEED)
    first = _flat(model_hessian_diagonal(model, LOSS, x, y, progress=False))
    second = _flat(model_hessian_diagonal(model, LOSS, x, y, progress=False))
    torch.manual_seed(SEED)
    again = _flat(model_hessian_diagonal(model, LOSS, x, y, progress=False))
    assert not torch.allclose(first, second)
    assert torch.equal(first, again)


def test_any_random_operator_is_replayed():
    """Noise from ``torch.randn_like`` in the loss: every route sees the plain call's noise."""
    torch.manual_seed(0)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, dtype=torch.float64)

    def loss():
        noisy = x + 0.3 * torch.randn_like(x)
        return (torch.tanh(noisy @ w) ** 2).sum()

    torch.manual_seed(SEED)
    noise = 0.3 * torch.randn_like(x)
    after = torch.get_rng_state()
    H = torch.func.hessian(lambda v: (torch.tanh((x + noise) @ v) ** 2).sum())(w.detach())
    v = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for strategy in ("vmap", "graph", "graph_batched"):
        torch.manual_seed(SEED)
        hv = core_hvp.exact_hvp(loss, [w], [v], strategy=strategy)
        torch.testing.assert_close(hv, H @ v, **TOL)
        assert torch.equal(torch.get_rng_state(), after)


def test_a_loss_whose_draws_change_between_evaluations_raises():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    calls = []

    def loss():
        calls.append(1)
        if len(calls) > 1:
            torch.rand(2)  # a draw the plain first evaluation did not make
        return (w**4).sum() * torch.rand(()).to(torch.float64)

    with pytest.raises(RuntimeError, match="same random numbers"):
        core_hvp.exact_hvp(loss, [w], [torch.ones(3, dtype=torch.float64)], strategy="vmap")
