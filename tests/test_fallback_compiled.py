"""``torch.compile``'d models take the functional (vmap) route, with the same numbers.

``aot_autograd`` has no double backward, so the graph routes (the CPU default for
HVPs) are refused on compiled code; ``torch.func`` runs through it.  One tiny MLP
is compiled once for the module (compilation is slow on CPU); every quantity is
checked against the dense float64 oracle of the uncompiled model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close, dense_hessian, ravel, unravel
from torch import Tensor, nn
from torch.func import functional_call

from torch_secorder.analysis.eigensolvers import model_eigenvalues
from torch_secorder.core import hvp as hvp_api
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import (
    hessian_trace,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.core.hvp import exact_hvp, gauss_newton_product, model_hvp
from torch_secorder.linalg.probes import draw_probes
from torch_secorder.problems._fallback import GRAPH_REFUSALS, has_compiled_module, is_graph_refusal
from torch_secorder.problems._problem import STRATEGIES, closure_problem, module_problem

DT = torch.float64
X = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
Y = torch.tensor([0, 2, 1, 1, 0, 2])


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


PLAIN = _plain()
NAMES = [n for n, _ in PLAIN.named_parameters()]
POINT = [p.detach().clone() for p in PLAIN.parameters()]


def _plain_loss(params: list[Tensor]) -> Tensor:
    return F.cross_entropy(functional_call(PLAIN, dict(zip(NAMES, params)), (X,)), Y)


HESSIAN = dense_hessian(_plain_loss, POINT)
N = HESSIAN.shape[0]


@pytest.fixture(scope="module")
def compiled() -> nn.Module:
    """``torch.compile`` of a copy of the plain MLP (same parameter values), compiled once."""
    model = torch.compile(_plain())
    model(X)  # compile now, once for the module
    return model


def _vector(seed: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=DT) for p in POINT]


def _closure(model: nn.Module):
    return lambda: F.cross_entropy(model(X), Y)


def _untouched(model: nn.Module) -> None:
    for p, q in zip(model.parameters(), POINT, strict=True):
        assert p.grad is None and p.requires_grad
        assert torch.equal(p.detach(), q)


def test_the_graph_route_is_refused_by_compiled_code(compiled):
    """The premise: a double backward through the compiled model raises torch's refusal."""
    params = list(compiled.parameters())
    grads = torch.autograd.grad(F.cross_entropy(compiled(X), Y), params, create_graph=True)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads])
    assert is_graph_refusal(info.value)


def test_compiled_modules_are_found(compiled):
    assert has_compiled_module(compiled)
    assert has_compiled_module(nn.Sequential(compiled, nn.Linear(3, 1)))
    assert not has_compiled_module(_plain())
    inplace = _plain()
    inplace.compile()
    assert has_compiled_module(inplace)
    with module_problem(compiled, F.cross_entropy, X, Y) as problem:
        assert [problem.resolve_strategy(s) for s in STRATEGIES] == ["vmap"] * 4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hvp(compiled, strategy):
    v = _vector()
    expected = unravel(HESSIAN @ ravel(v), v)
    assert_close(model_hvp(compiled, F.cross_entropy, X, Y, v, strategy=strategy), expected)
    params = list(compiled.parameters())
    assert_close(exact_hvp(_closure(compiled), params, v, strategy=strategy), expected)
    _untouched(compiled)


def test_closure_meeting_the_refusal_switches_to_vmap(compiled):
    """A closure does not show its compiled code: the first refused product switches route."""
    flat = ravel(_vector()).unsqueeze(0)
    params = list(compiled.parameters())
    with closure_problem(_closure(compiled), params) as problem:
        product = problem.matmat("graph")(flat)
        # Either the product went through (dynamo fell back to eager) or the route
        # switched after torch's refusal; the numbers are the oracle's either way.
        if problem.graph_refused():
            assert problem.resolve_strategy("graph_batched") == "vmap"
    assert_close(product[0], HESSIAN @ flat[0])


def test_diagonal_and_exact_trace(compiled):
    expected = unravel(HESSIAN.diagonal(), POINT)
    assert_close(model_hessian_diagonal(compiled, F.cross_entropy, X, Y), expected)
    params = list(compiled.parameters())
    assert_close(hessian_diagonal(_closure(compiled), params), expected)
    assert_close(model_hessian_trace(compiled, F.cross_entropy, X, Y), HESSIAN.trace())
    assert_close(hessian_trace(_closure(compiled), params), HESSIAN.trace())
    _untouched(compiled)


