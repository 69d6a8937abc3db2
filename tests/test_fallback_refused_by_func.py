"""Models that ``torch.func`` refuses take the autograd-graph route, with the same numbers.

Three kinds of model that torch.func refuses, each the same function as a plain
``Linear(3, 4) -> tanh -> Linear(4, 3)`` network with cross-entropy:

* ``old_function``: the tanh is an old-style ``autograd.Function`` (``forward(ctx, x)``,
  no ``setup_context``);
* ``backward_hook``: full backward hooks on the activation and the last layer
  (what BackPACK's ``extend`` and Captum register);
* ``checkpoint``: the first block runs under ``torch.utils.checkpoint`` with
  ``use_reentrant=False`` (saved-tensor hooks).

Every quantity (HVP on every strategy, exact diagonal, exact and Hutchinson trace,
GGN product, Jacobian-vector product, eigenvalues, loss landscape) is checked
against the dense float64 oracle of the plain network; an error that is not
torch.func's refusal is raised as it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close, dense_hessian, ravel, unravel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from torch_secorder.analysis.eigensolvers import model_eigenvalues
from torch_secorder.analysis.landscape import compute_loss_surface_1d
from torch_secorder.approximations.gauss_newton import gauss_newton_matrix_approximation
from torch_secorder.core import hvp as hvp_api
from torch_secorder.core.gvp import jvp, model_jvp
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import (
    hessian_trace,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.core.hvp import exact_hvp, gauss_newton_product, model_hvp
from torch_secorder.linalg.probes import draw_probes
from torch_secorder.problems._problem import STRATEGIES, module_problem

DT = torch.float64
KINDS = ("old_function", "backward_hook", "checkpoint")


class _OldStyleTanh(torch.autograd.Function):
    """tanh as an old-style autograd.Function (forward takes ctx)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OldStyleTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _OldStyleTanh.apply(x)


class CheckpointedBlock(nn.Module):
    """``tanh(linear(x))`` recomputed in the backward pass (non-reentrant checkpoint)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(lambda t: torch.tanh(self.linear(t)), x, use_reentrant=False)


def _point(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, generator=g, dtype=DT),
        0.5 * torch.randn(4, generator=g, dtype=DT),
        torch.randn(3, 4, generator=g, dtype=DT),
        0.5 * torch.randn(3, generator=g, dtype=DT),
    ]


def _linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(DT)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def build(kind: str) -> nn.Module:
    """The refused model of ``kind``; its parameters are :func:`_point` in that order."""
    w1, b1, w2, b2 = _point()
    first, last = _linear(w1, b1), _linear(w2, b2)
    if kind == "old_function":
        return nn.Sequential(first, OldStyleTanh(), last)
    if kind == "backward_hook":
        act = nn.Tanh()
        seen = []
        act.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
        last.register_full_backward_hook(lambda m, gi, go: None)
        return nn.Sequential(first, act, last)
    if kind == "checkpoint":
        return nn.Sequential(CheckpointedBlock(first), last)
    raise ValueError(kind)


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
Y = torch.tensor([0, 2, 1, 1, 0, 2])


def plain_output(params: list[Tensor]) -> Tensor:
    w1, b1, w2, b2 = params
    return F.linear(torch.tanh(F.linear(X, w1, b1)), w2, b2)


def plain_loss(params: list[Tensor]) -> Tensor:
    return F.cross_entropy(plain_output(params), Y)


HESSIAN = dense_hessian(plain_loss, _point())
N = HESSIAN.shape[0]


def _vector(seed: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=DT) for p in _point()]


def _closure(model: nn.Module):
    return lambda: F.cross_entropy(model(X), Y)


def _untouched(model: nn.Module) -> None:
    for p, q in zip(model.parameters(), _point(), strict=True):
        assert p.grad is None and p.requires_grad
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_refuses_these_models(kind):
    """The models exercise the fallback: the vmap route meets torch's refusal."""
    model = build(kind)
    v = [torch.ones_like(p) for p in model.parameters()]
    flat = ravel(v).unsqueeze(0)
    with module_problem(model, F.cross_entropy, X, Y) as problem:
        assert not problem.functional_refused()
        assert problem.resolve_strategy("vmap") == "vmap"
        product = problem.matmat("vmap")(flat)
        assert problem.functional_refused()
        assert problem.resolve_strategy("vmap") == "graph_batched"
        assert problem.resolve_strategy("graph") == "graph"
    assert_close(product[0], HESSIAN @ flat[0])
    plain = nn.Sequential(nn.Linear(3, 3)).to(DT)
    with module_problem(plain, F.cross_entropy, X, Y) as problem:
        problem.matmat("vmap")(torch.ones(1, 12, dtype=DT))
        assert not problem.functional_refused()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hvp(kind, strategy):
    model = build(kind)
    v = _vector()
    expected = unravel(HESSIAN @ ravel(v), v)
    assert_close(model_hvp(model, F.cross_entropy, X, Y, v, strategy=strategy), expected)
    params = list(model.parameters())
    assert_close(exact_hvp(_closure(model), params, v, strategy=strategy), expected)
    _untouched(model)


