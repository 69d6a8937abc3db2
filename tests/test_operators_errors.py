"""Curvature operators: bad data, bad arguments, clear errors naming the batch."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_mlp
from torch import nn

from torch_secorder.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

DTYPE = torch.float64


def _setup():
    model = make_mlp([2, 3, 2], "tanh", 0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 2, generator=g, dtype=DTYPE)
    Y = torch.randn(5, 2, generator=g, dtype=DTYPE)
    return model, [(X[:3], Y[:3]), (X[3:], Y[3:])]


@pytest.mark.parametrize("Operator", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_empty_data(Operator):
    model, _ = _setup()
    with pytest.raises(ValueError, match="data is empty"):
        Operator(model, nn.MSELoss(), [])
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 2, dtype=DTYPE), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="data is empty"):
        Operator(model, nn.MSELoss(), torch.utils.data.DataLoader(empty, batch_size=2))


def test_batches_of_different_dtypes_and_devices():
    model, batches = _setup()
    x, y = batches[1]
    with pytest.raises(ValueError, match="batch 1 of data has dtype torch.float32"):
        HessianOperator(model, nn.MSELoss(), [batches[0], (x.float(), y.float())])
    with pytest.raises(ValueError, match="batch 1 of data is on meta"):
        HessianOperator(model, nn.MSELoss(), [batches[0], (x.to("meta"), y.to("meta"))])
    with pytest.raises(ValueError, match="batch 0 of data mixes devices"):
        HessianOperator(model, nn.MSELoss(), [(x, y.to("meta"))])


def test_malformed_batches():
    model, batches = _setup()
    with pytest.raises(TypeError, match="batch 1 of data must be a pair"):
        HessianOperator(model, nn.MSELoss(), [batches[0], (batches[1][0],)])
    with pytest.raises(TypeError, match="batch 0 of data must hold tensors"):
        HessianOperator(model, nn.MSELoss(), [("a", batches[0][1]), batches[1]])
    with pytest.raises(ValueError, match="batch 1 of data has no samples"):
        HessianOperator(model, nn.MSELoss(), [batches[0], (batches[1][0][:0], batches[1][1][:0])])
    with pytest.raises(TypeError, match="re-iterable"):
        HessianOperator(model, nn.MSELoss(), iter(batches))
    with pytest.raises(TypeError, match="data must be an"):
        HessianOperator(model, nn.MSELoss(), 3)


@pytest.mark.parametrize("Operator", [HessianOperator, GGNOperator])
def test_loss_not_scalar_on_one_batch_names_it(Operator):
    model, batches = _setup()

    def loss_fn(out, y):  # a scalar on batches of several samples, a vector on batch 1
        per_entry = (out - y) ** 2
        return per_entry.mean() if out.shape[0] > 2 else per_entry.mean(0)

    A = Operator(model, loss_fn, batches, reduction="mean")
    with pytest.raises((ValueError, TypeError), match="batch 1 of data"):
        A @ torch.ones(A.shape[0], dtype=DTYPE)
    with pytest.raises((ValueError, TypeError), match="batch 1 of data"):
        A.diagonal()


def test_bad_arguments():
    model, batches = _setup()
    with pytest.raises(ValueError, match="'nope' is not a parameter"):
        HessianOperator(model, nn.MSELoss(), batches, params=["nope"])
    with pytest.raises(ValueError, match="not a parameter of model"):
        HessianOperator(model, nn.MSELoss(), batches, params=[torch.ones(2)])
    with pytest.raises(TypeError, match="params\\[0\\] must be"):
        HessianOperator(model, nn.MSELoss(), batches, params=[3])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        HessianOperator(model, 3, batches)
    with pytest.raises(ValueError, match="reduction must be"):
        HessianOperator(model, lambda o, y: o.sum(), batches, reduction="max")
    with pytest.raises(ValueError, match="reduction 'none'"):
        HessianOperator(model, nn.MSELoss(reduction="none"), batches)
    A = HessianOperator(model, nn.MSELoss(), batches)
    with pytest.raises(ValueError, match="shape \\(n,\\) or \\(n, k\\) with n = 17"):
        A @ torch.ones(3, dtype=DTYPE)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        A @ torch.ones(17)
    with pytest.raises(ValueError, match="not parameters of this operator"):
        A.block(["0.weight", "x"])
    with pytest.raises(ValueError, match="GGNOperator"):
        FisherOperator(model, nn.L1Loss(), batches)
    with pytest.raises(ValueError, match="pass reduction="):
        EmpiricalFisherOperator(model, lambda o, y: ((o - y) ** 2).sum(), batches[:1])
    weighted = nn.CrossEntropyLoss(weight=torch.ones(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="class weights"):
        HessianOperator(model, weighted, [(b[0], b[1].argmax(1)) for b in batches])
    model32 = make_mlp([2, 3, 2], "tanh", 0).float()
    with pytest.raises(ValueError, match="data is on meta"):
        HessianOperator(model32, nn.MSELoss(), [(torch.ones(2, 2, device="meta"),) * 2])


class _CountingDataset(torch.utils.data.Dataset):
    def __init__(self, X, Y):
        self.X, self.Y, self.reads = X, Y, 0

    def __len__(self):
        return self.X.shape[0]

    def __getitem__(self, i):
        self.reads += 1
        return self.X[i], self.Y[i]


def test_a_dataloader_is_counted_without_a_pass_and_checked_during_one():
    model, batches = _setup()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    dataset = _CountingDataset(X, Y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    A = HessianOperator(model, nn.MSELoss(), loader)
    assert (A.num_samples, A.batches.num_batches, dataset.reads) == (5, 3, 0)
    B = HessianOperator(model, nn.MSELoss(), batches)
    assert_close(A.trace(), B.trace())  # shuffled batches, the same mean over 5 samples
    dropping = torch.utils.data.DataLoader(dataset, batch_size=2, drop_last=True)
    assert HessianOperator(model, nn.MSELoss(), dropping).num_samples == 4  # counted by a pass
    meta = _CountingDataset(X.to("meta"), Y.to("meta"))
    A = HessianOperator(model, nn.MSELoss(), torch.utils.data.DataLoader(meta, batch_size=2))
    with pytest.raises(ValueError, match="batch 0 of data: .*meta"):
        A.trace()
