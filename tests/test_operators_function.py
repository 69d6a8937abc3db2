"""Operators of a pure ``f(params, batch)`` against the dense matrix of all data as one batch.

Oracle: the Hessian (GGN) of the whole data set's loss in one batch, float64, from
``torch.func``: for ``reduction="mean"`` ``f`` returns a batch's mean, so the loss over
the data set is ``f(params, all data)`` (the mean over all samples); for ``"sum"`` the sum.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_hessian
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_secorder.func.diagonal as func_diagonal
import torch_secorder.func.fast_diagonal as fast_diagonal
from torch_secorder.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

DTYPE = torch.float64


def _params(seed, d_in, hidden, d_out):
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(hidden, d_in, generator=g, dtype=DTYPE) * 0.7,
        "b1": torch.randn(hidden, generator=g, dtype=DTYPE) * 0.3,
        "w2": torch.randn(d_out, hidden, generator=g, dtype=DTYPE) * 0.7,
        "b2": torch.randn(d_out, generator=g, dtype=DTYPE) * 0.3,
    }


def output(p, batch):
    x = batch[0]
    return F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"])


def make_loss(kind, reduction):
    def loss(z, batch):
        y = batch[1]
        if kind == "ce":
            return F.cross_entropy(z, y, reduction=reduction)
        return F.mse_loss(z, y, reduction=reduction)

    return loss


def make_f(kind, reduction):
    loss = make_loss(kind, reduction)
    return lambda p, batch: loss(output(p, batch), batch)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["mse", "ce"]))
    d_in, hidden = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    d_out = draw(st.integers(2 if kind == "ce" else 1, 3))
    full = draw(st.integers(1, 4))
    count = draw(st.integers(1, 3))
    sizes = [full] * (count - 1) + [draw(st.integers(1, full))]  # a short last batch
    seed = draw(st.integers(0, 10**6))
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(sizes)
    X = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    if kind == "ce":
        Y = torch.randint(0, d_out, (n,), generator=g)
    else:
        Y = torch.randn(n, d_out, generator=g, dtype=DTYPE)
    batches = list(zip(X.split(sizes), Y.split(sizes), strict=True))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    return _params(seed, d_in, hidden, d_out), kind, reduction, batches, (X, Y)


def dense_ggn(params, names, kind, reduction, everything):
    like = {name: params[name] for name in names}
    flat = torch.cat([t.reshape(-1) for t in like.values()])

    def out_of(x):
        pieces, start = dict(params), 0
        for name, t in like.items():
            pieces[name] = x[start : start + t.numel()].reshape(t.shape)
            start += t.numel()
        return output(pieces, everything).reshape(-1)

    J = torch.func.jacrev(out_of)(flat)
    z = output(params, everything)
    loss = make_loss(kind, reduction)
    H_out = torch.func.hessian(lambda o: loss(o.reshape(z.shape), everything))(z.reshape(-1))
    return J.T @ H_out @ J


def dense_of(f, params, names, everything):
    """Hessian w.r.t. ``names`` (dict order) of the loss of all data as one batch."""
    like = [params[name] for name in names]

    def loss(values):
        point = dict(params)
        point.update(zip(names, values, strict=True))
        return f(point, everything)

    return dense_hessian(loss, like)


def _check(A, dense, seed):
    n = dense.shape[0]
    assert A.shape == (n, n) and A.dtype == DTYPE
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    assert_close(A @ V, dense @ V)
    assert_close(A @ V[:, 1], dense @ V[:, 1])
    assert_close(A.diagonal(), torch.diagonal(dense))
    assert_close(A.trace(), torch.trace(dense))


@settings(max_examples=15, deadline=None)
@given(cases(), st.integers(0, 100))
def test_hessian_from_function_equals_dense_hessian_of_all_data(case, seed):
    params, kind, reduction, batches, everything = case
    f = make_f(kind, reduction)
    H = HessianOperator.from_function(f, params, batches, reduction=reduction)
    names = list(params)
    assert H.names == names and H.num_samples == everything[0].shape[0]
    _check(H, dense_of(f, params, names, everything), seed)
    block = ["w2", "b1"]  # any subset; rows in the dict's order
    _check(H.block(block), dense_of(f, params, ["b1", "w2"], everything), seed)


@settings(max_examples=10, deadline=None)
@given(cases(), st.integers(0, 100))
def test_ggn_from_function_equals_dense_ggn_of_all_data(case, seed):
    params, kind, reduction, batches, everything = case
    G = GGNOperator.from_function(
        output, make_loss(kind, reduction), params, batches, reduction=reduction
    )
    _check(G, dense_ggn(params, list(params), kind, reduction, everything), seed)
    _check(G.block("w1"), dense_ggn(params, ["w1"], kind, reduction, everything), seed)


def dense_empirical_fisher(f, params, names, reduction, everything):
    """``(1/N) sum_i g_i g_i^T`` (``"sum"``: the sum), ``g_i`` the gradient of ``f`` on sample i."""
    X, Y = everything
    rows = []
    for i in range(X.shape[0]):

        def loss(flat, i=i):
            point, start = dict(params), 0
            for name in names:
                t = params[name]
                point[name] = flat[start : start + t.numel()].reshape(t.shape)
                start += t.numel()
            return f(point, (X[i : i + 1], Y[i : i + 1]))

        flat = torch.cat([params[name].reshape(-1) for name in names])
        rows.append(torch.func.grad(loss)(flat))
    G = torch.stack(rows)
    return G.T @ G / (X.shape[0] if reduction == "mean" else 1)


@settings(max_examples=10, deadline=None)
@given(cases(), st.integers(0, 100))
def test_empirical_fisher_from_function_equals_dense_of_all_data(case, seed):
    params, kind, reduction, batches, everything = case
    f = make_f(kind, reduction)
    E = EmpiricalFisherOperator.from_function(f, params, batches, reduction=reduction)
    _check(E, dense_empirical_fisher(f, params, list(params), reduction, everything), seed)
    block = ["w2", "b1"]
    _check(
        E.block(block), dense_empirical_fisher(f, params, ["b1", "w2"], reduction, everything), seed
    )
    # small chunks of samples, and the model form on the same data agree
    E = EmpiricalFisherOperator.from_function(f, params, batches, reduction=reduction, chunk_size=1)
    _check(E, dense_empirical_fisher(f, params, list(params), reduction, everything), seed)


def test_empirical_fisher_from_function_batch_structure_and_loop_fallback():
    params, batches, everything = _fixed_case()
    f = make_f("mse", "mean")
    dense = dense_empirical_fisher(f, params, list(params), "mean", everything)
    # dict batches with a leaf of another leading size (passed whole) and a non-tensor;
    # N_b from the first tensor in sorted-key order ("x")
    dict_batches = [
        {"x": x, "y": y, "z": torch.ones(1, dtype=DTYPE), "tag": "b"} for x, y in batches
    ]
    E = EmpiricalFisherOperator.from_function(
        lambda p, b: f(p, (b["x"], b["y"])) * b["z"][0], params, dict_batches, reduction="mean"
    )
    _check(E, dense, 0)

    # f that torch.func refuses (an autograd.Function without setup_context): one
    # backward pass per sample, counted
    calls = []

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            calls.append(t.shape[0])
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    def refused(p, batch):
        return f(p, (Identity.apply(batch[0]), batch[1]))

    E = EmpiricalFisherOperator.from_function(refused, params, batches, reduction="mean")
    _check(E, dense, 1)
    assert calls and set(calls) == {1}  # every call on one sample


def test_empirical_fisher_from_function_errors():
    params, batches, _ = _fixed_case()
    f = make_f("mse", "mean")
    with pytest.raises(ValueError, match="empirical Fisher needs the loss's reduction"):
        EmpiricalFisherOperator.from_function(f, params, batches[0])
    E = EmpiricalFisherOperator.from_function(
        lambda p, b: output(p, b).sum(0), params, batches, reduction="mean"
    )
    with pytest.raises(ValueError, match="batch 0 of data: f.*scalar on one sample"):
        E.diagonal()
    E = EmpiricalFisherOperator.from_function(
        f, params, batches, reduction="mean", batch_size=lambda b: 5
    )
    with pytest.raises(ValueError, match="no tensor with a leading dimension of its 5 samples"):
        E.diagonal()


def _fixed_case(reduction="mean", sizes=(3, 3, 2)):
    params = _params(0, 3, 4, 2)
    g = torch.Generator().manual_seed(5)
    n = sum(sizes)
    X, Y = torch.randn(n, 3, generator=g, dtype=DTYPE), torch.randn(n, 2, generator=g, dtype=DTYPE)
    return params, list(zip(X.split(list(sizes)), Y.split(list(sizes)), strict=True)), (X, Y)


def test_pytree_params_dict_batches_loader_and_batch_size():
    params, batches, everything = _fixed_case()
    f = make_f("mse", "mean")
    dense = dense_of(f, params, list(params), everything)
    # A list of tensors as params: names are the positions, rows in list order.
    as_list = [params[k] for k in params]

    def f_list(p, batch):
        return f(dict(zip(params, p, strict=True)), batch)

    H = HessianOperator.from_function(f_list, as_list, batches, reduction="mean")
    assert H.names == ["0", "1", "2", "3"]
    _check(H, dense, 0)
    # Dict batches: N_b from the first tensor in sorted-key order ("x").
    dict_batches = [{"x": x, "y": y} for x, y in batches]
    H = HessianOperator.from_function(
        lambda p, b: f(p, (b["x"], b["y"])), params, dict_batches, reduction="mean"
    )
    _check(H, dense, 1)
    # A DataLoader.
    dataset = torch.utils.data.TensorDataset(*everything)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    H = HessianOperator.from_function(f, params, loader, reduction="mean")
    assert H.num_samples == 8
    _check(H, dense, 2)
    # batch_size counts something else than the first tensor's leading dimension.
    swapped = [(y, x) for x, y in batches]
    H = HessianOperator.from_function(
        lambda p, b: f(p, (b[1], b[0])),
        params,
        swapped,
        reduction="mean",
        batch_size=lambda b: b[1].shape[0],
    )
    _check(H, dense, 3)
    # One batch: a tuple is one batch, not two.
    H = HessianOperator.from_function(f, params, everything)
    assert H.total_batches == 1
    _check(H, dense, 4)


def test_to_scipy_and_user_tensors_untouched():
    scipy = pytest.importorskip("scipy")
    assert scipy
    params, batches, everything = _fixed_case("sum")
    before = {k: v.clone() for k, v in params.items()}
    f = make_f("mse", "sum")
    H = HessianOperator.from_function(f, params, batches, reduction="sum")
    dense = dense_of(f, params, list(params), everything)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    assert_close(torch.from_numpy(H.to_scipy().matvec(v.numpy())), dense @ v)
    for k, v in params.items():
        assert torch.equal(v, before[k]) and not v.requires_grad and v.grad is None


def test_exact_diagonal_takes_the_fast_routes(monkeypatch):
    params, batches, everything = _fixed_case()
    f = make_f("mse", "mean")

    def refuse(*args, **kwargs):
        raise AssertionError("the basis sweep ran")

    monkeypatch.setattr(fast_diagonal, "leaf_hessian_diagonal", refuse)
    monkeypatch.setattr(fast_diagonal, "basis_sweep_diagonal", refuse)
    monkeypatch.setattr(func_diagonal, "leaf_hessian_diagonal", refuse)
    H = HessianOperator.from_function(f, params, batches, reduction="mean")
    dense = dense_of(f, params, list(params), everything)
    assert_close(H.diagonal(), torch.diagonal(dense))
    G = GGNOperator.from_function(
        output, make_loss("mse", "mean"), params, batches, reduction="mean"
    )
    assert_close(
        G.diagonal(), torch.diagonal(dense_ggn(params, list(params), "mse", "mean", everything))
    )


def test_strategies_agree():
    params, batches, everything = _fixed_case()
    f = make_f("mse", "mean")
    dense = dense_of(f, params, list(params), everything)
    for strategy in ("vmap", "graph", "graph_batched"):
        H = HessianOperator.from_function(f, params, batches, reduction="mean", strategy=strategy)
        V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        assert_close(H @ V, dense @ V)


def test_errors():
    params, batches, _ = _fixed_case()
    f = make_f("mse", "mean")
    with pytest.raises(ValueError, match="declares no reduction"):
        HessianOperator.from_function(f, params, batches)
    with pytest.raises(TypeError, match="f must be callable"):
        HessianOperator.from_function(1, params, batches, reduction="mean")
    with pytest.raises(TypeError, match=r"params\['w1'\] must be a floating-point tensor"):
        HessianOperator.from_function(f, {**params, "w1": 1}, batches, reduction="mean")
    with pytest.raises(ValueError, match=r"params\['b1'\] is torch.float32"):
        HessianOperator.from_function(
            f, {**params, "b1": params["b1"].float()}, batches, reduction="mean"
        )
    with pytest.raises(ValueError, match="params must hold at least one tensor"):
        HessianOperator.from_function(f, [], batches, reduction="mean")
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator.from_function(f, params, [], reduction="mean")
    with pytest.raises(ValueError, match="batch 0 of data holds no tensor"):
        HessianOperator.from_function(f, params, [[1, 2]], reduction="mean")
    with pytest.raises(ValueError, match=r"batch_size\(batch 1 of data\) must be a positive int"):
        HessianOperator.from_function(
            f, params, batches, reduction="mean", batch_size=lambda b: 0 if b is batches[1] else 3
        )
    x, y = batches[1]
    with pytest.raises(ValueError, match="batch 1 of data has dtype torch.float32"):
        HessianOperator.from_function(
            f, params, [batches[0], (x.float(), y.float())], reduction="mean"
        )
    H = HessianOperator.from_function(
        lambda p, b: output(p, b).sum(0), params, batches, reduction="mean"
    )
    with pytest.raises(ValueError, match="batch 0 of data: f"):
        H @ torch.zeros(H.shape[0], dtype=DTYPE)
    with pytest.raises(TypeError, match="loss must be callable"):
        GGNOperator.from_function(output, None, params, batches, reduction="mean")
    with pytest.raises(TypeError, match="FisherOperator.from_function is not available"):
        FisherOperator.from_function(output, make_loss("ce", "mean"), params, batches)
