"""Residual streams on the graph route: junctions, norm residuals in closed form, unit blocks.

* :class:`~torch_secorder.func._graph._Junction`: columns living on one position each,
  summed into per-position blocks, leave as eigen-columns whose signed outer products
  are the same blocks (or unchanged when they were fewer); spread columns walk on.
* The layer/RMS norm residual in closed form equals the dense per-sample Hessian of
  :math:`\\langle g, \\text{norm}(x)\\rangle`, for drawn shapes, weights and eps.
* :func:`~torch_secorder.func._graph._linear_squares` through unit blocks (columns on
  a few units each, grouped) equals the per-sample squares formed directly.
* Drawn pre-norm transformer stacks (junctions on the residual stream): the graph route
  is taken, and the Hessian and GGN diagonals equal the dense float64 ones to 1e-10;
  the junctions do compress; rows longer than the old dense limit stay on the route.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import assert_close
from diagonal_settings import (
    Built,
    dense_ggn_diagonal,
    dense_hessian_diagonal,
    ours_ggn_diagonal,
    ours_hessian_diagonal,
    ours_plan,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import hessian

import torch_secorder.func._graph as graph
from torch_secorder.func._rules import DENSE_LIMIT, rule_for
from torch_secorder.func._sites import make_site
from torch_secorder.func._tape import record

DT = torch.float64


def _signed_outer(cols: Tensor, sign: Tensor) -> Tensor:
    """Per sample, :math:`\\sum_k s_{kn} c_{kn} c_{kn}^\\top`: ``(N, E, E)``."""
    k, n = sign.shape
    flat = cols.reshape(k, n, -1)
    return torch.einsum("kne,knf,kn->nef", flat, flat, sign)


def _one_position_columns(k: int, n: int, p: int, u: int, gen: torch.Generator):
    """``k`` columns ``(k, n, p, u)``, each (per sample) on one random position."""
    cols = torch.zeros(k, n, p, u, dtype=DT)
    where = torch.randint(0, p, (k, n), generator=gen)
    values = torch.randn(k, n, u, generator=gen, dtype=DT)
    for i in range(k):
        for j in range(n):
            cols[i, j, where[i, j]] = values[i, j]
    sign = torch.where(torch.rand(k, n, generator=gen) < 0.5, -1.0, 1.0).to(DT)
    return cols, sign


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    p=st.integers(1, 4),
    u=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    flat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_junction_blocks_reproduce_the_columns(n, p, u, sizes, flat, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, u) if p == 1 and flat else (n, p, u)
    tensor = torch.zeros(shape, dtype=DT)
    junction = graph._Junction(tensor, index=0, budget=2**20)
    parts = [_one_position_columns(k, n, p, u, gen) for k in sizes]
    for cols, sign in parts:
        assert junction.take(cols.reshape(-1, *shape), sign)
    expected = sum(_signed_outer(c, s) for c, s in parts)
    cols, sign = junction.columns()
    assert cols.shape[1:] == shape and sign.shape == (cols.shape[0], n)
    assert_close(_signed_outer(cols, sign), expected)
    if sum(sizes) <= p * u:  # fewer than the blocks would give: passed on unchanged
        assert junction.blocks is None and cols.shape[0] == sum(sizes)
    else:  # at most u columns per position
        assert junction.blocks is not None and cols.shape[0] <= p * u
        assert bool(((cols.reshape(cols.shape[0], n, p, u) != 0).any(-1).sum(-1) <= 1).all())


def test_junction_lets_spread_columns_walk_on():
    tensor = torch.zeros(2, 3, 4, dtype=DT)
    junction = graph._Junction(tensor, index=0, budget=2**20)
    spread = torch.randn(5, 2, 3, 4, dtype=DT)
    assert not junction.take(spread, torch.ones(5, 2, dtype=DT))
    assert junction.count == 0


def test_junction_respects_the_budget():
    """Kept columns beyond the budget are folded into blocks at once; blocks beyond it
    are not formed (the columns walk on, the kept ones leave unchanged)."""
    gen = torch.Generator().manual_seed(3)
    tensor = torch.zeros(2, 3, 4, dtype=DT)  # blocks: 2 * 3 * 4 * 4 = 96 entries
    junction = graph._Junction(tensor, index=0, budget=100)
    cols, sign = _one_position_columns(6, 2, 3, 4, gen)  # 6 * 24 = 144 entries kept
    assert junction.take(cols, sign)
    assert junction.blocks is not None
    out, out_sign = junction.columns()
    assert_close(_signed_outer(out, out_sign), _signed_outer(cols, sign))
    small = graph._Junction(tensor, index=0, budget=90)
    first, first_sign = _one_position_columns(3, 2, 3, 4, gen)  # 72 entries: kept
    assert small.take(first, first_sign)
    assert not small.take(cols, sign) and small.blocks is None and small.count == 3
    out, out_sign = small.columns()
    assert_close(_signed_outer(out, out_sign), _signed_outer(first, first_sign))


def _norm_call(kind: str, x: Tensor, shape: tuple[int, ...], weight, eps):
    def f(p):
        if kind == "layer_norm":
            return F.layer_norm(p["x"], shape, weight, None, eps)
        return F.rms_norm(p["x"], shape, weight, eps)

    calls, _ = record(f, {"x": x})
    return calls[0]


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["layer_norm", "rms_norm"]),
    n=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    norm=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    weighted=st.booleans(),
    eps=st.sampled_from([None, 1e-5, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_norm_residual_in_closed_form_matches_dense(kind, n, lead, norm, weighted, eps, seed):
    torch.manual_seed(seed)
    shape = tuple(norm)
    x = torch.randn(n, *lead, *shape, dtype=DT)
    weight = torch.randn(shape, dtype=DT) if weighted else None
    if kind == "layer_norm" and eps is None:
        eps = 1e-5
    call = _norm_call(kind, x, shape, weight, eps)
    rule = rule_for(call)
    active = [call.args[0]]
    assert rule.residual_ok(call, active)
    g = torch.randn_like(call.out)
    res = rule.residual(call, active, g)
    key = id(active[0])
    got = _signed_outer(res.columns[key], res.sign)
    got = got + torch.diag_embed(res.diag[key].reshape(n, -1))

    def phi(sample: Tensor, g_sample: Tensor) -> Tensor:
        out = call.func(sample[None], *call.args[1:], **call.kwargs)
        return (out[0] * g_sample).sum()

    expected = torch.stack(
        [hessian(phi)(active[0][i], g[i]).reshape(got.shape[1:]) for i in range(n)]
    )
    assert_close(got, expected)


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


class Block(nn.Module):
    """Pre-norm attention (heads written out) and GELU MLP, each added to the stream."""

    def __init__(self, d: int, heads: int, norm: str):
        super().__init__()
        make = (lambda: nn.LayerNorm(d)) if norm == "layer" else (lambda: RMSNorm(d))
        self.n1, self.n2 = make(), make()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class PostNorm(nn.Module):
    """``norm(x + drop(mlp(x)))`` with eval dropouts (calls returning their input): the
    MLP's tensors are read twice, but a path goes around them (no junction there)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop1, self.drop2 = nn.Dropout(0.1), nn.Dropout(0.1)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = self.norm1(x)
        return self.norm2(x + self.drop2(self.fc2(self.drop1(torch.tanh(self.fc1(x))))))


