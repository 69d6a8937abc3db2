"""SiLU models through every second-order entry point (forward AD of ``silu_backward``).

torch 2.13 has no forward-mode AD for ``silu_backward`` under ``torch.no_grad()``, which
the model-form diagonal's nested ``jvp`` once hit.  Each quantity is checked against the
dense float64 Hessian of the same network with SiLU written as :math:`x\\,\\sigma(x)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import DTYPE, dense_hessian
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from torch_secorder.core.hvp import exact_hvp, model_hvp

TOL = 1e-10


class ReferenceSiLU(TorchFunctionMode):
    """``F.silu`` as ``x * sigmoid(x)``, for the oracle."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.silu:
            return args[0] * torch.sigmoid(args[0])
        return func(*args, **(kwargs or {}))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    loss=st.sampled_from(["ce", "mse"]),
    depth=st.integers(1, 2),
)
def test_silu_mlp_every_quantity(seed, loss, depth):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 4), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(4, 4), nn.SiLU()]
    model = nn.Sequential(*layers, nn.Linear(4, 2)).to(DTYPE)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    if loss == "ce":
        loss_fn, y = F.cross_entropy, torch.randint(0, 2, (5,), generator=g)
    else:
        loss_fn, y = F.mse_loss, torch.randn(5, 2, generator=g, dtype=DTYPE)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    with ReferenceSiLU():
        H = dense_hessian(
            lambda values: loss_fn(functional_call(model, dict(zip(names, values)), (x,)), y),
            [p.detach() for p in params],
        )
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]

    def closure():
        return loss_fn(model(x), y)

    for strategy in ("auto", "vmap", "graph"):
        got = model_hvp(model, loss_fn, x, y, v, strategy=strategy)
        torch.testing.assert_close(flat(got), H @ flat(v), rtol=TOL, atol=TOL)
    torch.testing.assert_close(flat(exact_hvp(closure, params, v)), H @ flat(v), rtol=TOL, atol=TOL)
    diag = H.diagonal()
    torch.testing.assert_close(
        flat(model_hessian_diagonal(model, loss_fn, x, y)), diag, rtol=TOL, atol=TOL
    )
    torch.testing.assert_close(flat(hessian_diagonal(closure, params)), diag, rtol=TOL, atol=TOL)
    torch.testing.assert_close(
        model_hessian_trace(model, loss_fn, x, y), H.trace(), rtol=TOL, atol=TOL
    )
    torch.testing.assert_close(hessian_trace(closure, params), H.trace(), rtol=TOL, atol=TOL)
    with torch.no_grad():  # the call also works when the user is under no_grad
        torch.testing.assert_close(
            flat(model_hessian_diagonal(model, loss_fn, x, y)), diag, rtol=TOL, atol=TOL
        )