@pytest.mark.parametrize("kind", KINDS)
def test_hvp_create_graph(kind):
    model = build(kind)
    v = _vector()
    hv = model_hvp(model, F.cross_entropy, X, Y, v, create_graph=True, strategy="vmap")
    assert all(t.requires_grad for t in hv)
    assert_close([t.detach() for t in hv], unravel(HESSIAN @ ravel(v), v))


@pytest.mark.parametrize("kind", KINDS)
def test_exact_diagonal(kind):
    model = build(kind)
    expected = unravel(HESSIAN.diagonal(), _point())
    assert_close(model_hessian_diagonal(model, F.cross_entropy, X, Y), expected)
    assert_close(model_hessian_diagonal(model, F.cross_entropy, X, Y, chunk_size=5), expected)
    params = list(model.parameters())
    assert_close(hessian_diagonal(_closure(model), params), expected)
    differentiable = hessian_diagonal(_closure(model), params, create_graph=True)
    assert all(d.requires_grad for d in differentiable)
    assert_close([d.detach() for d in differentiable], expected)
    _untouched(model)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_trace(kind):
    model = build(kind)
    expected = HESSIAN.trace()
    assert_close(model_hessian_trace(model, F.cross_entropy, X, Y), expected)
    assert_close(hessian_trace(_closure(model), list(model.parameters())), expected)
    _untouched(model)


def _hutchinson_oracle(num_samples: int, seed: int) -> Tensor:
    probes = draw_probes(num_samples, N, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return ((probes @ HESSIAN) * probes).sum(-1).mean()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["auto", "vmap"])
def test_hutchinson_trace(kind, strategy):
    model = build(kind)
    m = 7
    expected = _hutchinson_oracle(m, seed=3)
    est = model_hessian_trace_estimate(
        model,
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
        _closure(model),
        list(model.parameters()),
        m,
        generator=torch.Generator().manual_seed(3),
        chunk_size=m,
        strategy=strategy,
    )
    assert abs(closure_est - float(expected)) <= TOL * (1 + abs(float(expected)))
    _untouched(model)


def _ggn_oracle(v: list[Tensor]) -> list[Tensor]:
    point = _point()
    flat = ravel(point)
    jac = torch.func.jacrev(lambda x: plain_output(unravel(x, point)).reshape(-1))(flat)
    out = plain_output(point)
    h_out = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(out.shape), Y))(out.reshape(-1))
    return unravel(jac.T @ h_out @ jac @ ravel(v), v)


@pytest.mark.parametrize("kind", KINDS)
def test_ggn_product(kind):
    model = build(kind)
    v = _vector()
    expected = _ggn_oracle(v)
    assert_close(gauss_newton_product(model, F.cross_entropy, X, Y, v), expected)
    product = gauss_newton_product(model, F.cross_entropy, X, Y, v, create_graph=True)
    assert all(t.requires_grad for t in product)
    assert_close([t.detach() for t in product], expected)
    _untouched(model)


def test_ggn_product_create_graph_is_differentiable():
    """d/dv_k of <u, G v> is (G u)_k: the graph route's result carries the right graph."""
    model = build("old_function")
    v = [t.requires_grad_(True) for t in _vector()]
    u = _vector(seed=5)
    product = gauss_newton_product(model, F.cross_entropy, X, Y, v, create_graph=True)
    inner = sum((a * b).sum() for a, b in zip(product, u, strict=True))
    assert_close(list(torch.autograd.grad(inner, v)), _ggn_oracle(u))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["auto", "vmap"])
def test_eigenvalues(kind, strategy):
    model = build(kind)
    expected = torch.linalg.eigvalsh(HESSIAN)

    def loss(m, data, target):
        return F.cross_entropy(m(data), target)

    top, vectors = model_eigenvalues(
        model,
        loss,
        X,
        Y,
        2,
        num_iterations=N,
        tol=1e-12,
        which="LA",
        generator=torch.Generator().manual_seed(0),
        strategy=strategy,
    )
    assert_close(top, expected.flip(0)[:2], tol=1e-9)
    for value, vector in zip(top, vectors, strict=True):
        flat = ravel(vector)
        assert_close(HESSIAN @ flat, value * flat, tol=1e-8)
    _untouched(model)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_landscape(kind):
    model = build(kind)
    direction = _vector()
    alphas, losses = compute_loss_surface_1d(
        model, F.cross_entropy, X, Y, direction, (-1.0, 1.0), 5
    )
    point = _point()
    expected = torch.stack(
        [plain_loss([p + float(a) * d for p, d in zip(point, direction)]) for a in alphas]
    )
    assert_close(losses, expected)
    _untouched(model)


# ------------------------------------------------------------------ unrelated errors


