"""Weight normalisation through the operator fixes (``func/_fixes.py``).

torch 2.13's ``_weight_norm_interface`` (the fused kernel behind ``torch._weight_norm``,
which both ``torch.nn.utils.parametrizations.weight_norm`` and the older
``torch.nn.utils.weight_norm`` call) has a wrong double backward (an HVP 15% off) and
no forward-mode AD.  The library reroutes it to :math:`g v / \\|v\\|`; here every
quantity (HVP, diagonal, trace; model and closure forms; each product strategy) is
checked against the dense float64 Hessian of an independent implementation: the
oracle maps ``torch._weight_norm`` to ``torch.linalg.vector_norm`` (itself checked
against a hand-written forward below).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, dense_hessian
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from torch_secorder.core.gvp import model_jvp, model_vjp
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from torch_secorder.core.hvp import exact_hvp, gauss_newton_product, model_hvp
from torch_secorder.func._fixes import _weight_norm

TOL = 1e-10
STRATEGIES = ("vmap", "graph", "graph_batched")


def _reference_weight_norm(v, g, dim=0):
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    keep = dim % v.dim()
    others = [d for d in range(v.dim()) if d != keep]
    if not others:
        return v * (g / v.abs())
    return v * (g / torch.linalg.vector_norm(v, dim=others, keepdim=True))


class ReferenceWeightNorm(TorchFunctionMode):
    """``torch._weight_norm`` from ``torch.linalg.vector_norm``, for the oracle."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch._weight_norm:
            return _reference_weight_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def normed(layer: nn.Module, dim: int | None, old_style: bool) -> nn.Module:
    if old_style:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return nn.utils.weight_norm(layer, dim=dim)
    return nn.utils.parametrizations.weight_norm(layer, dim=dim)


def make_model(kind: str, dim: int | None, old_style: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(3, 4), nn.Tanh(), normed(nn.Linear(4, 3), dim, old_style)
        ).to(DTYPE)
    else:
        model = nn.Sequential(
            normed(nn.Conv2d(2, 2, 2), dim, old_style),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, 3),
        ).to(DTYPE)
    # Move g away from ||v|| so that the normalisation matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0") or name.endswith("weight_g"):
                p.mul_(torch.rand(p.shape, dtype=DTYPE) + 0.5)
    return model


