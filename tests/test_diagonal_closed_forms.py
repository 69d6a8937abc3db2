"""The graph route's closed forms, each against the dense float64 Hessian/GGN diagonal.

* The lazy term :math:`(AD)^\\top \\operatorname{diag}(r)(AD)` of a diagonal crossing one
  ``F.linear``, read off by its diagonal at the linear (or layer-norm) site below: drawn
  MLPs (depth, activation, loss, reduction, soft targets), all on the graph route.
* Closed-form Jacobian diagonals of elementwise calls (add/sub/neg/mul/div by a constant,
  eval batch norm, eval dropout), the batch/group norm per-sample squares, the loss
  gradients and cross-entropy's symmetric factor.
* Pooling's Jacobian transpose (max by the winners' indices, average by torch's kernel)
  equal to ``torch.func.vjp``, ties included.
* :func:`~torch_secorder.func._tape.outside_modes`: the user's torch-function modes see
  the evaluation of the loss, the stack is restored (also after an error), and a
  ``torch.device`` context stays in force.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from diagonal_settings import (
    Built,
    dense_ggn_diagonal,
    dense_hessian_diagonal,
    ours_ggn_diagonal,
    ours_hessian_diagonal,
    ours_plan,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from torch_secorder.func import fast_hessian_diagonal
from torch_secorder.func._rules import rule_for
from torch_secorder.func._tape import outside_modes, record

DT = torch.float64
ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "gelu": nn.GELU}


def _check(built: Built) -> None:
    assert set(ours_plan(built).values()) == {"graph"}
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))
    assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    act=st.sampled_from(sorted(ACTS)),
    loss=st.sampled_from(["ce", "ce_soft", "mse"]),
    reduction=st.sampled_from(["mean", "sum"]),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_mlps_on_the_graph_route(widths, act, loss, reduction, n, seed):
    torch.manual_seed(seed)
    sizes = [3, *widths, 3]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(ACTS[act]())
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    if loss == "ce":
        built = Built(model, nn.CrossEntropyLoss(reduction=reduction), x, torch.randint(0, 3, (n,)))
    elif loss == "ce_soft":
        y = torch.rand(n, 3, dtype=DT)
        built = Built(model, nn.CrossEntropyLoss(reduction=reduction), x, y)
    else:
        built = Built(model, nn.MSELoss(reduction=reduction), x, torch.randn(n, 3, dtype=DT))
    _check(built)


class Pointwise(nn.Module):
    """Linear layers with constant pointwise maps, eval batch norm and dropout between."""

    def __init__(self, op: str):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.norm = nn.BatchNorm1d(4) if op == "batch_norm" else nn.Identity()
        if op == "batch_norm":
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
        self.register_buffer("scale", torch.rand(4) + 0.5)
        self.op = op

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        ops = {
            "mul": lambda t: t * 2.5,
            "rmul": lambda t: 2.5 * t,
            "mul_tensor": lambda t: t * self.scale,
            "div": lambda t: t / 3.0,
            "div_tensor": lambda t: t / self.scale,
            "sub": lambda t: t - 1.0,
            "rsub": lambda t: 1.0 - t,
            "sub_tensor": lambda t: t - self.scale,
            "neg": lambda t: -t,
            "add": lambda t: t + self.scale,
            "batch_norm": self.norm,
            "dropout": lambda t: F.dropout(t, 0.3, training=False),
        }
        h = torch.sigmoid(self.fc2(ops[self.op](h)))
        second = ops["mul" if self.op == "batch_norm" else self.op]  # (its weight read once)
        return self.fc3(second(h))


@pytest.mark.parametrize(
    "op",
    ["mul", "rmul", "mul_tensor", "div", "div_tensor", "sub", "rsub", "sub_tensor", "neg",
     "add", "batch_norm", "dropout"],
)  # fmt: skip
def test_pointwise_jacobian_diagonals(op):
    torch.manual_seed(1)
    model = Pointwise(op).to(DT).eval()
    x = torch.randn(5, 3, dtype=DT)
    _check(Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 2, (5,))))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_channel_norm_squares(norm):
    torch.manual_seed(2)
    layer = nn.BatchNorm2d(4) if norm == "batch" else nn.GroupNorm(2, 4)
    if norm == "batch":
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), layer, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 3)
    )
    model = model.to(DT).eval()
    x = torch.randn(3, 2, 3, 3, dtype=DT)
    _check(Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (3,))))


POOLS = [
    (lambda x: F.max_pool2d(x, 3, 2, 1), (2, 3, 7, 7)),
    (lambda x: F.max_pool2d(x, 2, dilation=2, ceil_mode=True), (2, 3, 7, 7)),
    (lambda x: F.max_pool2d(F.relu(x), 2), (2, 3, 6, 6)),  # ties at zero
    (lambda x: F.max_pool1d(x, 3), (2, 3, 10)),
    (lambda x: F.max_pool3d(x, 2, 1), (2, 2, 4, 4, 4)),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), (2, 3, 7, 7)),
    (lambda x: F.avg_pool2d(x, 2, ceil_mode=True, divisor_override=3), (2, 3, 7, 7)),
    (lambda x: F.avg_pool3d(x, 2), (2, 2, 4, 4, 4)),
]


@pytest.mark.parametrize("index", range(len(POOLS)))
def test_pooling_jacobian_transpose(index):
    fn, shape = POOLS[index]
    torch.manual_seed(index)
    x = torch.randn(*shape, dtype=DT)
    calls, out = record(fn, x)
    call = calls[-1]
    rule = rule_for(call)
    if call.args[0] is not x:  # relu first: the pool reads its output
        x = call.args[0]
    cols = torch.randn(4, *out.shape, dtype=DT)
    fast_cols = rule.fast_vjp(call, [x], cols)
    assert fast_cols is not None
    expected = vmap(vjp(lambda t: call.func(t, *call.args[1:], **call.kwargs), x)[1])(cols)[0]
    assert torch.equal(fast_cols[0], expected)


class Counting(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_outside_modes_restores_the_stack():
    counting = Counting()
    with torch.device("cpu"), counting:
        before = _get_current_function_mode_stack()
        with outside_modes():
            inside = _get_current_function_mode_stack()
            torch.ones(2) + 1
        assert _get_current_function_mode_stack() == before
        with pytest.raises(RuntimeError, match="inside"), outside_modes():
            raise RuntimeError("inside")
        assert _get_current_function_mode_stack() == before
    assert counting.calls == 0  # nothing of ours went through the user's mode
    assert [type(m).__name__ for m in inside] == ["DeviceContext"]


def test_user_mode_sees_the_loss_and_the_result_is_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    built = Built(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda p: built.loss_fn(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    counting = Counting()
    with counting:
        found = fast_hessian_diagonal(f, params)
    assert counting.calls > 0  # the recorded evaluation ran under the user's mode
    assert_close(found, dense_hessian_diagonal(built))


_W = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(0))
_W2 = torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
TRANSPOSES = [
    (lambda x: F.layer_norm(x, (5,), _W, -_W), (2, 4, 5)),
    (lambda x: F.layer_norm(x, (5,)), (2, 4, 5)),
    (lambda x: F.layer_norm(x, (3, 5), _W2, None, 1e-3), (2, 3, 5)),
    (lambda x: torch.softmax(x, -1), (2, 4, 5)),
    (lambda x: torch.softmax(x, 1), (2, 4, 5)),
    (lambda x: F.log_softmax(x, dim=-1), (2, 4, 5)),
    (lambda x: x.permute(0, 2, 1), (2, 4, 5)),
    (lambda x: x.permute(2, 0, 1), (2, 4, 5)),
    (lambda x: x.transpose(-2, -1), (2, 4, 5)),
    (lambda x: torch.transpose(x, 0, 2), (2, 4, 5)),
]


@pytest.mark.parametrize("index", range(len(TRANSPOSES)))
def test_closed_form_jacobian_transposes(index):
    """Layer norm, softmax, log-softmax, permute, transpose: equal to ``torch.func.vjp``."""
    fn, shape = TRANSPOSES[index]
    torch.manual_seed(index)
    x = torch.randn(*shape, dtype=DT)
    calls, out = record(fn, x)
    (call,) = [c for c in calls if c.out is out]
    cols = torch.randn(3, *out.shape, dtype=DT)
    found = rule_for(call).fast_vjp(call, [x], cols)
    assert found is not None
    expected = vmap(vjp(fn, x)[1])(cols)[0]
    assert_close(found[0], expected)
