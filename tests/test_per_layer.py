"""core.per_layer_curvature against the dense Hessian and dense per-sample gradients (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, assert_close, make_mlp, mlp_problems
from hypothesis import given, settings
from torch import Tensor, nn
from torch.func import functional_call

from torch_secorder.core.per_layer_curvature import (
    get_layer_curvature_stats,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)

SETTINGS = settings(max_examples=12, deadline=None)


def dense_hessian_diagonal(model: nn.Module, loss_fn, x, y) -> dict[int, Tensor]:
    """Oracle: ``{id(param): diag}`` from torch.func.hessian of the flattened loss."""
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for p in model.parameters()]
    sizes = [v.numel() for v in values]

    def loss(z):
        pieces = [p.reshape(v.shape) for p, v in zip(torch.split(z, sizes), values, strict=True)]
        return loss_fn(functional_call(model, dict(zip(names, pieces, strict=True)), (x,)), y)

    z = torch.cat([v.reshape(-1) for v in values])
    diag = torch.diagonal(torch.func.hessian(loss)(z))
    return {id(p): d for p, d in zip(model.parameters(), torch.split(diag, sizes), strict=True)}


def dense_fisher_diagonal(model: nn.Module, loss_fn, x, y) -> dict[int, Tensor]:
    """Oracle: mean over samples of squared per-sample gradients, one gradient per sample."""
    names = [n for n, _ in model.named_parameters()]
    values = {n: p.detach() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(v) for n, v in values.items()}
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        grads = torch.func.grad(
            lambda p, xi=xi, yi=yi: loss_fn(functional_call(model, p, (xi,)), yi)
        )(values)
        total = {n: total[n] + grads[n] ** 2 for n in names}
    return {
        id(p): (total[n] / x.shape[0]).reshape(-1)
        for n, p in zip(names, model.parameters(), strict=True)
    }


def expected_layers(oracle: dict[int, Tensor], layers: dict[str, list[Tensor]]):
    return {name: torch.cat([oracle[id(p)].reshape(-1) for p in ps]) for name, ps in layers.items()}


def direct_layers(model: nn.Module) -> dict[str, list[Tensor]]:
    return {
        name: list(m.parameters(recurse=False))
        for name, m in model.named_modules()
        if list(m.parameters(recurse=False))
    }


@SETTINGS
@given(problem=mlp_problems())
def test_per_layer_hessian_and_fisher_match_oracles(problem):
    model, loss_fn, x, y = problem.model, problem.loss_fn, problem.inputs, problem.targets
    before = [p.detach().clone() for p in model.parameters()]
    layers = direct_layers(model)

    hess = per_layer_hessian_diagonal(model, loss_fn, x, y)
    assert list(hess) == list(layers)
    assert_close(hess, expected_layers(dense_hessian_diagonal(model, loss_fn, x, y), layers))

    fisher = per_layer_fisher_diagonal(model, loss_fn, x, y, layer_types=nn.Linear)
    linear = {n: list(m.parameters()) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert list(fisher) == list(linear)
    assert_close(fisher, expected_layers(dense_fisher_diagonal(model, loss_fn, x, y), linear))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None and p.requires_grad


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_mlp([3, 4, 4], "tanh", seed=5)
        self.norm = nn.LayerNorm(4).double()
        self.head = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def test_layer_types_frozen_layers_and_flags():
    model = TwoBlocks()
    model.head.bias.requires_grad_(False)
    x = torch.randn(6, 3, dtype=DTYPE)
    y = torch.randint(0, 2, (6,))
    loss_fn = F.cross_entropy
    hess_oracle = dense_hessian_diagonal(model, loss_fn, x, y)
    fisher_oracle = dense_fisher_diagonal(model, loss_fn, x, y)

    # A list of types; a container type takes its children's parameters (0.0.1 convention).
    for types in ([nn.Linear, nn.LayerNorm], (nn.Sequential,)):
        layers = {
            n: list(m.parameters()) for n, m in model.named_modules() if isinstance(m, tuple(types))
        }
        hess = per_layer_hessian_diagonal(model, loss_fn, x, y, layer_types=types)
        assert_close(hess, expected_layers(hess_oracle, layers))
        fisher = per_layer_fisher_diagonal(model, loss_fn, x, y, types)
        assert_close(fisher, expected_layers(fisher_oracle, layers))
    # As in 0.0.1, a frozen parameter of a selected layer is differentiated; flags restored.
    assert torch.count_nonzero(hess_oracle[id(model.head.bias)]) > 0
    head = per_layer_hessian_diagonal(model, loss_fn, x, y, nn.Linear)["head"]
    assert_close(head[-2:], hess_oracle[id(model.head.bias)])
    assert model.head.bias.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.bias")


def test_create_graph():
    model = make_mlp([2, 3, 1], "tanh", seed=0)
    x = torch.randn(4, 2, dtype=DTYPE)
    y = torch.randn(4, 1, dtype=DTYPE)
    hess = per_layer_hessian_diagonal(model, F.mse_loss, x, y, create_graph=True)
    fisher = per_layer_fisher_diagonal(model, F.mse_loss, x, y, create_graph=True)
    for d in (*hess.values(), *fisher.values()):
        assert d.requires_grad
    # the differentiable route computes the same numbers as the plain one (and the oracle)
    layers = direct_layers(model)
    assert_close(fisher, expected_layers(dense_fisher_diagonal(model, F.mse_loss, x, y), layers))
    assert_close(fisher, per_layer_fisher_diagonal(model, F.mse_loss, x, y))
    # d/dθ of the Fisher diagonal of the last layer's bias: (2/N) Σ_i 2 r_i * J_i, by oracle.
    (grad_w,) = torch.autograd.grad(fisher["2"][-1], [model[2].bias])
    r = (model(x) - y).detach()
    # per-sample grad of bias: 2 r_i; squared mean: 4 mean(r_i^2); derivative wrt bias: 8 mean(r_i)
    assert_close(grad_w, 8 * r.mean().reshape(1))
    no_graph = per_layer_hessian_diagonal(model, F.mse_loss, x, y)
    assert not any(d.requires_grad for d in no_graph.values())


def test_curvature_stats():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, generator=g, dtype=DTYPE)
    stats = get_layer_curvature_stats({"a": d, "b": torch.tensor([2.0]), "c": d.float()})
    a = stats["a"]
    assert a["mean"] == pytest.approx(float(d.mean()), abs=1e-15)
    assert a["std"] == pytest.approx(float(d.std()), abs=1e-15)
    assert a["max"] == float(d.max()) and a["min"] == float(d.min())
    assert a["norm"] == pytest.approx(float((d**2).sum().sqrt()), abs=1e-14)
    assert a["abs_mean"] == pytest.approx(float(d.abs().mean()), abs=1e-15)
    assert a["sum"] == pytest.approx(float(d.sum()), abs=1e-13)
    assert stats["b"] == {
        "mean": 2.0,
        "std": 0.0,
        "max": 2.0,
        "min": 2.0,
        "norm": 2.0,
        "abs_mean": 2.0,
        "sum": 2.0,
    }
    assert all(isinstance(v, float) for v in stats["c"].values())
    assert stats["c"]["sum"] == pytest.approx(float(d.float().double().sum()), abs=1e-12)


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("types", [nn.Conv2d, [nn.Conv2d], (nn.Conv1d, nn.Embedding)])
def test_no_selected_layer_gives_empty_dict(types, create_graph):
    """0.0.1: ``layer_types=[nn.Conv2d]`` on a model without convolutions returns ``{}``."""
    model = make_mlp([2, 3, 2], "tanh", seed=0)
    x = torch.randn(3, 2, dtype=DTYPE)
    y = torch.randn(3, 2, dtype=DTYPE)
    before = [(p.detach().clone(), p.requires_grad) for p in model.parameters()]
    calls = []

    def loss_fn(o, t):
        calls.append(1)
        return F.mse_loss(o, t)

    for fn in (per_layer_hessian_diagonal, per_layer_fisher_diagonal):
        with pytest.warns(UserWarning, match="selects no module with parameters.*returning"):
            got = fn(model, loss_fn, x, y, layer_types=types, create_graph=create_graph)
        assert got == {}
    assert calls == []  # nothing computed
    assert get_layer_curvature_stats({}) == {}
    for p, (b, flag) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.requires_grad == flag and p.grad is None


def test_bad_input():
    model = make_mlp([2, 2], "tanh", seed=0)
    x = torch.randn(3, 2, dtype=DTYPE)
    y = torch.randn(3, 2, dtype=DTYPE)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_layer_hessian_diagonal(lambda t: t, F.mse_loss, x, y)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_layer_fisher_diagonal(None, F.mse_loss, x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable, got str"):
        per_layer_hessian_diagonal(model, "mse", x, y, layer_types=nn.Conv2d)
    with pytest.raises(TypeError, match="loss_fn must be callable, got NoneType"):
        per_layer_fisher_diagonal(model, None, x, y)
    with pytest.raises(TypeError, match="module_type must be a type"):
        per_layer_fisher_diagonal(model, F.mse_loss, x, y, layer_types=["Linear"])
    with pytest.raises(ValueError, match="same batch size"):
        per_layer_fisher_diagonal(model, F.mse_loss, x, y[:2])
    with pytest.raises(ValueError, match="scalar tensor"):
        per_layer_hessian_diagonal(model, lambda o, t: o - t, x, y)
    with pytest.raises(TypeError, match="layer_curvatures must be a dict"):
        get_layer_curvature_stats([torch.ones(2)])
    with pytest.raises(TypeError, match=r"layer_curvatures\['a'\] must be a torch.Tensor"):
        get_layer_curvature_stats({"a": [1.0]})
    with pytest.raises(ValueError, match=r"layer_curvatures\['a'\] is empty"):
        get_layer_curvature_stats({"a": torch.ones(0)})
    flags = [p.requires_grad for p in model.parameters()]
    assert all(flags)
