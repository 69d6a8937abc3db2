"""Modules that write their buffers in the forward pass (a call counter).

Every way of writing a buffer (``self.calls += 1``, ``self.calls[0] += 1``,
``self.calls.add_(1)``, ``torch.add(..., out=self.calls)``, ``self.calls[:] = ...``)
on every route: the result is the exact number of the loss the user would compute
(the forward reads the counter after writing it, so each evaluation must start from
the user's value), and afterwards the model holds the very same buffer object, with
its value and its version counter unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_secorder import (
    empirical_fisher_diagonal,
    gauss_newton_product,
    hessian_trace,
    model_eigenvalues,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hessian_trace_estimate,
    model_hvp,
)
from torch_secorder.linalg.probes import draw_probes

TOL = dict(rtol=1e-10, atol=1e-10)
STYLES = ("iadd", "index", "add_", "out", "setitem")
START = 2.0  # the counter's value before the call: the loss is scaled by START + 1


class Counter(nn.Module):
    """``tanh(W x + b)`` scaled by its (incremented) call counter."""

    def __init__(self, style: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2).double()
        self.style = style
        self.register_buffer("calls", torch.full((1,), START, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "iadd":
            self.calls += 1
        elif self.style == "index":
            self.calls[0] += 1
        elif self.style == "add_":
            self.calls.add_(1)
        elif self.style == "out":
            torch.add(self.calls, 1, out=self.calls)
        elif self.style == "setitem":
            self.calls[:] = self.calls + 1
        return torch.tanh(self.lin(x)) * self.calls


def _data():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 2, generator=g, dtype=torch.float64),
    )


LOSS = nn.functional.mse_loss


def _output(model: Counter, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's output as a pure function of the flat parameters (the oracle's)."""
    W = flat[:6].reshape(2, 3)
    b = flat[6:]
    return torch.tanh(x @ W.T + b) * (START + 1)


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.fixture(scope="module")
def oracle():
    x, y = _data()
    model = Counter("iadd")
    flat = _flat_params(model)
    H = torch.func.hessian(lambda w: LOSS(_output(model, w, x), y))(flat)
    J = torch.func.jacrev(lambda w: _output(model, w, x).reshape(-1))(flat)
    per_sample = torch.stack(
        [
            torch.func.grad(lambda w, i=i: LOSS(_output(model, w, x[i : i + 1]), y[i : i + 1]))(
                flat
            )
            for i in range(x.shape[0])
        ]
    )
    return {"H": H, "J": J, "fisher": (per_sample**2).mean(0), "x": x, "y": y}


def _check_untouched(model: Counter, buffer: torch.Tensor, version: int) -> None:
    assert model._buffers["calls"] is buffer, type(model._buffers["calls"])
    assert model.calls is buffer
    assert buffer._version == version
    assert torch.equal(buffer, torch.full((1,), START, dtype=torch.float64))


def _vector(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 3, generator=g, dtype=torch.float64),
        torch.randn(2, generator=g, dtype=torch.float64),
    ]


def _calls(oracle):
    """(name, call(model) -> flat result, expected flat result)."""
    x, y, H, J = oracle["x"], oracle["y"], oracle["H"], oracle["J"]
    v = _vector(3)
    probes = draw_probes(4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cases = []
    for strategy in ("vmap", "graph", "graph_batched"):
        cases.append(
            (
                f"hvp-{strategy}",
                lambda m, s=strategy: _flat(model_hvp(m, LOSS, x, y, v, strategy=s)),
                H @ _flat(v),
            )
        )
        cases.append(
            (
                f"hutchinson-{strategy}",
                lambda m, s=strategy: (
                    model_hessian_trace_estimate(
                        m,
                        LOSS,
                        x,
                        y,
                        4,
                        generator=torch.Generator().manual_seed(5),
                        strategy=s,
                        progress=False,
                    ).samples
                ),
                ((probes @ H) * probes).sum(1),
            )
        )
    cases += [
        (
            "diagonal",
            lambda m: _flat(model_hessian_diagonal(m, LOSS, x, y, progress=False)),
            torch.diagonal(H),
        ),
        ("trace", lambda m: model_hessian_trace(m, LOSS, x, y).reshape(1), torch.trace(H)[None]),
        (
            "closure-trace",
            lambda m: torch.as_tensor(
                hessian_trace(lambda: LOSS(m(x), y), list(m.parameters()), num_samples=None)
            ).reshape(1),
            torch.trace(H)[None],
        ),
        (
            "ggn",
            lambda m: _flat(gauss_newton_product(m, LOSS, x, y, v)),
            J.T @ ((2.0 / J.shape[0]) * (J @ _flat(v))),  # mean squared error: 2/(N D)
        ),
        (
            "fisher",
            lambda m: _flat(empirical_fisher_diagonal(m, LOSS, x, y, chunk_size=2)),
            oracle["fisher"],
        ),
        (
            "eigenvalues",
            lambda m: (
                model_eigenvalues(
                    m, lambda mm, a, b: LOSS(mm(a), b), x, y, 3, num_iterations=8, tol=1e-12
                )[0]
                .sort()
                .values
            ),
            None,
        ),
    ]
    return cases


CASE_NAMES = [
    *(f"{kind}-{s}" for s in ("vmap", "graph", "graph_batched") for kind in ("hvp", "hutchinson")),
    "diagonal",
    "trace",
    "closure-trace",
    "ggn",
    "fisher",
    "eigenvalues",
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_counting_module_exact_and_its_buffer_untouched(oracle, style, case):
    name, call, expected = next(c for c in _calls(oracle) if c[0] == case)
    if expected is None:  # eigenvalues: the three largest in magnitude
        exact = torch.linalg.eigvalsh(oracle["H"])
        expected = exact[exact.abs().argsort(descending=True)[:3]].sort().values
    model = Counter(style)
    buffer = model.calls
    version = buffer._version
    result = call(model)
    torch.testing.assert_close(result, expected, **TOL)
    _check_untouched(model, buffer, version)
    # and the model still counts as it did before the call
    model(oracle["x"])
    assert model.calls.item() == START + 1


def test_buffer_object_is_restored_after_an_error():
    x, y = _data()
    model = Counter("iadd")
    buffer, version = model.calls, model.calls._version

    def failing_loss(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model_hessian_trace(model, failing_loss, x, y)
    _check_untouched(model, buffer, version)
