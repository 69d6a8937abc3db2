"""Weights read through a property (``.T``, ``.mT``, ``.H``, ...) count as uses: tied weights.

A tied LM head ``F.linear(h, emb.weight.T ...)`` and a tied autoencoder ``x @ W.T``
read one parameter twice, once through a property.  The tape must see both reads,
so the parameter is not taken for a single-use layer; diagonal and trace equal the
dense Hessian's in the model form and the closure form.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_secorder.core import (
    hessian_diagonal,
    hessian_trace,
    model_hessian_diagonal,
    model_hessian_trace,
)
from torch_secorder.func import diagonal_plan
from torch_secorder.func._tape import is_metadata, record

DT = torch.float64


class TiedLMHead(nn.Module):
    """Embedding -> tanh MLP -> logits by the embedding matrix read through ``.T``."""

    def __init__(self, vocab: int, d: int, spelling: str):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.spelling = spelling

    def forward(self, idx):
        h = torch.tanh(self.fc(self.emb(idx)))
        w = self.emb.weight
        if self.spelling == "linear_T":  # F.linear(h, W.T.T) is h @ W.T
            logits = F.linear(h, w.T.T, self.bias)
        elif self.spelling == "matmul_T":
            logits = h @ w.T + self.bias
        elif self.spelling == "matmul_mT":
            logits = h @ w.mT + self.bias
        else:  # "matmul_H": the conjugate transpose, the transpose for real weights
            logits = h @ w.H + self.bias
        return logits.reshape(-1, logits.shape[-1])


class TiedAutoencoder(nn.Module):
    """``decode(encode(x))`` with the decoder the encoder's weight read through ``.T``."""

    def __init__(self, d: int, k: int, spelling: str):
        super().__init__()
        self.enc = nn.Linear(d, k)
        self.dec_bias = nn.Parameter(torch.zeros(d))
        self.spelling = spelling

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        w = self.enc.weight
        if self.spelling == "linear_T":
            return F.linear(h, w.T, self.dec_bias)
        if self.spelling == "matmul_T":  # x @ W.T with W the decoder (d, k)
            return h @ w.T.T + self.dec_bias
        return F.linear(h, w.real.T, self.dec_bias)  # "real_T"


def dense_diagonal(model, loss_fn, x, y) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for p in model.parameters()]
    sizes = [v.numel() for v in values]

    def f(flat):
        pieces = torch.split(flat, sizes)
        p = {n: c.view_as(v) for n, c, v in zip(names, pieces, values, strict=True)}
        return loss_fn(functional_call(model, p, (x,)), y)

    flat = torch.cat([v.reshape(-1) for v in values])
    H = torch.autograd.functional.hessian(f, flat)
    return [d.view_as(v) for d, v in zip(torch.split(torch.diagonal(H), sizes), values)]


def check_both_forms(model, loss_fn, x, y) -> None:
    dense = dense_diagonal(model, loss_fn, x, y)
    trace = float(sum(d.sum() for d in dense))
    params = list(model.parameters())

    def closure():
        return loss_fn(model(x), y)

    for found in (
        model_hessian_diagonal(model, loss_fn, x, y, progress=False),
        hessian_diagonal(closure, params, progress=False),
    ):
        for a, b in zip(found, dense, strict=True):
            assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()
    assert math.isclose(float(model_hessian_trace(model, loss_fn, x, y)), trace, abs_tol=1e-9)
    assert math.isclose(float(hessian_trace(closure, params)), trace, abs_tol=1e-9)


@settings(max_examples=12, deadline=None)
@given(
    spelling=st.sampled_from(["linear_T", "matmul_T", "matmul_mT", "matmul_H"]),
    n=st.integers(1, 3),
    t=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_tied_lm_head(spelling, n, t, seed):
    torch.manual_seed(seed)
    model = TiedLMHead(7, 4, spelling).to(DT)
    with torch.no_grad():
        model.bias.normal_()
    idx = torch.randint(0, 7, (n, t))
    y = torch.randint(0, 7, (n * t,))
    check_both_forms(model, nn.CrossEntropyLoss(), idx, y)


@settings(max_examples=12, deadline=None)
@given(
    spelling=st.sampled_from(["linear_T", "matmul_T", "real_T"]),
    loss=st.sampled_from(["mse", "ce"]),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_tied_autoencoder(spelling, loss, n, seed):
    torch.manual_seed(seed)
    model = TiedAutoencoder(5, 3, spelling).to(DT)
    x = torch.randn(n, 5, dtype=DT)
    if loss == "mse":
        check_both_forms(model, nn.MSELoss(), x, torch.randn(n, 5, dtype=DT))
    else:
        check_both_forms(model, nn.CrossEntropyLoss(), x, torch.randint(0, 5, (n,)))


def test_property_reads_are_uses_and_metadata_reads_are_not():
    w = torch.randn(3, 4, dtype=DT)
    x = torch.randn(2, 4, dtype=DT)

    def f(p):
        _ = p.shape, p.dtype, p.requires_grad, p.device  # metadata: not uses
        return F.linear(x, p).sum() + (x @ p.T).sum()

    calls, _ = record(f, w)
    readers = [c.name for c in calls if any(t is w for t in c.tensor_inputs())]
    assert readers == ["linear", "__get__"]
    assert not is_metadata(type(w).T.__get__, w.T)
    assert is_metadata(type(w).shape.__get__, w.shape)
    # read twice (once through .T): swept, not taken for a single-use linear layer
    with torch.no_grad():
        assert diagonal_plan(lambda p: F.linear(x, p["w"]).pow(4).sum(), {"w": w}) == {"w": "graph"}
        assert diagonal_plan(
            lambda p: (F.linear(x, p["w"]) + (x @ p["w"].T)).pow(4).sum(), {"w": w}
        ) == {"w": "sweep"}


@pytest.mark.parametrize("prop", ["T", "mT", "H", "mH", "real"])
def test_every_tensor_property_of_a_weight_counts(prop):
    """Tied MLP whose second layer reads the first layer's weight through a property."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).to(DT)
    head = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = lin, head

        def forward(self, x):
            h = torch.tanh(self.lin(x))
            w = getattr(self.lin.weight, prop)
            return self.head(torch.tanh(F.linear(h, w)))

    check_both_forms(Model(), nn.CrossEntropyLoss(), x, y)
