"""curvlinops' test cases (and issue 8's own architectures): the exact Hessian diagonal in
its model form and the GGN diagonal against the dense float64 matrices, to 1e-10.

The settings (tests/diagonal_settings.py): MLPs with cross-entropy, BCE with logits and
MSE (mean and sum), dict inputs, weights shared over sequence and spatial axes, the
LeNet-like CNN, a fixed dropout mask, batch norm in training and eval mode, tied
weights, a U-Net-like model with upsampling; and residual tanh blocks with group norm,
concatenated branches, RMS/layer norm, attention, ``padding="same"``.  The routes are
asserted in tests/test_diagonal_graph_routes.py, not here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from diagonal_settings import (
    CURVLINOPS_SETTINGS,
    Setting,
    dense_ggn_diagonal,
    dense_hessian_diagonal,
    ours_ggn_diagonal,
    trainable,
)

from torch_secorder.core import model_hessian_diagonal


def _name(setting: Setting) -> str:
    return setting.name


@pytest.mark.parametrize("setting", CURVLINOPS_SETTINGS, ids=_name)
def test_model_hessian_diagonal(setting: Setting) -> None:
    built = setting.build()
    model, loss_fn, x, y = built
    assert len(trainable(model)) == len(list(model.parameters()))
    buffers = [b.clone() for b in model.buffers()]
    training = [m.training for m in model.modules()]
    fast = model_hessian_diagonal(model, loss_fn, x, y, progress=False)
    dense = dense_hessian_diagonal(built)
    assert_close(dict(zip(dense, fast, strict=True)), dense)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert training == [m.training for m in model.modules()]


@pytest.mark.parametrize("setting", CURVLINOPS_SETTINGS, ids=_name)
def test_ggn_diagonal(setting: Setting) -> None:
    built = setting.build()
    assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))