def data(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 3) if kind == "mlp" else (4, 2, 3, 3)
    x = torch.randn(shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    return x, y


def oracle(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def f(values):
        return loss_fn(functional_call(model, dict(zip(names, values, strict=True)), (x,)), y)

    with ReferenceWeightNorm():
        return dense_hessian(f, params)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


CONFIGS = [
    ("mlp", 0, False),
    ("mlp", 1, False),
    ("mlp", None, False),
    ("mlp", 0, True),
    ("mlp", -1, True),
    ("conv", 0, False),
    ("conv", 2, False),
    ("conv", 0, True),
]
configs = st.sampled_from(CONFIGS)
seeds = st.integers(0, 2**20)


def test_reroute_is_torchs_forward_and_the_oracle_is_independent():
    """Values: reroute == torch == hand-written g v/||v|| (every dim, all tensor ranks)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(4,), (4, 3), (2, 3, 4), (2, 3, 2, 2)]:
        v = torch.randn(shape, generator=g, dtype=DTYPE)
        for dim in [-1, *range(len(shape)), *range(-len(shape), -1)]:
            keep = None if dim == -1 else dim % len(shape)
            others = [d for d in range(len(shape)) if d != keep]
            squares = v**2
            if keep is None:
                norm = squares.sum().sqrt()
            elif others:
                norm = squares.sum(others, keepdim=True).sqrt()
            else:  # a vector normalised entry by entry
                norm = squares.sqrt()
            gain = torch.rand(norm.shape, generator=g, dtype=DTYPE) + 0.5
            by_hand = gain * v / norm
            torch.testing.assert_close(_weight_norm(v, gain, dim), by_hand, rtol=1e-14, atol=0)
            torch.testing.assert_close(
                torch._weight_norm(v, gain, dim), by_hand, rtol=1e-14, atol=0
            )
            torch.testing.assert_close(
                _reference_weight_norm(v, gain, dim), by_hand, rtol=1e-14, atol=0
            )


def test_torch_own_hessian_is_wrong_here():
    """The reason for the reroute: torch's double backward disagrees with the oracle."""
    model = make_model("mlp", 0, False, 0)
    x, y = data("mlp", 0)
    params = list(model.parameters())
    H = oracle(model, F.cross_entropy, x, y)
    v = torch.randn(H.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vs = torch.split(v, [p.numel() for p in params])
    dot = sum((gi * vi.reshape(gi.shape)).sum() for gi, vi in zip(grads, vs, strict=True))
    torch_hv = flat(torch.autograd.grad(dot, params))
    assert (torch_hv - H @ v).norm() > 1e-3 * (H @ v).norm()


@settings(max_examples=12, deadline=None)
@given(config=configs, seed=seeds, strategy=st.sampled_from(STRATEGIES))
def test_hvp_model_and_closure(config, seed, strategy):
    kind, dim, old_style = config
    model = make_model(kind, dim, old_style, seed)
    x, y = data(kind, seed)
    H = oracle(model, F.cross_entropy, x, y)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]
    expected = H @ flat(v)
    by_model = model_hvp(model, F.cross_entropy, x, y, v, strategy=strategy)
    torch.testing.assert_close(flat(by_model), expected, rtol=TOL, atol=TOL)
    by_closure = exact_hvp(lambda: F.cross_entropy(model(x), y), params, v, strategy=strategy)
    torch.testing.assert_close(flat(by_closure), expected, rtol=TOL, atol=TOL)


@settings(max_examples=12, deadline=None)
@given(config=configs, seed=seeds)
def test_diagonal_and_trace_model_and_closure(config, seed):
    kind, dim, old_style = config
    model = make_model(kind, dim, old_style, seed)
    x, y = data(kind, seed)
    H = oracle(model, F.cross_entropy, x, y)
    params = list(model.parameters())

    def closure():
        return F.cross_entropy(model(x), y)

    diag = H.diagonal()
    torch.testing.assert_close(
        flat(model_hessian_diagonal(model, F.cross_entropy, x, y)), diag, rtol=TOL, atol=TOL
    )
    torch.testing.assert_close(flat(hessian_diagonal(closure, params)), diag, rtol=TOL, atol=TOL)
    trace = H.trace()
    torch.testing.assert_close(
        model_hessian_trace(model, F.cross_entropy, x, y), trace, rtol=TOL, atol=TOL
    )
    torch.testing.assert_close(hessian_trace(closure, params), trace, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("old_style", [False, True])
def test_model_is_left_as_it_was(old_style):
    model = make_model("mlp", 0, old_style, 3)
    x, y = data("mlp", 3)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    model_hessian_diagonal(model, F.cross_entropy, x, y)
    model_hvp(model, F.cross_entropy, x, y, [torch.ones_like(p) for p in model.parameters()])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=8, deadline=None)
@given(config=configs, seed=seeds)
def test_jacobian_and_gauss_newton_products(config, seed):
    """Forward mode through the weight norm (``model_jvp``, ``gauss_newton_product``)."""
    kind, dim, old_style = config
    model = make_model(kind, dim, old_style, seed)
    x, y = data(kind, seed)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def output(theta):
        values = [t.reshape(p.shape) for t, p in zip(theta.split(sizes), params, strict=True)]
        return functional_call(model, dict(zip(names, values, strict=True)), (x,))

    with ReferenceWeightNorm():
        theta = flat(params)
        out = output(theta).detach()
        J = torch.func.jacrev(output)(theta).reshape(out.numel(), -1)
        H_out = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(out.shape), y))(
            out.reshape(-1)
        )
    g = torch.Generator().manual_seed(seed + 2)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]
    u = torch.randn(out.shape, generator=g, dtype=DTYPE)
    Jv = J @ flat(v)
    torch.testing.assert_close(model_jvp(model, x, v).reshape(-1), Jv, rtol=TOL, atol=TOL)
    torch.testing.assert_close(flat(model_vjp(model, x, u)), u.reshape(-1) @ J, rtol=TOL, atol=TOL)
    torch.testing.assert_close(
        flat(gauss_newton_product(model, F.cross_entropy, x, y, v)),
        J.T @ (H_out @ Jv),
        rtol=TOL,
        atol=TOL,
    )
