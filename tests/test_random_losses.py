"""Losses that draw random numbers (dropout in training mode): from the same point of
the global random stream, every route must describe the Hessian of one loss, with
one fixed mask.

``nn.TransformerEncoderLayer`` applies dropout to the (transposed, non-contiguous)
attention output: the native kernel draws its mask in memory order, under ``vmap``
the batched tensors have another layout; and the fast diagonal routes evaluate
perturbed copies of the network.  Here the dense Hessian is assembled column by
column from graph-route products (the plain forward pass of the user's model), and
every other route, called after the same ``torch.manual_seed``, must agree with it.
(``tests/test_rng_dropout.py`` checks that this mask is the one a plain forward pass
draws.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_secorder import model_hessian_diagonal, model_hessian_trace_estimate, model_hvp
from torch_secorder.linalg.probes import draw_probes
from torch_secorder.problems._problem import module_problem

SEED = 11


def _encoder(dropout: float, norm_first: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=8,
        nhead=2,
        dim_feedforward=16,
        dropout=dropout,
        batch_first=True,
        norm_first=norm_first,
    )
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 5, 1)).double().train()
    x, y = torch.randn(4, 5, 8), torch.randn(4, 1)
    return model, x.double(), y.double()


def _dense_hessian_by_graph(model, x, y) -> torch.Tensor:
    """Columns H e_i from one create_graph gradient of the model's own forward pass."""
    torch.manual_seed(SEED)
    with module_problem(model, nn.functional.mse_loss, x, y) as problem:
        return problem.matmat("graph_batched", 128)(torch.eye(problem.dim, dtype=torch.float64))


@pytest.mark.parametrize("norm_first", [False, True])
def test_dropout_routes_agree_on_one_hessian(norm_first):
    model, x, y = _encoder(0.1, norm_first)
    H = _dense_hessian_by_graph(model, x, y)
    assert torch.allclose(H, H.T, atol=1e-10), "graph-route columns do not form a symmetric matrix"

    # vmap (forward-over-reverse) products equal the graph route's (the vector is
    # drawn from its own generator: the mask depends on the global RNG state)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    flat_v = torch.cat([t.reshape(-1) for t in v])
    torch.manual_seed(SEED)
    hv = model_hvp(model, nn.functional.mse_loss, x, y, v, strategy="vmap")
    assert torch.allclose(torch.cat([h.reshape(-1) for h in hv]), H @ flat_v, atol=1e-10)

    # the exact diagonal (whatever route it takes) is that matrix's diagonal
    torch.manual_seed(SEED)
    diag = model_hessian_diagonal(model, nn.functional.mse_loss, x, y, progress=False)
    assert torch.allclose(torch.cat([d.reshape(-1) for d in diag]), torch.diagonal(H), atol=1e-10)

    # every Hutchinson sample, on every strategy, is v^T H v for that matrix
    for strategy in ("graph", "graph_batched", "vmap"):
        generator = torch.Generator().manual_seed(1)
        torch.manual_seed(SEED)
        est = model_hessian_trace_estimate(
            model,
            nn.functional.mse_loss,
            x,
            y,
            5,
            generator=generator,
            strategy=strategy,
            progress=False,
        )
        probes = draw_probes(
            5, H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
        expected = ((probes @ H) * probes).sum(1)
        assert torch.allclose(est.samples, expected, atol=1e-10), strategy


def test_dropout_mask_is_fixed_but_real():
    """With dropout on, the Hessian differs from the one without (a mask is applied)."""
    model, x, y = _encoder(0.3, False)
    torch.manual_seed(SEED)
    with_dropout = model_hessian_diagonal(model, nn.functional.mse_loss, x, y, progress=False)
    model.eval()
    without = model_hessian_diagonal(model, nn.functional.mse_loss, x, y, progress=False)
    assert not all(torch.allclose(a, b) for a, b in zip(with_dropout, without))
