"""core.gvp against the dense Jacobian of torch.func.jacrev (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE, assert_close, make_mlp, mlp_problems
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

from torch_secorder.core import gvp
from torch_secorder.core.gvp import (
    batch_jvp,
    batch_vjp,
    full_jacobian,
    jvp,
    model_jvp,
    model_vjp,
    vjp,
)

SETTINGS = settings(max_examples=15, deadline=None)


def flat(tensors) -> Tensor:
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    return torch.cat([t.reshape(-1) for t in tensors])


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """Oracle: the ``(output numel, n)`` Jacobian of ``model(x)``, ``parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())

    def out(*vals):
        return functional_call(model, dict(zip(names, vals, strict=True)), (x,)).reshape(-1)

    blocks = torch.func.jacrev(out, argnums=tuple(range(len(values))))(*values)
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


def random_like(params, seed: int, batch: int | None = None) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return [torch.randn(*lead, *p.shape, generator=g, dtype=DTYPE) for p in params]


@SETTINGS
@given(problem=mlp_problems(), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4))
def test_all_products_match_dense_jacobian(problem, seed, batch):
    model, x = problem.model, problem.inputs
    params = list(model.parameters())
    J = dense_jacobian(model, x)
    out_shape = model(x).shape
    v = random_like(params, seed)
    u = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    V = random_like(params, seed + 2, batch)
    U = torch.randn(
        batch, *out_shape, generator=torch.Generator().manual_seed(seed + 3), dtype=DTYPE
    )
    Vflat = torch.cat([t.reshape(batch, -1) for t in V], dim=1)

    def func():
        return model(x)

    assert_close(jvp(func, params, v), (J @ flat(v)).reshape(out_shape))
    assert_close(model_jvp(model, x, v), (J @ flat(v)).reshape(out_shape))
    assert_close(flat(vjp(func, params, u)), u.reshape(-1) @ J)
    assert_close(flat(model_vjp(model, x, u)), u.reshape(-1) @ J)
    assert_close(batch_jvp(func, params, V), (Vflat @ J.T).reshape(batch, *out_shape))
    got = batch_vjp(func, params, U, chunk_size=2)
    assert isinstance(got, list) and len(got) == len(params)
    assert_close(torch.cat([g.reshape(batch, -1) for g in got], dim=1), U.reshape(batch, -1) @ J)
    for mode in ("auto", "forward", "reverse"):
        blocks = full_jacobian(func, params, mode=mode, chunk_size=3)
        assert [tuple(b.shape) for b in blocks] == [(J.shape[0], p.numel()) for p in params]
        assert_close(torch.cat(blocks, dim=1), J)


@st.composite
def vector_closures(draw):
    """A vector-valued closure of 1-3 tensors with a 2-D output, and its pure form."""
    seed = draw(st.integers(0, 2**31 - 1))
    shapes = draw(st.lists(st.sampled_from([(2,), (3,), (2, 2), (1, 3)]), min_size=1, max_size=3))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(seed)
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    W = torch.randn(rows * cols, n, generator=g, dtype=DTYPE) / n**0.5
    values = [torch.randn(s, generator=g, dtype=DTYPE) for s in shapes]

    def pure(*vals):
        z = torch.cat([t.reshape(-1) for t in vals])
        return (torch.tanh(W @ z) * (1 + z.pow(2).sum())).reshape(rows, cols)

    return pure, values


@SETTINGS
@given(case=vector_closures(), seed=st.integers(0, 2**31 - 1))
def test_closure_products_and_create_graph(case, seed):
    pure, values = case
    params = [t.clone().requires_grad_(True) for t in values]
    argnums = tuple(range(len(values)))
    J = torch.cat(
        [b.reshape(pure(*values).numel(), -1) for b in torch.func.jacrev(pure, argnums)(*values)],
        dim=1,
    )
    v = random_like(values, seed)

    def func():
        return pure(*params)

    out_shape = pure(*values).shape
    result = jvp(func, params, v if len(v) > 1 else v[0])
    assert_close(result, (J @ flat(v)).reshape(out_shape))
    u = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    got = vjp(func, params, u.reshape(-1))  # any shape with the output's numel (as 0.0.1)
    if len(params) == 1:
        assert isinstance(got, Tensor)
    assert_close(flat(got), u.reshape(-1) @ J)

    # create_graph: d/dθ sum(J v) = Hessian of sum(f) times v.
    jv = jvp(func, params, v, create_graph=True)
    grads = torch.autograd.grad(jv.sum(), params)
    H = torch.func.hessian(lambda z: pure(*_split(z, values)).sum())(flat(values))
    assert_close(flat(grads), H @ flat(v))
    # and d/du of u^T J (through vjp with create_graph) is J^T ... w.r.t. params: H(u^T f) v.
    uu = u.clone().requires_grad_(True)
    vj = vjp(func, params, uu, create_graph=True)
    vj = [vj] if isinstance(vj, Tensor) else vj
    (du,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(vj, v, strict=True)), [uu])
    assert_close(du.reshape(-1), J @ flat(v))


