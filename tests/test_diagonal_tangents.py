"""The tangent route of the fast diagonal: exact where taken, taken where it should be.

* Drawn residual CNNs (smooth and piecewise-linear activations, pooling, 1-d and 2-d
  convolutions with strides, padding and dilation) and pre-norm transformer stacks,
  the graph route's columns declined: the parameters upstream of columns take the
  tangent route, and
  the Hessian and GGN diagonals equal the dense float64 ones to 1e-10, also one
  direction at a time.
* Its pieces against their definitions: the site tangents in closed form against
  ``jvp`` of the site call, the convolution by its flipped kernel against
  ``F.conv2d``, the strided-slice patches against ``F.unfold``.
* The benchmark's tanh ResNet plans its convolutions on the tangent route.
"""

from __future__ import annotations

import pytest
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
    tanh_resnet,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_diagonal_junctions import Stack
from torch import nn
from torch.func import vmap

import torch_secorder.func._graph as graph
import torch_secorder.func._tangents as tangents
from torch_secorder._chunks import chunk_policy
from torch_secorder.func._patches import unfold
from torch_secorder.func._sites import make_site
from torch_secorder.func._tape import record

DT = torch.float64


def _check(built: Built, one_at_a_time: bool = True) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph, "COST_RATIO", 1e9)  # every origin of columns declined
        patch.setattr(graph, "SMALL_COST", -1.0)
        routes = set(ours_plan(built).values())  # origins of no columns stay on the graph
        assert "tangent" in routes and routes <= {"graph", "tangent"}
        expected = dense_hessian_diagonal(built)
        assert_close(ours_hessian_diagonal(built), expected)
        assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))
        if one_at_a_time:
            patch.setattr(chunk_policy, "cpu_elements", 1)  # one direction at a time
            assert_close(ours_hessian_diagonal(built), expected)


class Block(nn.Module):
    def __init__(self, width: int, act: nn.Module, conv: type, kernel: int, dilation: int):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv1 = conv(width, width, kernel, padding=pad, dilation=dilation)
        self.conv2 = conv(width, width, kernel, padding=pad, dilation=dilation)
        self.act = act

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


ACTS = {"tanh": nn.Tanh(), "gelu": nn.GELU(), "silu": nn.SiLU(), "relu": nn.ReLU()}


@settings(max_examples=8, deadline=None)
@given(
    dim=st.sampled_from([1, 2]),
    width=st.integers(1, 3),
    act=st.sampled_from(sorted(ACTS)),
    kernel=st.sampled_from([1, 3]),
    dilation=st.integers(1, 2),
    stride=st.integers(1, 2),
    pool=st.sampled_from(["avg", "max"]),
    loss=st.sampled_from(["ce", "mse"]),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_residual_cnn_matches_dense(dim, width, act, kernel, dilation, stride, pool, loss, n, seed):
    torch.manual_seed(seed)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    pools = {
        (1, "avg"): nn.AvgPool1d(2),
        (1, "max"): nn.MaxPool1d(2),
        (2, "avg"): nn.AvgPool2d(2),
        (2, "max"): nn.MaxPool2d(2),
    }
    size = 8 if dim == 1 else 4
    out = (size - 1) // stride + 1  # the first convolution: kernel 3, padding 1
    model = nn.Sequential(
        conv(2, width, 3, padding=1, stride=stride),
        ACTS[act],
        Block(width, ACTS[act], conv, kernel, dilation),
        pools[(dim, pool)],
        nn.Flatten(),
        nn.Linear(width * (out // 2) ** dim, 3),
    ).to(DT)
    x = torch.randn(n, 2, *([size] * dim), dtype=DT)
    if loss == "ce":
        built = Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,)))
    else:
        built = Built(model, nn.MSELoss(reduction="sum"), x, torch.randn(n, 3, dtype=DT))
    _check(built)