@settings(max_examples=8, deadline=None)
@given(seq=st.integers(1, 3), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_post_norm_stream_matches_dense(seq, n, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), PostNorm(4), PostNorm(4)).to(DT).eval()
    x = torch.randn(n, seq, 3, dtype=DT)
    built = Built(model, nn.MSELoss(), x, torch.randn(n, seq, 4, dtype=DT))
    assert set(ours_plan(built).values()) == {"graph"}
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))


class Stack(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, blocks: int, norm: str, classes: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads, norm) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        return self.head(self.out_norm(self.blocks(self.emb(idx))).mean(1))


@settings(max_examples=8, deadline=None)
@given(
    heads=st.sampled_from([1, 2]),
    blocks=st.integers(1, 2),
    norm=st.sampled_from(["layer", "rms"]),
    seq=st.integers(1, 3),
    n=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_transformer_stack_matches_dense(heads, blocks, norm, seq, n, seed):
    torch.manual_seed(seed)
    model = Stack(5, 4, heads, blocks, norm, 3).to(DT)
    idx = torch.randint(0, 5, (n, seq))
    built = Built(model, nn.CrossEntropyLoss(), idx, torch.randint(0, 3, (n,)))
    assert set(ours_plan(built).values()) == {"graph"}
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
    assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))


def test_junctions_compress_the_residual_stream(monkeypatch):
    """The per-position columns of the MLP and norms meet at the stream and leave as at
    most ``d`` per position; the numbers stay exact, also one column at a time."""
    torch.manual_seed(0)
    model = Stack(7, 3, 1, 1, "layer", 2).to(DT)
    idx = torch.randint(0, 7, (2, 3))
    built = Built(model, nn.CrossEntropyLoss(), idx, torch.tensor([0, 1]))
    merged = []
    columns = graph._Junction.columns

    def spy(self):
        cols, sign = columns(self)
        merged.append((self.count, cols.shape[0], self.blocks is not None))
        return cols, sign

    monkeypatch.setattr(graph._Junction, "columns", spy)
    expected = dense_hessian_diagonal(built)
    assert_close(ours_hessian_diagonal(built), expected)
    assert any(blocks and out <= 3 * 3 < count for count, out, blocks in merged)
    merged.clear()
    assert_close(ours_hessian_diagonal(built, chunk_size=1), expected)
    assert merged