class FailsUnderTransforms(nn.Module):
    """A user's bug that shows only when the weight is a torch.func tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        if torch._C._functorch.is_functorch_wrapped_tensor(self.linear.weight):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (a bug of the user's)")
        return self.linear(x)


def test_unrelated_error_under_torch_func_is_raised():
    model = FailsUnderTransforms()
    with pytest.raises(RuntimeError, match="a bug of the user's"):
        model_hessian_diagonal(model, F.cross_entropy, X, Y, create_graph=True)
    with pytest.raises(RuntimeError, match="a bug of the user's"):
        model_hvp(
            model,
            F.cross_entropy,
            X,
            Y,
            [torch.ones_like(p) for p in model.parameters()],
            strategy="vmap",
        )
    with pytest.raises(RuntimeError, match="a bug of the user's"):
        gauss_newton_product(
            model, F.cross_entropy, X, Y, [torch.ones_like(p) for p in model.parameters()]
        )
    for p in model.parameters():
        assert p.grad is None


def test_shape_error_in_a_refused_model_is_raised():
    model = nn.Sequential(nn.Linear(3, 4), OldStyleTanh(), nn.Linear(5, 3)).to(DT)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model_hessian_diagonal(model, F.cross_entropy, X, Y)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model_hvp(model, F.cross_entropy, X, Y, [torch.ones_like(p) for p in model.parameters()])


# ---------------------------------------------- GGN diagonal, and a model the fast routes refuse


def _ggn_matrix(output_fn) -> Tensor:
    point = _point()
    flat = ravel(point)
    jac = torch.func.jacrev(lambda x: output_fn(unravel(x, point)).reshape(-1))(flat)
    out = output_fn(point)
    h_out = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(out.shape), Y))(out.reshape(-1))
    return jac.T @ h_out @ jac


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("create_graph", [False, True])
def test_ggn_diagonal(kind, create_graph):
    model = build(kind)
    expected = unravel(_ggn_matrix(plain_output).diagonal(), _point())
    diag = gauss_newton_matrix_approximation(
        model, F.cross_entropy, X, Y, create_graph=create_graph, chunk_size=3
    )
    assert all(d.requires_grad == create_graph for d in diag)
    assert_close([d.detach() for d in diag], expected)
    _untouched(model)


class CoupledOldStyle(nn.Module):
    """``W2 (h * sum(h)) + b2`` with ``h`` an old-style tanh: no closed-form graph route."""

    def __init__(self) -> None:
        super().__init__()
        w1, b1, w2, b2 = _point()
        self.first, self.last = _linear(w1, b1), _linear(w2, b2)

    def forward(self, x: Tensor) -> Tensor:
        h = _OldStyleTanh.apply(self.first(x))
        return self.last(h * h.sum(1, keepdim=True))


def coupled_output(params: list[Tensor]) -> Tensor:
    w1, b1, w2, b2 = params
    h = torch.tanh(F.linear(X, w1, b1))
    return F.linear(h * h.sum(1, keepdim=True), w2, b2)


def test_a_model_whose_fast_diagonal_routes_are_refused():
    """The engine's diagonal routes meet the refusal; the graph routes give the oracle's numbers."""
    model = CoupledOldStyle()
    hessian = dense_hessian(lambda p: F.cross_entropy(coupled_output(p), Y), _point())
    like = _point()
    assert_close(
        model_hessian_diagonal(model, F.cross_entropy, X, Y, chunk_size=4),
        unravel(hessian.diagonal(), like),
    )
    assert_close(model_hessian_trace(model, F.cross_entropy, X, Y), hessian.trace())
    assert_close(
        gauss_newton_matrix_approximation(model, F.cross_entropy, X, Y),
        unravel(_ggn_matrix(coupled_output).diagonal(), like),
    )
    _untouched(model)


@pytest.mark.parametrize("kind", KINDS)
def test_jacobian_vector_product_model_and_closure_form(kind):
    """``J v`` by the double-vjp trick on the autograd graph, against the plain net's jacrev."""
    model = build(kind)
    v = _vector()
    jac = torch.func.jacrev(plain_output)(_point())
    expected = sum((j * t).flatten(2).sum(-1) for j, t in zip(jac, v, strict=True))
    assert_close(model_jvp(model, X, v), expected)
    assert_close(jvp(lambda: model(X), list(model.parameters()), v), expected)
    with_graph = model_jvp(model, X, [t.clone().requires_grad_() for t in v], create_graph=True)
    assert with_graph.requires_grad
    assert_close(with_graph, expected)
    _untouched(model)


@pytest.mark.parametrize("kind", KINDS)
def test_graph_ggn_block_shares_one_forward_pass(kind):
    """``J^T H_out J V`` for a block of vectors: one forward pass of the model, all columns."""
    model = build(kind)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    V = torch.randn(5, N, generator=torch.Generator().manual_seed(7), dtype=DT)
    expected = V @ _ggn_matrix(plain_output)  # symmetric: rows V G
    with module_problem(model, None, X, Y) as problem:
        calls.clear()
        rows = problem.graph_ggn_matmat(F.cross_entropy, Y, V)
        assert len(calls) == 1
    assert_close(rows, expected)
    _untouched(model)