@settings(max_examples=6, deadline=None)
@given(
    heads=st.sampled_from([1, 2]),
    norm=st.sampled_from(["layer", "rms"]),
    seq=st.integers(1, 3),
    n=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_transformer_stack_matches_dense(heads, norm, seq, n, seed):
    """Layer/RMS norms, softmax, products of activations and embeddings: their residuals
    read as quadratic forms, the tangents through ``jvp`` of each call."""
    torch.manual_seed(seed)
    model = Stack(5, 4, heads, 1, norm, 3).to(DT)
    idx = torch.randint(0, 5, (n, seq))
    _check(Built(model, nn.CrossEntropyLoss(), idx, torch.randint(0, 3, (n,))), False)


def _site(call_fn, x, weight, bias):
    calls, _ = record(lambda p: call_fn(x, p["w"], p["b"]), {"w": weight, "b": bias})
    return make_site(calls[0], {id(weight): 0, id(bias): 1}, {0, 1})


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    lo=st.integers(0, 5),
    size=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_site_tangents_in_closed_form(kind, kernel, stride, padding, dilation, lo, size, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "linear":
        x = torch.randn(2, 3, 4, generator=gen, dtype=DT)
        weight = torch.randn(5, 4, generator=gen, dtype=DT)
        site = _site(F.linear, x, weight, torch.randn(5, generator=gen, dtype=DT))
    else:
        shape = (2, 3, 7) if kind == "conv1d" else (2, 3, 6, 7)
        x = torch.randn(*shape, generator=gen, dtype=DT)
        weight = torch.randn(4, 3, *([kernel] * (len(shape) - 2)), generator=gen, dtype=DT)
        func = F.conv1d if kind == "conv1d" else F.conv2d

        def call_fn(x_, w, b):
            return func(x_, w, b, stride, padding, dilation)

        site = _site(call_fn, x, weight, torch.randn(4, generator=gen, dtype=DT))
    for role in ("weight", "bias"):
        param = site.bound[role]
        first = min(lo, param.numel() - 1)
        last = min(param.numel(), first + size)
        found = tangents._dense(tangents._site_tangent(site, role, first, last))
        basis = torch.eye(param.numel(), dtype=DT)[first:last].reshape(-1, *param.shape)
        along = tangents._along(site.call, param)
        assert_close(found, vmap(along)(basis))


@settings(max_examples=25, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_convolution_by_its_flipped_kernel(kernel, padding, dilation, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels[0], 7, 8, generator=gen, dtype=DT)
    w = torch.randn(channels[1], channels[0], *kernel, generator=gen, dtype=DT)
    fits = all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, kernel))
    calls, out = record(lambda p: F.conv2d(p["x"], w, None, 1, padding, dilation), {"x": x})
    t = torch.randn(3, *x.shape, generator=gen, dtype=DT)
    found = tangents._linear_in_input(calls[0], t)
    if not fits:  # padding beyond the flipped kernel's reach: not this way
        assert found is None
        return
    expected = torch.stack([F.conv2d(ti, w, None, 1, padding, dilation) for ti in t])
    assert_close(found, expected)


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_patches_equal_unfold(kernel, padding, dilation, stride, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 9, 8, generator=gen, dtype=DT)
    assert torch.equal(
        unfold(x, kernel, dilation, padding, stride),
        F.unfold(x, kernel, dilation, padding, stride),
    )


def test_tanh_resnet_plans_its_convolutions_on_the_tangent_route():
    """The benchmark's 2-block tanh ResNet (width 8, 16x16, batch 16): the columns of its
    activations would cost more than sweeping, the tangents do not."""
    torch.manual_seed(0)
    model = tanh_resnet(width=8, blocks=2, size=16, classes=10).to(DT).eval()
    x = torch.randn(16, 3, 16, 16, dtype=DT)
    built = Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 10, (16,)))
    plan = ours_plan(built)
    assert {k for k, r in plan.items() if r != "tangent"} == {"7.weight", "7.bias"}
    assert plan["7.weight"] == "graph"


def test_residuals_too_large_for_columns_take_tangents(monkeypatch):
    """A curved call whose residual would not fit as columns (RESIDUAL_ENTRIES) is not
    crossed by the graph route; the tangent route reads its curvature as a second
    directional derivative (``jvp`` of ``jvp``), exactly."""
    import torch_secorder.func._rules as rules

    torch.manual_seed(0)
    model = Stack(5, 4, 2, 1, "layer", 3).to(DT)
    idx = torch.randint(0, 5, (2, 3))
    built = Built(model, nn.CrossEntropyLoss(), idx, torch.tensor([0, 2]))
    monkeypatch.setattr(rules, "RESIDUAL_ENTRIES", 0)
    plan = ours_plan(built)
    assert plan["blocks.0.qkv.weight"] == "tangent" and plan["emb.weight"] == "tangent"
    assert set(plan.values()) <= {"graph", "tangent"}
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
    assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))


def test_tangents_that_torch_func_refuses_leave_the_parameters_to_the_sweep(monkeypatch):
    """Where the tangent route raises (a call whose derivatives torch.func cannot take),
    its parameters take the next exact route (the sweep), never a wrong number."""
    torch.manual_seed(1)
    model = tanh_resnet(width=2, blocks=1, size=4, classes=3).to(DT)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    built = Built(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2]))
    monkeypatch.setattr(graph, "COST_RATIO", 1e9)
    monkeypatch.setattr(graph, "SMALL_COST", -1.0)

    def refuse(*args, **kwargs):
        raise NotImplementedError("no forward-mode derivative")

    monkeypatch.setattr(tangents, "_forward", refuse)
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