def _split(z: Tensor, like: list[Tensor]) -> list[Tensor]:
    pieces = torch.split(z, [t.numel() for t in like])
    return [p.reshape(t.shape) for p, t in zip(pieces, like, strict=True)]


def test_frozen_parameter_gets_zero_block():
    model = make_mlp([2, 3, 2], "tanh", seed=0)
    model[0].bias.requires_grad_(False)
    x = torch.randn(4, 2, dtype=DTYPE)
    J = dense_jacobian(model, x)
    blocks = full_jacobian(lambda: model(x), list(model.parameters()))
    assert torch.count_nonzero(blocks[1]) == 0
    keep = torch.ones(J.shape[1], dtype=torch.bool)
    keep[6:9] = False
    assert_close(torch.cat(blocks, 1)[:, keep], J[:, keep])
    v = random_like(list(model.parameters()), 0)
    expected = J[:, keep] @ flat(v)[keep]
    assert_close(model_jvp(model, x, v).reshape(-1), expected)
    assert model[0].bias.requires_grad is False


def test_dropout_uses_one_mask_for_jvp_and_vjp_and_leaves_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    model.train()
    x = torch.randn(5, 3, dtype=DTYPE)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    v = random_like(params, 1)
    u = torch.randn(5, 2, dtype=DTYPE)
    # Each call draws the mask of a plain forward pass at its point of the global
    # random stream and advances the stream as that forward pass does.
    rng = torch.get_rng_state()
    with torch.no_grad():
        model(x)
    after_forward = torch.get_rng_state()
    torch.set_rng_state(rng)
    jv = model_jvp(model, x, v)
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.set_rng_state(rng)
    vj = model_vjp(model, x, u)
    # u^T (J v) == (J^T u)^T v only if both saw the same dropout mask.
    assert_close((u * jv).sum(), (flat(vj) * flat(v)).sum())
    torch.set_rng_state(rng)
    J = torch.cat(full_jacobian(lambda: model(x), params), dim=1)
    assert_close(J @ flat(v), jv.reshape(-1))
    torch.set_rng_state(rng)
    assert_close(batch_jvp(lambda: model(x), params, [t.unsqueeze(0) for t in v])[0], jv)
    assert torch.equal(torch.get_rng_state(), after_forward)
    assert model.training
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
        assert p.requires_grad


def test_state_is_restored_when_func_raises():
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    before = x.detach().clone()
    calls = []

    def func():
        calls.append(1)
        if len(calls) > 0:
            raise RuntimeError("boom")
        return x

    with pytest.raises(RuntimeError, match="boom"):
        jvp(func, [x], torch.ones(3, dtype=DTYPE))
    assert torch.equal(x, before) and x.grad is None and x.requires_grad


def test_bad_input():
    model = make_mlp([2, 2], "tanh", seed=0)
    x = torch.randn(3, 2, dtype=DTYPE)
    params = list(model.parameters())
    v = random_like(params, 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_jvp(lambda t: t, x, v)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_vjp("net", x, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(3,\)"):
        model_jvp(model, x, [v[0], torch.ones(3)])
    with pytest.raises(ValueError, match="expected 2, got 1"):
        jvp(lambda: model(x), params, [v[0]])
    with pytest.raises(ValueError, match=r"output's shape \(3, 2\)"):
        vjp(lambda: model(x), params, torch.ones(5))
    with pytest.raises(TypeError, match="func must be callable"):
        jvp(3, params, v)
    with pytest.raises(TypeError, match="func must return a tensor, got tuple"):
        jvp(lambda: (model(x),), params, v)
    with pytest.raises(ValueError, match=r"vs\[1\] has batch size 2, but vs\[0\] has 3"):
        batch_jvp(lambda: model(x), params, [torch.ones(3, 2, 2), torch.ones(2, 2)])
    with pytest.raises(
        ValueError, match=r"vs\[0\] must have shape .* = \(batch, 2, 2\), got \(2, 2\)"
    ):
        batch_jvp(lambda: model(x), params, [torch.ones(2, 2), torch.ones(2, 2)])
    with pytest.raises(ValueError, match=r"vs must have shape \(batch, \*output shape\)"):
        batch_vjp(lambda: model(x), params, torch.ones(4, 5))
    with pytest.raises(ValueError, match="mode must be"):
        full_jacobian(lambda: model(x), params, mode="sideways")
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        jvp(lambda: model(x), ["w"], v)


def test_exported_everywhere():
    import torch_secorder
    import torch_secorder.core as core

    for name in gvp.__all__:
        assert getattr(torch_secorder, name) is getattr(gvp, name)
        assert getattr(core, name) is getattr(gvp, name)
