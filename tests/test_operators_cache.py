"""The Hessian operator's per-batch graph cache (operators/_cache.py) against the dense Hessian.

Oracle: the Hessian of ``loss_fn(model(X), Y)`` on all samples at once (float64,
``torch.func``).  The cache must never change a number: products after the first
(served from kept graphs), after the parameters change, over a shuffling loader, on a
block; and in training mode with dropout the operator is one fixed symmetric matrix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close, dense_hessian, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_operators_dense import _case, dense_ggn_of, dense_hessian_of
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_secorder.operators import FisherOperator, GGNOperator, HessianOperator

#: (operator, its dense oracle on the whole data set as one batch)
KINDS = {
    "hessian": (HessianOperator, dense_hessian_of),
    "ggn": (GGNOperator, dense_ggn_of),
    "fisher": (FisherOperator, dense_ggn_of),
}

DTYPE = torch.float64


def _names(model):
    return [name for name, _ in model.named_parameters()]


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    sizes=st.sampled_from([[3, 3, 1], [2, 2], [4]]),
    kind=st.sampled_from(["mse", "ce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    op=st.sampled_from(sorted(KINDS)),
)
def test_cached_products_match_dense(seed, sizes, kind, reduction, op):
    model, loss_fn, batches, X, Y = _case(seed, 2, 3, 2, sizes, kind, reduction)
    cls, oracle = KINDS[op]
    H = cls(model, loss_fn, batches)
    dense = oracle(model, loss_fn, X, Y, _names(model))
    eye = torch.eye(H.shape[0], dtype=DTYPE)
    assert_close(H @ eye, dense)  # builds and keeps every batch's graph
    assert len(H._cache) == len(batches)
    assert_close(H @ eye, dense)  # from the kept graphs
    v = torch.randn(H.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    assert_close(H @ v, dense @ v)


@pytest.mark.parametrize("op", ["hessian", "ggn"])
def test_parameter_change_rebuilds(op):
    model, loss_fn, batches, X, Y = _case(0, 2, 3, 2, [3, 2], "mse", "mean")
    cls, dense_hessian_of = KINDS[op]
    H = cls(model, loss_fn, batches)
    eye = torch.eye(H.shape[0], dtype=DTYPE)
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X, Y, _names(model)))
    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            p.add_(0.3)
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X, Y, _names(model)))
    for p in model.parameters():  # a write through .data (no version bump)
        p.data.mul_(1.5)
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X, Y, _names(model)))
    with torch.no_grad():  # written, then restored: same values, new versions
        for p in model.parameters():
            p.add_(1.0)
            p.sub_(1.0)
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X, Y, _names(model)))
    with torch.no_grad():  # a new parameter object
        model[0].weight = nn.Parameter(model[0].weight.detach() * 2.0)
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X, Y, _names(model)))


@pytest.mark.parametrize("op", ["hessian", "ggn"])
def test_batch_change_and_shuffling_loader(op):
    model, loss_fn, batches, X, Y = _case(1, 2, 3, 1, [4, 4, 2], "mse", "mean")
    HessianOperator, dense_hessian_of = KINDS[op]  # noqa: N806
    dense = dense_hessian_of(model, loss_fn, X, Y, _names(model))
    loader = DataLoader(
        TensorDataset(X, Y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    eye = torch.eye(sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    for capacity in (1, 16):  # one kept batch: the others must not be counted twice
        H = HessianOperator(model, loss_fn, loader, cache_batches=capacity)
        for _ in range(3):  # another order every pass
            assert_close(H @ eye, dense)
    data = list(batches)
    H = HessianOperator(model, loss_fn, data)
    H @ eye
    data[0] = (batches[0][0] * 3.0, batches[0][1])  # another batch at index 0
    X3 = torch.cat([data[0][0], X[4:]])
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X3, Y, _names(model)))
    data = [(x.clone(), y.clone()) for x, y in batches]
    H = HessianOperator(model, loss_fn, data)
    H @ eye
    with torch.no_grad():  # the user edits a batch in place
        data[0][0].mul_(2.0)
    X2 = torch.cat([x for x, _ in data])
    assert_close(H @ eye, dense_hessian_of(model, loss_fn, X2, Y, _names(model)))


@pytest.mark.parametrize("op", ["hessian", "ggn"])
def test_block_and_capacity(op):
    model, loss_fn, batches, X, Y = _case(2, 2, 3, 2, [3, 3, 1], "ce", "mean")
    HessianOperator, dense_hessian_of = KINDS[op]  # noqa: N806
    names = _names(model)
    dense = dense_hessian_of(model, loss_fn, X, Y, names)
    H = HessianOperator(model, loss_fn, batches, cache_batches=1)
    eye = torch.eye(H.shape[0], dtype=DTYPE)
    for _ in range(2):
        assert_close(H @ eye, dense)
    assert len(H._cache) == 1
    B = H.block(names[:1])
    n0 = dict(model.named_parameters())[names[0]].numel()
    for _ in range(2):
        assert_close(B @ torch.eye(n0, dtype=DTYPE), dense[:n0, :n0])
        assert_close(H @ eye, dense)
    off = HessianOperator(model, loss_fn, batches, cache_batches=0)
    assert_close(off @ eye, dense)
    assert len(off._cache) == 0


def _dropout_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(5, 3, generator=g, dtype=DTYPE), torch.randn(5, 2, generator=g, dtype=DTYPE))
        for _ in range(3)
    ]
    return model.train(), nn.MSELoss(), data


@pytest.mark.parametrize("op", ["hessian", "ggn"])
def test_train_mode_dropout_is_one_symmetric_matrix_and_state_kept(op):
    model, loss_fn, data = _dropout_case()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    H = KINDS[op][0](model, loss_fn, data)
    n = H.shape[0]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, dtype=DTYPE, generator=g)
    w = torch.randn(n, dtype=DTYPE, generator=g)
    Hv, Hw = H @ v, H @ w
    assert abs(float(w @ Hv - v @ Hw)) <= TOL * max(1.0, float(Hv.abs().max()))
    dense = H @ torch.eye(n, dtype=DTYPE)
    assert_close(dense, dense.T)
    assert_close(dense @ v, Hv)  # every product sees the first product's masks
    # The masks are those of the loss a plain call draws: dropout as a fixed mask.
    assert model.training and all(m.training for m in model.modules())
    for p in model.parameters():
        assert p.requires_grad and torch.equal(p.grad, torch.full_like(p, 7.0))


def test_train_mode_matches_dense_with_recorded_masks():
    """The cached operator is the dense Hessian of the loss with its first product's masks."""
    model, loss_fn, data = _dropout_case()
    H = HessianOperator(model, loss_fn, data)
    n = H.shape[0]
    masks = []

    def record(module, args, out):
        masks.append((out != 0).to(DTYPE) * 2.0)  # p = 0.5: kept entries scaled by 2

    handle = model[2].register_forward_hook(record)
    torch.manual_seed(3)
    first = H @ torch.eye(n, dtype=DTYPE)
    handle.remove()
    assert len(masks) == len(data)  # one forward pass per batch (the checking one) draws it
    names = _names(model)
    params = [p.detach() for p in model.parameters()]
    expected = torch.zeros(n, n, dtype=DTYPE)
    for (x, y), mask in zip(data, masks, strict=True):

        def loss(p, x=x, y=y, mask=mask):
            w1, b1, w2, b2 = p
            return loss_fn((torch.tanh(x @ w1.T + b1) * mask) @ w2.T + b2, y)

        expected += dense_hessian(loss, params) * (x.shape[0] / 15)
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert_close(first, expected)
    assert_close(H @ torch.eye(n, dtype=DTYPE), expected)


