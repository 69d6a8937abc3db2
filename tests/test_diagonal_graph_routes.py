"""The graph route of the fast diagonal: taken where it should be, exact where taken.

* Every BackPACK and curvlinops setting of tests/diagonal_settings.py: the plan of
  :func:`torch_secorder.func.diagonal_plan` meets the setting's expectation (the fast
  route wherever the issue demands it).  Their numbers are checked in
  tests/test_diagonal_settings_*.py.
* Drawn residual CNNs and attention blocks: the graph route is taken and the Hessian
  and GGN diagonals equal the dense float64 ones to 1e-10, also in tiny chunks of
  columns.
* Where the graph route must not run: calls without a rule, training-mode batch norm
  (the batch couples the samples), too expensive columns.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from diagonal_settings import (
    BACKPACK_SETTINGS,
    CURVLINOPS_SETTINGS,
    Built,
    Setting,
    dense_ggn_diagonal,
    dense_hessian_diagonal,
    ours_ggn_diagonal,
    ours_hessian_diagonal,
    ours_plan,
    route_matches,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_secorder.func._graph as graph
from torch_secorder._chunks import chunk_policy
from torch_secorder.func import diagonal_plan

DT = torch.float64


def _name(setting: Setting) -> str:
    return setting.name


@pytest.mark.parametrize("setting", BACKPACK_SETTINGS + CURVLINOPS_SETTINGS, ids=_name)
def test_fast_route_where_demanded(setting: Setting) -> None:
    plan = ours_plan(setting.build())
    wrong = {k: r for k, r in plan.items() if not route_matches(setting.expected_route(k), r)}
    assert not wrong


class Block(nn.Module):
    def __init__(self, width: int, act: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = act

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


def resnet(width: int, act: nn.Module, pool: str, classes: int) -> nn.Module:
    pooling = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    return nn.Sequential(
        nn.Conv2d(2, width, 3, padding=1),
        act,
        Block(width, act),
        pooling,
        nn.Flatten(),
        nn.Linear(width * 4, classes),
    ).to(DT)


def _check(built: Built, route: str = "graph") -> None:
    plan = ours_plan(built)
    assert set(plan.values()) == {route}
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
    assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))


@settings(max_examples=10, deadline=None)
@given(
    width=st.integers(1, 3),
    act=st.sampled_from(["relu", "tanh", "gelu"]),
    pool=st.sampled_from(["max", "avg"]),
    loss=st.sampled_from(["ce", "mse"]),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_residual_cnn_matches_dense(width, act, pool, loss, n, seed):
    torch.manual_seed(seed)
    acts = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}
    model = resnet(width, acts[act], pool, 3)
    x = torch.randn(n, 2, 4, 4, dtype=DT)
    if loss == "ce":
        built = Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,)))
    else:
        built = Built(model, nn.MSELoss(reduction="sum"), x, torch.randn(n, 3, dtype=DT))
    _check(built)


class Attention(nn.Module):
    """Pre-LN attention over positions (heads written out), GELU MLP, mean pool, head."""

    def __init__(self, d: int, heads: int, classes: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        x = x + self.fc(F.gelu(x))
        return self.head(x.mean(1))


@settings(max_examples=8, deadline=None)
@given(
    heads=st.sampled_from([1, 2]),
    seq=st.integers(1, 3),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_dense(heads, seq, n, seed):
    torch.manual_seed(seed)
    model = Attention(4, heads, 3).to(DT)
    x = torch.randn(n, seq, 4, dtype=DT)
    _check(Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,))))


def test_chunks_of_columns_are_exact(monkeypatch):
    """A budget of a few entries: one column at a time, same numbers."""
    torch.manual_seed(0)
    model = resnet(2, nn.Tanh(), "max", 3)
    x, y = torch.randn(2, 2, 4, 4, dtype=DT), torch.tensor([0, 2])
    built = Built(model, nn.CrossEntropyLoss(), x, y)
    expected_h, expected_g = dense_hessian_diagonal(built), dense_ggn_diagonal(built)
    monkeypatch.setattr(chunk_policy, "cpu_elements", 1)  # the graph route's budget
    assert_close(ours_hessian_diagonal(built), expected_h)
    assert_close(ours_ggn_diagonal(built), expected_g)
    for chunk in (1, 3):
        assert_close(ours_hessian_diagonal(built, chunk_size=chunk), expected_h)


class Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


def test_no_rule_and_coupled_samples_fall_back():
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0])
    # a call without a rule: the layer before it is not covered, the one after is
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Cumsum(), nn.Linear(4, 3)).to(DT)
    built = Built(model, nn.CrossEntropyLoss(), x, y)
    plan = ours_plan(built)
    assert plan["0.weight"] != "graph" and plan["3.weight"] == "graph"
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
    # training-mode batch norm couples the samples: upstream of it, not the graph route
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    built = Built(model.to(DT).train(), nn.CrossEntropyLoss(), x, y)
    plan = ours_plan(built)
    assert plan["0.weight"] == "sweep" and plan["3.weight"] == "graph"
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
    # a transposed leading axis mixes the samples
    w = torch.randn(3, 4, dtype=DT)

    def f(p):
        h = torch.tanh(F.linear(x, p["w"]))
        return (h.transpose(0, 1) @ h).pow(2).sum()

    assert diagonal_plan(f, {"w": w.T.contiguous()}) == {"w": "sweep"}


def test_declined_where_columns_cost_more_than_the_sweep(monkeypatch):
    torch.manual_seed(2)
    model = resnet(2, nn.Tanh(), "avg", 3)
    x, y = torch.randn(2, 2, 4, 4, dtype=DT), torch.tensor([0, 1])
    built = Built(model, nn.CrossEntropyLoss(), x, y)
    assert set(ours_plan(built).values()) == {"graph"}
    monkeypatch.setattr(graph, "COST_RATIO", 1e9)
    monkeypatch.setattr(graph, "SMALL_COST", 0.0)
    assert "graph" not in ours_plan(built).values()
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))


@settings(max_examples=10, deadline=None)
@given(
    k1=st.integers(1, 3),
    k2=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    act=st.sampled_from(["tanh", "gelu", "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_banded_term_between_two_convolutions(k1, k2, stride, padding, dilation, act, seed):
    """A diagonal term crossing one convolution into a convolution site that reads the data:
    read off by the band of offsets (no columns) where the offsets are fewer than the
    columns saved (BAND_WORK), in columns otherwise; equal to the dense Hessian."""
    torch.manual_seed(seed)
    acts = {"tanh": nn.Tanh(), "gelu": nn.GELU(), "sigmoid": nn.Sigmoid()}
    conv2 = nn.Conv2d(2, 3, k2, stride=stride, padding=padding, dilation=dilation)
    body = nn.Sequential(nn.Conv2d(2, 2, k1, padding=1), acts[act], conv2, acts[act])
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    width = body.to(DT)(x)[0].numel()
    model = nn.Sequential(body, nn.Flatten(), nn.Linear(width, 3)).to(DT)
    built = Built(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2]))
    walks = []
    real = graph._Backprop._walk_diag
    offsets = (2 * k2 - 1) ** 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            graph._Backprop, "_walk_diag", lambda self, *a: walks.append(a) or real(self, *a)
        )
        _check(built)  # the default: the band where it is cheaper
        assert bool(walks) == (graph.BAND_WORK * offsets >= width)
        walks.clear()
        patch.setattr(graph, "BAND_WORK", 0.0)  # the band always
        _check(built)
        assert not walks