def test_long_rows_stay_on_the_graph_route(monkeypatch):
    """Samples of more entries than the dense residual's limit: the norms' closed form
    crosses them (the cost model, which would sweep these few parameters, set aside)."""
    torch.manual_seed(1)
    d, seq = 4, DENSE_LIMIT // 4 + 3
    model = nn.Sequential(
        nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh(), RMSNorm(d), nn.Linear(d, 3)
    ).to(DT)
    x = torch.randn(2, seq, d, dtype=DT)
    built = Built(model, nn.MSELoss(), x, torch.randn(2, seq, 3, dtype=DT))
    monkeypatch.setattr(graph, "COST_RATIO", 0.0)
    assert set(ours_plan(built).values()) == {"graph"}
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))


def _linear_site(x: Tensor, w: Tensor, b: Tensor):
    calls, _ = record(lambda p: F.linear(x, p["w"], p["b"]), {"w": w, "b": b})
    return make_site(calls[0], {id(w): 0, id(b): 1}, {0, 1})


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    t=st.integers(2, 4),
    d=st.integers(4, 6),
    o=st.integers(1, 5),
    k=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_linear_squares_through_unit_blocks(n, t, d, o, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=gen, dtype=DT)
    w, b = torch.randn(o, d, generator=gen, dtype=DT), torch.randn(o, generator=gen, dtype=DT)
    site = _linear_site(x, w, b)
    cols = torch.randn(k, n, t, o, generator=gen, dtype=DT)
    units = torch.rand(k, 1, 1, o, generator=gen) < 0.5  # each column on a few units
    cols = cols * units
    sign = torch.where(torch.rand(k, n, generator=gen) < 0.5, -1.0, 1.0).to(DT)
    found = graph._linear_squares(site, cols, sign, budget=2**20)
    per_w = torch.einsum("knto,ntd->knod", cols, x)
    per_b = cols.sum(2)
    assert_close(found["weight"], torch.einsum("knod,kn->od", per_w * per_w, sign))
    assert_close(found["bias"], torch.einsum("kno,kn->o", per_b * per_b, sign))


def _tape(f, params):
    calls, _ = record(f, params)
    return calls


def test_per_position_calls():
    """Which rules keep a column on its position (the cost model's junction reach)."""
    x = torch.randn(2, 3, 4, dtype=DT)
    w, w2 = torch.randn(5, 4, dtype=DT), torch.randn(4, 4, dtype=DT)
    y = torch.randn(2, 3, 4, dtype=DT)

    def f(p):
        h = p["x"]
        F.linear(h, w)
        F.layer_norm(h, (4,))
        F.layer_norm(h, (3, 4))
        torch.tanh(h)
        h + y
        h + y[:, :1]  # broadcast over positions: a column read on every position
        h @ w2
        torch.softmax(h, 1)
        return h.sum()

    calls = _tape(f, {"x": x})
    calls = [
        c for c in calls if c.func is not Tensor.sum and any(t is x for t in c.tensor_inputs())
    ]
    expected = [True, True, False, True, True, True, False, False]
    for call, want in zip(calls, expected, strict=True):
        active = [x]
        assert rule_for(call).per_position(call, active) is want, call.func


def test_cost_charges_a_junction_once(monkeypatch):
    """Per-position origins are charged down to the junction and, below it, as at most
    its columns: less than walking every column to the end."""
    torch.manual_seed(4)
    model = Stack(7, 4, 2, 1, "layer", 3).to(DT)
    idx = torch.randint(0, 7, (2, 6))
    y = torch.tensor([0, 2])
    calls, value = record(
        lambda p: F.cross_entropy(torch.func.functional_call(model, p, (idx,)), y),
        dict(model.named_parameters()),
    )
    leaves = list(dict(model.named_parameters()).values())
    from torch_secorder.func.fast_diagonal import _find_sites

    sites = _find_sites(calls, leaves)
    monkeypatch.setattr(graph, "SMALL_COST", -1.0)
    plan = graph._Plan(calls, value, sites, 0)
    assert plan.junctions()  # the residual stream
    with_junctions = {s.index: c for s, c, _ in plan.origin_costs()}
    monkeypatch.setattr(graph._Plan, "junctions", lambda self: {})
    without = {s.index: c for s, c, _ in plan.origin_costs()}
    assert with_junctions.keys() == without.keys()
    assert all(with_junctions[i] <= without[i] for i in without)
    assert any(with_junctions[i] < without[i] for i in without)
