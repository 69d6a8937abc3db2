"""A loss that depends on none of ``params``: zeros, as 0.0.1 returned, and a warning why.

Issue 7, section 5.  Two cases: nothing requires grad (a fully frozen model, plain
tensors), and a loss that does not depend on the tensors (detached, or computed under
``torch.no_grad()``).  Every function returns exact zeros of the right shapes (the
Hessian of a constant) and emits one ``UserWarning`` naming the case, pointing at
the caller's line.  A partly frozen model is not warned about.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_hessian, ravel
from torch import nn
from torch.func import functional_call

import torch_secorder
from torch_secorder import StrictError
from torch_secorder.core import hvp as core_hvp

DT = torch.float64


def closure_calls(func, params):
    v = [torch.ones_like(p) for p in params]
    q = dict(progress=False)
    return {
        "hessian_trace": lambda: torch_secorder.hessian_trace(func, params, **q),
        "hessian_trace_hutchinson": lambda: torch_secorder.hessian_trace(func, params, 2, **q),
        "hessian_trace_estimate": lambda: (
            torch_secorder.hessian_trace_estimate(func, params, 2, **q).estimate
        ),
        "hessian_diagonal": lambda: torch_secorder.hessian_diagonal(func, params, **q),
        "exact_hvp": lambda: torch_secorder.exact_hvp(func, params, v),
        "exact_hvp_vmap": lambda: torch_secorder.exact_hvp(func, params, v, strategy="vmap"),
        "hvp.hessian_trace": lambda: torch.tensor(core_hvp.hessian_trace(func, params, 3)),
    }


def model_calls(model, loss_fn, x, y):
    v = [torch.ones_like(p) for p in model.parameters()]
    q = dict(progress=False)
    return {
        "model_hessian_trace": lambda: torch_secorder.model_hessian_trace(
            model, loss_fn, x, y, **q
        ),
        "model_hessian_trace_estimate": lambda: (
            torch_secorder.model_hessian_trace_estimate(model, loss_fn, x, y, 2, **q).estimate
        ),
        "model_hessian_diagonal": lambda: torch_secorder.model_hessian_diagonal(
            model, loss_fn, x, y, **q
        ),
        "model_hvp": lambda: torch_secorder.model_hvp(model, loss_fn, x, y, v),
        "model_hvp_graph": lambda: torch_secorder.model_hvp(
            model, loss_fn, x, y, v, strategy="graph"
        ),
    }


def assert_zeros_like(result, like):
    if isinstance(result, torch.Tensor) and result.dim() == 0:
        assert result.item() == 0.0
        return
    result = result if isinstance(result, list) else [result]
    assert len(result) == len(like)
    for r, p in zip(result, like, strict=True):
        assert r.shape == p.shape and r.dtype == p.dtype and not r.any()


def run_and_get_warning(call, this_file_line_check=True):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    ours = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    if this_file_line_check:  # the warning points at the user's code, not the package
        assert ours[0].filename == __file__
    return result, str(ours[0].message)


def test_a_detached_loss_gives_zeros_and_says_why():
    x = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    w = torch.ones(2, 2, dtype=DT, requires_grad=True)
    for name, call in closure_calls(
        lambda: (x.detach() ** 3).sum() + w.detach().sum(), [x, w]
    ).items():
        result, message = run_and_get_warning(call)
        assert "does not depend on params" in message and "zeros are returned" in message, name
        assert_zeros_like(result, [x, w])


def test_a_loss_under_no_grad_gives_zeros_and_says_why():
    x = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)

    def func():
        with torch.no_grad():
            return (x**3).sum()

    for name, call in closure_calls(func, [x]).items():
        result, message = run_and_get_warning(call)
        assert "does not depend on params" in message, name
        assert_zeros_like(result, [x])


def test_tensors_that_do_not_require_grad_give_zeros_and_say_why():
    x = torch.tensor([1.0, 2.0], dtype=DT)
    for name, call in closure_calls(lambda: (x**3).sum(), [x]).items():
        result, message = run_and_get_warning(call)
        assert "no tensor of params requires grad" in message, name
        assert_zeros_like(result, [x])


def mlp():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    y = torch.randn(5, 2, generator=g, dtype=DT)
    return model, x, y


def test_a_fully_frozen_model_gives_zeros_and_says_why():
    model, x, y = mlp()
    model.requires_grad_(False)
    for name, call in model_calls(model, F.mse_loss, x, y).items():
        result, message = run_and_get_warning(call)
        assert "no tensor of model.parameters() requires grad" in message, name
        assert_zeros_like(result, list(model.parameters()))
    v = [torch.ones_like(p) for p in model.parameters()]
    for call in (
        lambda: torch_secorder.gauss_newton_product(model, F.mse_loss, x, y, v),
        lambda: torch_secorder.model_jvp(model, x, v),
    ):
        result, message = run_and_get_warning(call)
        assert "requires grad" in message
    assert not any(p.requires_grad for p in model.parameters())


def test_a_model_loss_that_detaches_the_output_gives_zeros_and_says_why():
    model, x, y = mlp()

    def detached(out, target):
        return F.mse_loss(out.detach(), target)

    for name, call in model_calls(model, detached, x, y).items():
        result, message = run_and_get_warning(call)
        assert "does not depend on model.parameters()" in message, name
        assert_zeros_like(result, list(model.parameters()))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_strict_refuses_a_loss_that_depends_on_nothing():
    x = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    with pytest.raises(StrictError, match=r"params\[0\] is not used"):
        torch_secorder.hessian_diagonal(lambda: (x.detach() ** 2).sum(), [x], strict=True)


def test_a_partly_frozen_model_is_not_warned_about():
    model, x, y = mlp()
    model[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        diag = torch_secorder.model_hessian_diagonal(model, F.mse_loss, x, y, progress=False)
    assert not diag[0].any() and not diag[1].any()
    active = {"2.weight": model[2].weight.detach(), "2.bias": model[2].bias.detach()}
    H = dense_hessian(lambda p: F.mse_loss(functional_call(model, p, (x,)), y), active)
    assert_close(ravel({"2.weight": diag[2], "2.bias": diag[3]}), H.diagonal())


def test_eigenvalues_of_a_loss_that_depends_on_nothing_are_an_error_not_a_warning():
    model, x, y = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match="does not depend on the parameters of model"):
            torch_secorder.model_eigenvalues(
                model, lambda m, d, t: F.mse_loss(m(d).detach(), t), x, y
            )
        model.requires_grad_(False)
        with pytest.raises(ValueError, match="no parameter of model requires grad"):
            torch_secorder.model_eigenvalues(model, lambda m, d, t: F.mse_loss(m(d), t), x, y)