@pytest.mark.parametrize("op", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("diagonal_first", [False, True])
def test_train_mode_diagonal_and_trace_are_those_of_the_products(op, diagonal_first):
    """With dropout, diagonal() and trace() read the masks the products use (kept graphs)."""
    model, loss_fn, data = _dropout_case()
    A = KINDS[op][0](model, loss_fn, data)
    n = A.shape[0]
    torch.manual_seed(5)
    if diagonal_first:  # the diagonal keeps the graphs (and their masks) for the products
        diag = A.diagonal()
        dense = A @ torch.eye(n, dtype=DTYPE)
    else:
        dense = A @ torch.eye(n, dtype=DTYPE)
        diag = A.diagonal()
    assert_close(diag, torch.diagonal(dense))
    assert_close(A.trace(), torch.trace(dense))
    assert len(A._cache) == len(data)
    assert model.training


def test_train_mode_diagonal_beyond_the_kept_batches_draws_its_own_masks():
    """A batch whose graph is not kept: its diagonal is exact for masks of its own draw."""
    model, loss_fn, data = _dropout_case()
    H = HessianOperator(model, loss_fn, data[:1], cache_batches=0)
    masks = []
    handle = model[2].register_forward_hook(lambda m, a, out: masks.append((out != 0) * 2.0))
    diag = H.diagonal()
    handle.remove()
    x, y = data[0]
    params = [p.detach() for p in model.parameters()]
    mask = masks[-1].to(DTYPE)

    def loss(p):
        w1, b1, w2, b2 = p
        return loss_fn((torch.tanh(x @ w1.T + b1) * mask) @ w2.T + b2, y)

    assert_close(diag, torch.diagonal(dense_hessian(loss, params)))


def test_bad_cache_batches():
    model = make_mlp([2, 2], "tanh", 0)
    data = (torch.randn(3, 2, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="cache_batches"):
        HessianOperator(model, nn.MSELoss(), data, cache_batches=-1)
    with pytest.raises(TypeError, match="cache_batches"):
        HessianOperator(model, nn.MSELoss(), data, cache_batches=2.0)


@pytest.mark.parametrize("strategy", ["auto", "graph", "graph_batched", "vmap", "ggn"])
def test_later_products_run_no_forward_pass(strategy):
    model, loss_fn, batches, X, Y = _case(4, 2, 3, 2, [3, 2], "mse", "sum")
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    if strategy == "ggn":
        H = GGNOperator(model, loss_fn, batches)
        dense = dense_ggn_of(model, loss_fn, X, Y, _names(model))
    else:
        H = HessianOperator(model, loss_fn, batches, strategy=strategy)
        dense = dense_hessian_of(model, loss_fn, X, Y, _names(model))
    eye = torch.eye(H.shape[0], dtype=DTYPE)
    counts = []
    for _ in range(3):
        calls.clear()
        assert_close(H @ eye, dense)
        counts.append(len(calls))
    if strategy == "vmap":  # the vmap route re-evaluates the model: nothing kept
        assert len(H._cache) == 0 and counts[1] == counts[2] > 0
    else:
        # (the GGN's first product: the problem's checking pass, then the kept graph's)
        first = 2 * len(batches) if strategy == "ggn" else len(batches)
        assert counts[0] == first and counts[1:] == [0, 0], counts
