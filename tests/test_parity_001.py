"""0.0.1 call patterns that must keep working (issue 7, section 6), against dense oracles.

Each test is a call as 0.0.1 code writes it; the numbers are checked against
float64 oracles from torch.func (jacrev / hessian) or closed forms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torch_secorder import (
    UnsupportedShapeError,
    approximate_hvp,
    create_random_direction,
    exact_hvp,
    gauss_newton_matrix_approximation,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
    hessian_diagonal,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)

DT = torch.float64


def relu_net(seed: int, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).to(dtype)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_approximate_hvp_num_samples_200():
    """0.0.1: ``num_samples=200`` averaged 200 identical differences (it overflowed in between)."""
    model = relu_net(0)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def loss():
        return F.mse_loss(model(x), y)

    many = approximate_hvp(loss, params, v, num_samples=200)
    assert torch.equal(flat(many), flat(approximate_hvp(loss, params, v)))
    values = {k: p.detach() for k, p in model.named_parameters()}
    H = hessian(lambda p: F.mse_loss(functional_call(model, p, (x,)), y))(values)
    names = list(values)
    dense = torch.cat(
        [torch.cat([H[a][b].reshape(values[a].numel(), -1) for b in names], 1) for a in names]
    )
    torch.testing.assert_close(flat(many), dense @ flat(v), rtol=1e-7, atol=1e-8)


def test_runtime_error_handlers_still_catch():
    """0.0.1 left these checks to torch.autograd, whose errors are RuntimeErrors."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    frozen = torch.tensor([3.0])
    with pytest.raises(RuntimeError):
        exact_hvp(lambda: (x**2).sum(), [x], torch.ones(3))
    with pytest.raises(RuntimeError):
        exact_hvp(lambda: x * 2, [x], torch.ones(2))
    with pytest.raises(RuntimeError):
        hessian_diagonal(lambda: (x**2).sum() * frozen.sum(), [x, frozen], strict=True)
    with pytest.raises(ValueError):  # and the rule of this package
        hessian_diagonal(lambda: (x**2).sum() * frozen.sum(), [x, frozen], strict=True)


@pytest.mark.parametrize("fn", [generalized_fisher_diagonal, generalized_fisher_trace])
def test_type2_fisher_of_1d_logits_is_not_implemented_as_in_001(fn):
    """0.0.1 raised NotImplementedError for (batch,) outputs with loss_type="nll"."""
    model = nn.Linear(4, 3)
    outputs = torch.randn(10, requires_grad=True)
    targets = torch.randint(0, 3, (10,))
    for caught in (NotImplementedError, ValueError, RuntimeError, UnsupportedShapeError):
        with pytest.raises(caught, match=r"\(10,\)"):
            fn(model, outputs, targets, loss_type="nll")


def test_gauss_newton_matrix_approximation_format_and_scale():
    """One diagonal per parameter that requires grad; the GGN of the loss given.

    0.0.1 returned diag(J^T J) for MSE; nn.MSELoss() over N x D outputs scales it by 2/(ND).
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    diag = gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y)
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    assert [d.shape for d in diag] == [p.shape for p in trainable.values()]
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(trainable)
    J = torch.cat([jac[k].reshape(10, -1) for k in trainable], dim=1)
    jtj = (J * J).sum(0)  # what 0.0.1 returned
    torch.testing.assert_close(flat(diag), jtj * 2 / 10, rtol=1e-12, atol=1e-14)


def test_create_random_direction_unit_norm_per_tensor():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
    direction = create_random_direction(model)
    assert len(direction) == len(list(model.parameters()))
    for d, p in zip(direction, model.parameters(), strict=True):
        assert d.shape == p.shape
        torch.testing.assert_close(d.norm(), torch.tensor(1.0), rtol=1e-6, atol=0)


def test_per_layer_without_matching_layers_is_empty():
    model = relu_net(2)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    with pytest.warns(UserWarning, match="selects no module"):
        assert per_layer_hessian_diagonal(model, nn.MSELoss(), x, y, layer_types=[nn.Conv2d]) == {}
    with pytest.warns(UserWarning, match="selects no module"):
        assert per_layer_fisher_diagonal(model, nn.MSELoss(), x, y, layer_types=[nn.Conv2d]) == {}
    linear = per_layer_hessian_diagonal(model, nn.MSELoss(), x, y, layer_types=[nn.Linear])
    assert sorted(linear) == ["0", "2"]
    values = {k: p.detach() for k, p in model.named_parameters()}
    H = hessian(lambda p: F.mse_loss(functional_call(model, p, (x,)), y))(values)
    expected = torch.cat([H[k][k].reshape(values[k].numel(), -1).diagonal() for k in values])
    torch.testing.assert_close(
        torch.cat([linear["0"], linear["2"]]), expected, rtol=1e-12, atol=1e-14
    )
