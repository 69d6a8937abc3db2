"""The fast exact Hessian diagonal against the dense Hessian, and which route it takes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_secorder._chunks import chunk_policy
from torch_secorder.core import model_hessian_diagonal, model_hessian_trace
from torch_secorder.func import diagonal_plan, fast_hessian_diagonal
from torch_secorder.problems._problem import module_problem

DT = torch.float64
ACTS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


def dense_diagonal(model, loss_fn, x, y) -> list[torch.Tensor]:
    """Oracle: the diagonal of the dense Hessian (autograd, buffers restored)."""
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach().clone() for _, p in model.named_parameters()]
    sizes = [v.numel() for v in values]
    saved = [b.detach().clone() for b in model.buffers()]

    def f(flat):
        pieces = torch.split(flat, sizes)
        p = {n: c.view_as(v) for n, c, v in zip(names, pieces, values, strict=False)}
        return loss_fn(torch.func.functional_call(model, p, (x,)), y)

    flat = torch.cat([v.reshape(-1) for v in values])
    H = torch.autograd.functional.hessian(f, flat)
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved, strict=False):
            b.copy_(s)
    return list(torch.split(torch.diagonal(H), sizes))


def plan_of(model, loss_fn, x, y) -> dict[str, str]:
    with module_problem(model, loss_fn, x, y) as problem:
        routes = diagonal_plan(problem.pure, problem.primals)
        return dict(zip([problem.names[i] for i in problem.active], routes, strict=False))


class Tokens(nn.Module):
    """Embedding -> linear on (N, T, d) -> optional attention over positions -> pool -> head."""

    def __init__(self, vocab, d, classes, attention, act):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.attention, self.act = attention, act()

    def forward(self, idx):
        h = self.act(self.lin(self.emb(idx)))
        if self.attention:
            h = torch.softmax(h @ h.transpose(1, 2), dim=-1) @ h
        return self.head(self.ln(h).mean(1))


class Tied(nn.Module):
    def __init__(self, d, classes, act):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.act = act()

    def forward(self, x):
        return self.head(self.act(self.shared(self.act(self.shared(x)))))


def build(arch: str, act: str, seed: int, n: int, classes: int):
    torch.manual_seed(seed)
    a = ACTS[act]
    if arch == "mlp":
        model, x = (
            nn.Sequential(nn.Linear(4, 5), a(), nn.Linear(5, 4), a(), nn.Linear(4, classes)),
            torch.randn(n, 4),
        )
    elif arch == "layernorm":
        model, x = (
            nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), a(), nn.Linear(5, classes)),
            torch.randn(n, 4),
        )
    elif arch in ("bn_train", "bn_eval"):
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), a(), nn.Linear(5, classes))
        model.train(arch == "bn_train")
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
        x = torch.randn(n, 4)
    elif arch == "conv1d":
        model, x = (
            nn.Sequential(
                nn.Conv1d(2, 3, 3), a(), nn.Conv1d(3, 2, 1), nn.Flatten(), nn.Linear(8, classes)
            ),
            torch.randn(n, 2, 6),
        )
    elif arch == "conv2d":
        model, x = (
            nn.Sequential(
                nn.Conv2d(1, 2, 2), nn.GroupNorm(1, 2), a(), nn.Flatten(), nn.Linear(8, classes)
            ),
            torch.randn(n, 1, 3, 3),
        )
    elif arch in ("tokens", "attention"):
        model = Tokens(7, 4, classes, arch == "attention", a)
        x = torch.randint(0, 7, (n, 3))
    elif arch == "tied":
        model, x = Tied(4, classes, a), torch.randn(n, 4)
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.to(DT), x if x.dtype == torch.long else x.to(DT)


def loss_and_target(loss: str, reduction: str, n: int, classes: int):
    if loss == "mse":
        return nn.MSELoss(reduction=reduction), torch.randn(n, classes, dtype=DT)
    return nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, classes, (n,))


ARCHS = [
    "mlp",
    "layernorm",
    "bn_train",
    "bn_eval",
    "conv1d",
    "conv2d",
    "tokens",
    "attention",
    "tied",
]


@settings(max_examples=30, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    act=st.sampled_from(sorted(ACTS)),
    loss=st.sampled_from(["mse", "ce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    n=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_hessian(arch, act, loss, reduction, n, seed):
    classes = 3
    model, x = build(arch, act, seed, n, classes)
    loss_fn, y = loss_and_target(loss, reduction, n, classes)
    fast = model_hessian_diagonal(model, loss_fn, x, y, progress=False)
    dense = dense_diagonal(model, loss_fn, x, y)
    for a, b in zip(fast, dense, strict=False):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0), (a.reshape(-1) - b).abs().max()
    trace = model_hessian_trace(model, loss_fn, x, y, progress=False)
    assert math.isclose(float(trace), float(sum(d.sum() for d in dense)), abs_tol=1e-9)


def test_deep_chain_with_every_term():
    """Five linear layers: diagonal terms crossing two layers become signed columns."""
    torch.manual_seed(1)
    layers = []
    for i, (a, b) in enumerate([(3, 5), (5, 4), (4, 4), (4, 3), (3, 3)]):
        layers += [nn.Linear(a, b), [nn.Tanh, nn.Softplus, nn.Sigmoid, nn.GELU, nn.Identity][i]()]
    model = nn.Sequential(*layers[:-1]).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    for loss_fn, y in [
        (nn.CrossEntropyLoss(), torch.tensor([0, 2, 1, 1])),
        (nn.CrossEntropyLoss(reduction="sum"), torch.rand(4, 3, dtype=DT)),
        (nn.MSELoss(), torch.randn(4, 3, dtype=DT)),
    ]:
        assert set(plan_of(model, loss_fn, x, y).values()) == {"graph"}
        fast = model_hessian_diagonal(model, loss_fn, x, y, progress=False)
        for a, b in zip(fast, dense_diagonal(model, loss_fn, x, y), strict=False):
            assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)


def conv_chain(dim, act, stride, padding, dilation, seed, n, classes):
    """conv -> act -> conv -> act -> flatten -> linear, on a 1-d or 2-d input."""
    torch.manual_seed(seed)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    a = ACTS[act]
    x = torch.randn(n, 2, *([6] * dim), dtype=DT)
    body = nn.Sequential(
        conv(2, 3, 2, padding=padding, dilation=dilation),
        a(),
        conv(3, 2, 2, stride=stride, padding=padding),
        a(),
        nn.Flatten(),
    ).to(DT)
    width = body(x).shape[1]
    return nn.Sequential(*body, nn.Linear(width, classes)).to(DT), x


@settings(max_examples=12, deadline=None)
@given(
    dim=st.sampled_from([1, 2]),
    act=st.sampled_from(["tanh", "sigmoid"]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    dilation=st.sampled_from([1, 2]),
    loss=st.sampled_from(["mse", "ce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_chain_through_convolutions(dim, act, stride, padding, dilation, loss, reduction, n, seed):
    """A chain of convolutions on the graph route: exact against the dense Hessian."""
    classes = 3
    model, x = conv_chain(dim, act, stride, padding, dilation, seed, n, classes)
    loss_fn, y = loss_and_target(loss, reduction, n, classes)
    assert set(plan_of(model, loss_fn, x, y).values()) == {"graph"}
    fast = model_hessian_diagonal(model, loss_fn, x, y, progress=False)
    for a, b in zip(fast, dense_diagonal(model, loss_fn, x, y), strict=True):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0), (a.reshape(-1) - b).abs().max()


def test_convolutions_on_and_off_the_graph_route_stay_exact(monkeypatch):
    """Grouped convolutions and reflect padding of the data (a constant) take the graph
    route; reflect padding inside the network has no rule, so the layer upstream of it
    takes another route; a budget below one column's entries walks the columns one at a
    time, still on the graph route.  Exact against the dense Hessian throughout."""
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    x, y = torch.randn(2, 2, 4, 4, dtype=DT), torch.tensor([0, 2])
    for conv, first_pads in (
        (nn.Conv2d(2, 2, 3, padding=1, groups=2), False),
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), False),
        (nn.Conv2d(2, 2, 3, padding=1, dilation=2, padding_mode="reflect"), True),
    ):
        first = conv if first_pads else nn.Conv2d(2, 2, 1)
        second = nn.Conv2d(2, 2, 1) if first_pads else conv
        width = 8 if conv.dilation == (2, 2) else 32
        model = nn.Sequential(first, nn.Tanh(), second, nn.Flatten(), nn.Linear(width, 3))
        model = model.to(DT)
        plan = plan_of(model, ce, x, y)
        padded_inside = conv.padding_mode == "reflect" and not first_pads
        assert (plan["0.weight"] != "graph") == padded_inside
        assert {plan[k] for k in plan if not k.startswith("0.")} == {"graph"}
        fast = model_hessian_diagonal(model, ce, x, y, progress=False)
        for a, b in zip(fast, dense_diagonal(model, ce, x, y), strict=True):
            assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)
    model, x = conv_chain(2, "tanh", 2, 1, 1, 0, 2, 3)
    assert set(plan_of(model, ce, x, y).values()) == {"graph"}
    monkeypatch.setattr(chunk_policy, "cpu_elements", 50)  # below one column's entries
    assert set(plan_of(model, ce, x, y).values()) == {"graph"}
    fast = model_hessian_diagonal(model, ce, x, y, progress=False)
    for a, b in zip(fast, dense_diagonal(model, ce, x, y), strict=True):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)


def test_routes_are_taken_where_they_should_be():
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    y = torch.randint(0, 3, (6,))
    # a plain MLP: the graph route
    model, x = build("mlp", "tanh", 0, 6, 3)
    assert set(plan_of(model, ce, x, y).values()) == {"graph"}
    # a layer norm: the graph route backpropagates through it
    model, x = build("layernorm", "tanh", 0, 6, 3)
    assert set(plan_of(model, ce, x, y).values()) == {"graph"}
    # batch norm in training mode couples the samples: the layers upstream of it are
    # swept, its own affine part (rows independent) takes the layer route
    model, x = build("bn_train", "tanh", 0, 6, 3)
    plan = plan_of(model, ce, x, y)
    assert plan["0.weight"] == plan["0.bias"] == "sweep"
    assert plan["1.weight"] == "rows" and plan["3.weight"] == "graph"
    model.eval()
    assert set(plan_of(model, ce, x, y).values()) == {"graph"}
    # tied weights: swept; the untied head: by the graph
    model, x = build("tied", "tanh", 0, 6, 3)
    plan = plan_of(model, ce, x, y)
    assert plan["shared.weight"] == plan["shared.bias"] == "sweep"
    assert plan["head.weight"] == "graph"
    # tokens with attention: the graph route crosses softmax and both products
    torch.manual_seed(0)
    model = Tokens(50, 16, 3, attention=True, act=nn.Tanh).to(DT)
    idx = torch.randint(0, 50, (6, 3))
    assert set(plan_of(model, ce, idx, y).values()) == {"graph"}
    # a linear applied to tokens with a per-token loss
    tok = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    xt, yt = torch.randn(3, 4, 4, dtype=DT), torch.randn(3, 4, 2, dtype=DT)
    assert set(plan_of(tok, nn.MSELoss(), xt, yt).values()) == {"graph"}
    fast = model_hessian_diagonal(tok, nn.MSELoss(), xt, yt, progress=False)
    for a, b in zip(fast, dense_diagonal(tok, nn.MSELoss(), xt, yt), strict=False):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)
    # convolutions (grouped ones too) on the graph route
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 1)).to(DT)
    xc, yc = torch.randn(2, 2, 5, 5, dtype=DT), torch.randn(2, 4, 5, 5, dtype=DT)
    assert set(plan_of(conv, nn.MSELoss(), xc, yc).values()) == {"graph"}
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Conv2d(4, 4, 1))
    conv = nn.Sequential(grouped, nn.Flatten(), nn.Linear(100, 3)).to(DT)
    assert set(plan_of(conv, ce, xc, y[:2]).values()) == {"graph"}
    small = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1)).to(DT)
    fast = model_hessian_diagonal(small, nn.MSELoss(), xc, yc[:, :2], progress=False)
    for a, b in zip(fast, dense_diagonal(small, nn.MSELoss(), xc, yc[:, :2]), strict=False):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)


def test_rows_route_matches_dense_on_conv_and_tokens():
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1)).to(DT)
    xc, yc = torch.randn(2, 2, 4, 4, dtype=DT), torch.randn(2, 2, 4, 4, dtype=DT)
    fast = model_hessian_diagonal(conv, nn.MSELoss(), xc, yc, progress=False)
    for a, b in zip(fast, dense_diagonal(conv, nn.MSELoss(), xc, yc), strict=False):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)
    model = Tokens(20, 6, 3, attention=True, act=nn.GELU).to(DT)
    idx, y = torch.randint(0, 20, (3, 2)), torch.tensor([0, 1, 2])
    idx[0, 0] = idx[0, 1]  # a token repeated inside a sample: the cross terms count
    assert plan_of(model, nn.CrossEntropyLoss(), idx, y)["emb.weight"] == "graph"
    fast = model_hessian_diagonal(model, nn.CrossEntropyLoss(), idx, y, progress=False)
    for a, b in zip(fast, dense_diagonal(model, nn.CrossEntropyLoss(), idx, y), strict=False):
        assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)


def test_engine_function_and_chunking():
    torch.manual_seed(0)
    model, x = build("layernorm", "gelu", 0, 5, 3)
    y = torch.randn(5, 3, dtype=DT)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    dense = dense_diagonal(model, F.mse_loss, x, y)
    for chunk in (1, 2, None):
        fast = fast_hessian_diagonal(f, params, chunk_size=chunk)
        for name, b in zip(params, dense, strict=False):
            assert torch.allclose(fast[name].reshape(-1), b, atol=1e-10, rtol=0)


def test_model_left_untouched_and_float32():
    model, x = build("bn_train", "tanh", 0, 4, 3)
    model = model.float()
    x = x.float()
    y = torch.randint(0, 3, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    fast = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, progress=False)
    assert all(d.dtype == torch.float32 for d in fast)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=False))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert model.training


def test_plan_rejects_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        diagonal_plan(lambda p: p["x"].sum(), {"x": torch.ones(2)}, kind="fisher")


def test_layers_upstream_of_coupled_rows_are_not_probed(monkeypatch):
    """Probed last layer first: the first convolution feeds one whose rows are coupled,
    so it goes to the sweep unprobed (weight and bias in one sweep); numbers exact.
    (A ``cumsum``, which has no graph rule, keeps the graph route off.)"""
    import torch_secorder.func.fast_diagonal as fd

    probed = []
    structure = fd._structure

    def counting(product, site, *args):
        probed.append(site.call.func)
        return structure(product, site, *args)

    monkeypatch.setattr(fd, "_structure", counting)
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, stride=2, padding=1, padding_mode="reflect"),  # no graph rule
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 4),
    ).to(DT)
    x, y = torch.randn(3, 2, 6, 6, dtype=DT), torch.tensor([0, 3, 1])

    def loss_fn(out, target):
        return F.cross_entropy(torch.cumsum(out, 1), target)

    plan = plan_of(model, loss_fn, x, y)
    assert probed == [F.linear, F.conv2d]
    assert plan["5.weight"] == plan["5.bias"] == "rows"
    assert {plan[f"{i}.{r}"] for i in (0, 2) for r in ("weight", "bias")} == {"sweep"}
    for chunk in (None, 7):
        fast = model_hessian_diagonal(model, loss_fn, x, y, chunk_size=chunk)
        dense = dense_diagonal(model, loss_fn, x, y)
        for a, b in zip(fast, dense, strict=True):
            assert torch.allclose(a.reshape(-1), b, atol=1e-10, rtol=0)