@pytest.mark.parametrize("strategy", ["auto", "graph"])
def test_hutchinson_trace(compiled, strategy):
    m = 7
    probes = draw_probes(m, N, generator=torch.Generator().manual_seed(3), dtype=DT)
    expected = ((probes @ HESSIAN) * probes).sum(-1).mean()
    est = model_hessian_trace_estimate(
        compiled,
        F.cross_entropy,
        X,
        Y,
        m,
        generator=torch.Generator().manual_seed(3),
        chunk_size=m,
        strategy=strategy,
    )
    assert_close(est.estimate, expected)
    closure_est = hvp_api.hessian_trace(
        _closure(compiled),
        list(compiled.parameters()),
        m,
        generator=torch.Generator().manual_seed(3),
        chunk_size=m,
        strategy=strategy,
    )
    assert abs(closure_est - float(expected)) <= TOL * (1 + abs(float(expected)))


def test_ggn_product(compiled):
    v = _vector()
    flat = ravel(POINT)

    def output(x: Tensor) -> Tensor:
        return functional_call(PLAIN, dict(zip(NAMES, unravel(x, POINT))), (X,))

    jac = torch.func.jacrev(lambda x: output(x).reshape(-1))(flat)
    out = output(flat)
    h_out = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(out.shape), Y))(out.reshape(-1))
    expected = unravel(jac.T @ h_out @ jac @ ravel(v), v)
    assert_close(gauss_newton_product(compiled, F.cross_entropy, X, Y, v), expected)
    _untouched(compiled)


@pytest.mark.parametrize("strategy", ["auto", "graph_batched"])
def test_eigenvalues(compiled, strategy):
    top, vectors = model_eigenvalues(
        compiled,
        lambda m, data, target: F.cross_entropy(m(data), target),
        X,
        Y,
        2,
        num_iterations=N,
        tol=1e-12,
        which="LA",
        generator=torch.Generator().manual_seed(0),
        strategy=strategy,
    )
    assert_close(top, torch.linalg.eigvalsh(HESSIAN).flip(0)[:2], tol=1e-9)
    for value, vector in zip(top, vectors, strict=True):
        assert_close(HESSIAN @ ravel(vector), value * ravel(vector), tol=1e-8)
    _untouched(compiled)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity whose backward raises ``message``, as aot_autograd's double backward does."""

    @staticmethod
    def forward(x, message):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)


class _Cube(torch.autograd.Function):
    """``x ** 3`` whose gradient cannot be differentiated again (``message`` is raised)."""

    @staticmethod
    def forward(x, message):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _RefuseDoubleBackward.apply(3 * x**2 * grad, ctx.message), None


def _cube_closure(x: Tensor, message: str):
    """``sum(x ** 3)``: plain under torch.func, without a double backward otherwise."""

    def loss() -> Tensor:
        if torch._C._are_functorch_transforms_active():
            return (x**3).sum()
        return _Cube.apply(x, message).sum()

    return loss


@pytest.mark.parametrize("strategy", ["graph", "graph_batched"])
def test_a_refused_double_backward_switches_to_vmap(strategy):
    """Code that refuses the double backward out of sight (inside a closure): the first
    refused product and the rest take the vmap route, with the same vectors."""
    x = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    V = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=DT)
    with closure_problem(_cube_closure(x, GRAPH_REFUSALS[0]), [x]) as problem:
        matmat = problem.matmat(strategy)
        assert not problem.graph_refused()
        assert_close(matmat(V), V * (6 * x.detach()))
        assert problem.graph_refused()
        assert problem.resolve_strategy(strategy) == "vmap"
        assert_close(matmat(V[:1]), V[:1] * (6 * x.detach()))
    assert_close(
        exact_hvp(_cube_closure(x, GRAPH_REFUSALS[0]), [x], V[1], strategy=strategy),
        V[1] * (6 * x.detach()),
    )
    assert x.grad is None


def test_an_unrelated_double_backward_error_is_raised():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    closure = _cube_closure(x, "a bug in the user's backward")
    with pytest.raises(RuntimeError, match="a bug in the user's backward"):
        exact_hvp(closure, [x], torch.ones(3, dtype=DT), strategy="graph")


def test_a_model_with_a_compiled_submodule(compiled):
    """A plain container around the compiled module: routed to vmap, the oracle's numbers."""
    model = nn.Sequential(compiled)
    v = _vector()
    expected = unravel(HESSIAN @ ravel(v), v)
    for strategy in ("auto", "graph"):
        assert_close(model_hvp(model, F.cross_entropy, X, Y, v, strategy=strategy), expected)
    assert_close(
        model_hessian_diagonal(model, F.cross_entropy, X, Y), unravel(HESSIAN.diagonal(), POINT)
    )
    _untouched(compiled)
