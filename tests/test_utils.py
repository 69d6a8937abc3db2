"""core.utils: flat vectors <-> parameter lists, selecting parameters of a model."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_secorder.core.utils import (
    flatten_params,
    get_param_shapes,
    get_params_by_module_type,
    get_params_by_name_pattern,
    unflatten_params,
)

shapes_strategy = st.lists(
    st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=30, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2**31 - 1))
def test_flatten_unflatten_round_trip(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    flat = flatten_params(params)
    assert flat.dim() == 1 and flat.numel() == sum(p.numel() for p in params)
    expected = torch.cat([p.reshape(-1) for p in params])
    assert torch.equal(flat, expected)
    shapes_out = get_param_shapes(params)
    assert shapes_out == [torch.Size(s) for s in shapes]
    back = unflatten_params(flat, shapes_out)
    assert len(back) == len(params)
    for b, p in zip(back, params, strict=True):
        assert b.shape == p.shape and torch.equal(b, p)
    # tuples of ints work as shapes, and the pieces are views of the flat tensor.
    views = unflatten_params(flat, [tuple(s) for s in shapes])
    if flat.numel():
        flat[0] = 123.0
        first = next(v for v in views if v.numel())
        assert first.reshape(-1)[0] == 123.0


def test_flatten_is_differentiable_and_accepts_non_contiguous():
    w = torch.randn(3, 4, requires_grad=True)
    t = w.T  # non-contiguous (0.0.1's view(-1) failed here)
    flat = flatten_params([t, w])
    assert torch.equal(flat[:12], t.reshape(-1))
    (grad,) = torch.autograd.grad(flat.sum(), [w])
    assert torch.equal(grad, torch.full_like(w, 2.0))
    assert torch.equal(flatten_params(w), w.reshape(-1))


def test_model_parameters_round_trip():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    params = list(model.parameters())
    back = unflatten_params(flatten_params(params), get_param_shapes(params))
    assert all(torch.equal(a, b) for a, b in zip(back, params, strict=True))


def test_select_by_module_type_and_pattern():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.norm = nn.LayerNorm(2)

    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), Block(), nn.Conv1d(1, 1, 2))
    lin = get_params_by_module_type(model, nn.Linear)
    assert list(lin) == ["0", "2.fc"]
    assert lin["0"][0] is model[0].weight and lin["0"][1] is model[0].bias
    both = get_params_by_module_type(model, [nn.Linear, nn.Conv1d])
    assert list(both) == ["0", "2.fc", "3"]
    assert get_params_by_module_type(model, (nn.Linear, nn.Conv1d)).keys() == both.keys()
    # a container type takes its children's parameters too; parameterless modules map to [].
    block = get_params_by_module_type(model, Block)["2"]
    assert [id(p) for p in block] == [id(p) for p in model[2].parameters()]
    assert get_params_by_module_type(model, nn.ReLU) == {"1": []}

    weights = get_params_by_name_pattern(model, r"weight$")
    assert [id(p) for p in weights] == [
        id(p) for n, p in model.named_parameters() if n.endswith("weight")
    ]
    assert get_params_by_name_pattern(model, "fc")[0] is model[2].fc.weight
    assert get_params_by_name_pattern(model, re.compile(r"^3\.")) == [
        model[3].weight,
        model[3].bias,
    ]
    assert get_params_by_name_pattern(model, "nothing") == []


def test_bad_input():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        get_params_by_module_type([model], nn.Linear)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        get_params_by_name_pattern("model", "w")
    with pytest.raises(TypeError, match="module_type must be a type"):
        get_params_by_module_type(model, "Linear")
    with pytest.raises(ValueError, match="module_type must name at least one type"):
        get_params_by_module_type(model, [])
    with pytest.raises(ValueError, match="pattern is not a valid regular expression"):
        get_params_by_name_pattern(model, "(")
    with pytest.raises(TypeError, match="pattern must be a regular expression string"):
        get_params_by_name_pattern(model, 3)
    with pytest.raises(ValueError, match="flat_params has 5 entries but param_shapes describe 4"):
        unflatten_params(torch.zeros(5), [torch.Size([2, 2])])
    with pytest.raises(ValueError, match=r"flat_params must be 1-D, got shape \(2, 2\)"):
        unflatten_params(torch.zeros(2, 2), [torch.Size([4])])
    with pytest.raises(TypeError, match="flat_params must be a torch.Tensor"):
        unflatten_params([0.0], [torch.Size([1])])
    with pytest.raises(TypeError, match=r"param_shapes\[0\] must be a torch.Size"):
        unflatten_params(torch.zeros(2), ["ab"])
    with pytest.raises(TypeError, match="param_shapes must be a list of shapes"):
        unflatten_params(torch.zeros(2), torch.Size([2]))
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got int"):
        get_param_shapes([torch.zeros(1), 3])
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        flatten_params([1.0])
    with pytest.raises(ValueError, match="at least one tensor"):
        flatten_params([])
