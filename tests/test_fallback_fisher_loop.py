"""The empirical Fisher where ``vmap`` cannot batch per-sample gradients: a loop over samples.

``vmap`` of per-sample gradients fails on the kernels of ``nn.RNN``, ``nn.LSTM`` and
``nn.GRU``, and torch.func refuses old-style ``autograd.Function`` s; the diagonal
and the trace of the empirical Fisher then come from one backward pass per
sample.  Oracle: the per-sample gradients of ``loss_fn(model(x[i:i+1]), y[i:i+1])``
by ``torch.autograd.grad`` in a plain loop, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import Tensor, nn

from torch_secorder.approximations.fisher_diagonal import empirical_fisher_diagonal
from torch_secorder.approximations.fisher_trace import empirical_fisher_trace

DT = torch.float64


class Recurrent(nn.Module):
    """A recurrent layer read out at the last step by a linear head."""

    def __init__(self, cell: type[nn.RNNBase], **kwargs) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True, **kwargs)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _OldStyleTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OldStyleMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.last = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(_OldStyleTanh.apply(self.first(x.flatten(1)[:, :3])))


def _oracle(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> list[Tensor]:
    """Mean of the squared per-sample gradients (parameters that require grad), by a loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        total = [t + g**2 for t, g in zip(total, grads, strict=True)]
    return [t / x.shape[0] for t in total]


MODELS = {
    "rnn": lambda: Recurrent(nn.RNN),
    "lstm": lambda: Recurrent(nn.LSTM),
    "gru": lambda: Recurrent(nn.GRU),
    "lstm-2-layers": lambda: Recurrent(nn.LSTM, num_layers=2),
    "old-style-function": OldStyleMLP,
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_empirical_fisher_against_a_loop(name, chunk_size):
    torch.manual_seed(0)
    model = MODELS[name]().to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 3, generator=g, dtype=DT)
    y = torch.randn(5, 2, generator=g, dtype=DT)
    before = [p.detach().clone() for p in model.parameters()]
    expected = _oracle(model, F.mse_loss, x, y)
    diag = empirical_fisher_diagonal(model, F.mse_loss, x, y, chunk_size=chunk_size)
    assert_close(diag, expected)
    trace = empirical_fisher_trace(model, F.mse_loss, x, y, chunk_size=chunk_size)
    assert_close(trace, sum(e.sum() for e in expected))
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.grad is None and torch.equal(p.detach(), b)


def test_a_frozen_parameter_gets_zeros():
    torch.manual_seed(0)
    model = Recurrent(nn.GRU).to(DT)
    model.head.bias.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 3, generator=g, dtype=DT)
    y = torch.randn(4, 2, generator=g, dtype=DT)
    expected = _oracle(model, F.mse_loss, x, y)
    diag = empirical_fisher_diagonal(model, F.mse_loss, x, y)
    assert torch.equal(diag[-1], torch.zeros(2, dtype=DT))
    assert_close(diag[:-1], expected)


def test_an_error_in_the_model_is_raised_not_looped():
    """A shape error of the user's model is not taken for vmap's refusal."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    y = torch.randn(4, 2, dtype=DT)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        empirical_fisher_diagonal(model, F.mse_loss, x, y)
