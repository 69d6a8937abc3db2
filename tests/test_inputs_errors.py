"""ShapeError and StrictError: both a ValueError and a RuntimeError (issue 7, section 6).

0.0.1 left these checks to ``torch.autograd`` and raised ``RuntimeError``; this
package raises ``ValueError``.  The classes are both, so code written for either
catches them, and the messages name the argument, the index and both shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, assert_close, hessian_of_closure
from torch import nn

import torch_secorder
from torch_secorder import ShapeError, StrictError, errors
from torch_secorder.core import gvp
from torch_secorder.linalg import eigen


def test_the_classes_are_both_and_public():
    for cls in (ShapeError, StrictError):
        assert issubclass(cls, ValueError) and issubclass(cls, RuntimeError)
        assert cls.__name__ in torch_secorder.__all__
        assert getattr(torch_secorder, cls.__name__) is getattr(errors, cls.__name__)


def setup():
    x = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    w = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=DTYPE, requires_grad=True)

    def func():
        return (x**3).sum() * w.sum() + (w**2).prod()

    return func, x, w


V_SHAPE_CALLS = {
    "exact_hvp": lambda f, p, v: torch_secorder.exact_hvp(f, p, v),
    "approximate_hvp": lambda f, p, v: torch_secorder.approximate_hvp(f, p, v),
    "hessian_diagonal": lambda f, p, v: torch_secorder.hessian_diagonal(f, p, v, progress=False),
    "jvp": lambda f, p, v: torch_secorder.jvp(f, p, v),
}


@pytest.mark.parametrize("name", list(V_SHAPE_CALLS))
def test_v_of_the_wrong_shape_or_count_is_a_shape_error(name):
    call = V_SHAPE_CALLS[name]
    func, x, w = setup()
    bad_shape = [torch.ones(3, dtype=DTYPE), torch.ones(2, 2, dtype=DTYPE)]
    for caught in (ValueError, RuntimeError, ShapeError):
        with pytest.raises(caught, match=r"v\[0\] has shape \(3,\).*\(2,\)"):
            call(func, [x, w], bad_shape)
    with pytest.raises(RuntimeError, match="one tensor per parameter: expected 2, got 1"):
        call(func, [x, w], [torch.ones(2, dtype=DTYPE)])
    # The right shapes give the oracle's numbers (exact_hvp here; the same list check).
    v = [torch.tensor([1.0, -2.0], dtype=DTYPE), torch.tensor([[0.5, 1.0], [0.0, 3.0]])]
    H = hessian_of_closure(func, [x, w])
    flat_v = torch.cat([t.reshape(-1).to(DTYPE) for t in v])
    hv = torch_secorder.exact_hvp(func, [x, w], v)
    assert_close(torch.cat([t.reshape(-1) for t in hv]), H @ flat_v)


def test_model_api_v_and_cotangent_shapes_are_shape_errors():
    model = nn.Linear(3, 2).to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    wrong = [torch.ones(3, 2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)]
    for call in (
        lambda: torch_secorder.model_hvp(model, F.mse_loss, x, y, wrong),
        lambda: torch_secorder.gauss_newton_product(model, F.mse_loss, x, y, wrong),
        lambda: torch_secorder.model_jvp(model, x, wrong),
    ):
        with pytest.raises(RuntimeError, match=r"v\[0\] has shape \(3, 2\).*\(2, 3\)"):
            call()
    with pytest.raises(ShapeError, match=r"output's shape \(4, 2\).*got shape \(5,\)"):
        torch_secorder.model_vjp(model, x, torch.ones(5, dtype=DTYPE))
    t = torch.ones(3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ShapeError, match=r"vs\[0\] must have shape.*\(batch, 3\), got \(2, 4\)"):
        gvp.batch_jvp(lambda: t**2, [t], torch.ones(2, 4, dtype=DTYPE))
    with pytest.raises(ShapeError, match="vs must have shape"):
        gvp.batch_vjp(lambda: t**2, [t], torch.ones(2, 4, dtype=DTYPE))


def test_a_loss_that_is_not_a_scalar_is_a_shape_error():
    func, x, w = setup()
    with pytest.raises(RuntimeError, match=r"scalar.*\(2,\)"):
        torch_secorder.exact_hvp(lambda: x**2, [x, w], [torch.ones(2), torch.ones(2, 2)])
    with pytest.raises(ShapeError):
        torch_secorder.hessian_trace(lambda: x**2, [x])


def test_start_vectors_of_the_eigensolvers_are_shape_errors():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE))
    with pytest.raises(ShapeError, match=r"v0 must have shape \(3,\)"):
        eigen.lanczos_eigsh(lambda V: V @ A, 3, v0=torch.ones(2, dtype=DTYPE))
    with pytest.raises(ShapeError, match=r"X0 must have shape \(1, 3\)"):
        eigen.subspace_iteration(lambda V: V @ A, 3, X0=torch.ones(2, 3, dtype=DTYPE))


STRICT_CALLS = {
    "hessian_trace": lambda f, p: torch_secorder.hessian_trace(f, p, strict=True),
    "hessian_trace_estimate": lambda f, p: torch_secorder.hessian_trace_estimate(
        f, p, 2, strict=True, progress=False
    ),
    "hessian_diagonal": lambda f, p: torch_secorder.hessian_diagonal(f, p, strict=True),
}


@pytest.mark.parametrize("name", list(STRICT_CALLS))
def test_strict_errors_are_runtime_errors_with_torchs_phrase(name):
    call = STRICT_CALLS[name]
    c = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    d = torch.tensor([3.0, 4.0], dtype=DTYPE)
    unused = torch.ones(2, dtype=DTYPE, requires_grad=True)
    # 0.0.1's own test: pytest.raises(RuntimeError, match="One of the differentiated ...").
    with pytest.raises(RuntimeError, match="One of the differentiated Tensors does not require"):
        call(lambda: (c * d).sum(), [c, d])
    with pytest.raises(StrictError, match=r"params\[1\] does not require grad"):
        call(lambda: (c * d).sum(), [c, d])
    with pytest.raises(ValueError, match=r"params\[1\] is not used"):
        call(lambda: (c**3).sum(), [c, unused])
    # A detached loss uses none of them: the first index is named.
    with pytest.raises(StrictError, match=r"params\[0\] is not used"):
        call(lambda: (c.detach() ** 3).sum(), [c])
    # strict with every tensor used: the exact numbers.
    H = hessian_of_closure(lambda: (c**3).sum() * unused.prod(), [c, unused])
    trace = torch_secorder.hessian_trace(
        lambda: (c**3).sum() * unused.prod(), [c, unused], None, strict=True
    )
    assert_close(trace, H.trace())


def test_strict_model_errors_are_runtime_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(DTYPE)
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(3, 2, dtype=DTYPE), torch.randn(3, 1, dtype=DTYPE)
    try:
        with pytest.raises(RuntimeError, match=r"params\[1\] does not require grad"):
            torch_secorder.model_hessian_diagonal(model, F.mse_loss, x, y, strict=True)
    finally:
        model[0].bias.requires_grad_(True)
    assert all(p.requires_grad for p in model.parameters())


def test_unflatten_params_of_the_wrong_size_is_a_shape_error():
    shapes = [torch.Size([2, 2]), torch.Size([1])]
    with pytest.raises(RuntimeError, match="has 4 entries but param_shapes describe 5"):
        torch_secorder.unflatten_params(torch.arange(4.0), shapes)
    with pytest.raises(ShapeError, match=r"1-D, got shape \(5, 1\)"):
        torch_secorder.unflatten_params(torch.arange(5.0).reshape(5, 1), shapes)
    back = torch_secorder.unflatten_params(torch.arange(5.0), shapes)
    assert torch.equal(back[0], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(back[1], torch.tensor([4.0]))
