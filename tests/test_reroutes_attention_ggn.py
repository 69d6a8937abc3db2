"""Gauss-Newton and Jacobian products of attention models (forward mode needs the math kernel).

The fused attention kernels (CPU flash, and ``nn.TransformerEncoderLayer``'s native
fast path) have no forward-mode AD: ``gauss_newton_product`` and ``model_jvp`` raised
on every attention model until their ``torch.func`` routes ran under
``func._fixes.differentiable``.  Each product is checked against the dense float64
oracle :math:`G = J^\\top H_{\\text{out}} J`, with :math:`J` from ``torch.func.jacrev``
and :math:`H_{\\text{out}}` from ``torch.func.hessian`` of the loss of the output,
under the math kernel and the reference norms of ``conftest``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, ReferenceNorms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_secorder.core.gvp import batch_jvp, full_jacobian, jvp, model_jvp, model_vjp, vjp
from torch_secorder.core.hvp import gauss_newton_product

TOL = 1e-10
D, HEADS, T, N, C = 4, 2, 3, 2, 3


class MHAHead(nn.Module):
    """Self-attention by ``nn.MultiheadAttention``, mean over tokens, a linear head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class EncoderHead(nn.Module):
    """``nn.TransformerEncoderLayer`` (no dropout), mean over tokens, a linear head."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            D, HEADS, 6, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class SDPAHead(nn.Module):
    """Hand-written multi-head attention calling ``F.scaled_dot_product_attention``."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=0.7)
        return self.head(out.transpose(1, 2).reshape(b, t, D).mean(1))


MODELS = {
    "mha": MHAHead,
    "encoder": EncoderHead,
    "encoder-norm-first": lambda: EncoderHead(norm_first=True),
    "sdpa": SDPAHead,
    "sdpa-causal": lambda: SDPAHead(causal=True),
}
LOSSES = {"mse": F.mse_loss, "ce": F.cross_entropy}


def build(name: str, mode: str, seed: int):
    torch.manual_seed(seed)
    model = MODELS[name]().to(DTYPE)
    model.train(mode == "train")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, T, D, generator=g, dtype=DTYPE)
    targets = {
        "mse": torch.randn(N, C, generator=g, dtype=DTYPE),
        "ce": torch.randint(0, C, (N,), generator=g),
    }
    return model, x, targets


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def oracle(model: nn.Module, x: torch.Tensor, loss_fn, y):
    """``(J, H_out, G)``: the Jacobian ``(M, n)``, the output Hessian and ``J^T H J``."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def output(theta: torch.Tensor) -> torch.Tensor:
        values = [t.reshape(p.shape) for t, p in zip(theta.split(sizes), params, strict=True)]
        return functional_call(model, dict(zip(names, values, strict=True)), (x,))

    with sdpa_kernel(SDPBackend.MATH), ReferenceNorms():
        theta = flat(params)
        out = output(theta).detach()
        J = torch.func.jacrev(output)(theta).reshape(out.numel(), -1)
        H = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J, H, J.T @ H @ J


cases = st.tuples(st.sampled_from(sorted(MODELS)), st.sampled_from(["eval", "train"]))
seeds = st.integers(0, 2**20)


@settings(max_examples=15, deadline=None)
@given(case=cases, loss=st.sampled_from(sorted(LOSSES)), seed=seeds)
def test_gauss_newton_product(case, loss, seed):
    name, mode = case
    model, x, targets = build(name, mode, seed)
    loss_fn, y = LOSSES[loss], targets[loss]
    _, _, G = oracle(model, x, loss_fn, y)
    g = torch.Generator().manual_seed(seed + 2)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in model.parameters()]
    product = gauss_newton_product(model, loss_fn, x, y, v)
    torch.testing.assert_close(flat(product), G @ flat(v), rtol=TOL, atol=TOL)


@settings(max_examples=10, deadline=None)
@given(case=cases, seed=seeds)
def test_jacobian_products_model_and_closure(case, seed):
    name, mode = case
    model, x, targets = build(name, mode, seed)
    J, _, _ = oracle(model, x, F.mse_loss, targets["mse"])
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed + 3)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]
    u = torch.randn(N, C, generator=g, dtype=DTYPE)
    torch.testing.assert_close(model_jvp(model, x, v).reshape(-1), J @ flat(v), rtol=TOL, atol=TOL)
    torch.testing.assert_close(flat(model_vjp(model, x, u)), u.reshape(-1) @ J, rtol=TOL, atol=TOL)
    torch.testing.assert_close(
        jvp(lambda: model(x), params, v).reshape(-1), J @ flat(v), rtol=TOL, atol=TOL
    )
    torch.testing.assert_close(
        flat(vjp(lambda: model(x), params, u)), u.reshape(-1) @ J, rtol=TOL, atol=TOL
    )
    vs = [torch.stack([vi, 2 * vi]) for vi in v]
    batched = batch_jvp(lambda: model(x), params, vs).reshape(2, -1)
    torch.testing.assert_close(batched[1], 2 * (J @ flat(v)), rtol=TOL, atol=TOL)
    jac = full_jacobian(lambda: model(x), params)
    torch.testing.assert_close(torch.cat(list(jac), dim=1), J, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float32_model_is_left_as_it_was(name):
    """float32 takes the fused kernels by default; the products still run, state untouched."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(N, T, D)
    y = torch.randn(N, C)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    v = [torch.ones_like(p) for p in model.parameters()]
    product = gauss_newton_product(model, F.mse_loss, x, y, v)
    assert all(torch.isfinite(p).all() for p in product)
    # Reference in float64 on a copy: the same model and data, the oracle's G v.
    model64 = MODELS[name]().to(DTYPE).eval()
    model64.load_state_dict({k: t.to(DTYPE) for k, t in model.state_dict().items()})
    _, _, G = oracle(model64, x.to(DTYPE), F.mse_loss, y.to(DTYPE))
    torch.testing.assert_close(flat(product).to(DTYPE), G @ flat(v).to(DTYPE), rtol=1e-4, atol=1e-5)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert model.training is False
