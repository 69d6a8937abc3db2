"""Shared test helpers: small float64 problems drawn by hypothesis, and the dense oracle.

A :class:`Problem` is a pure scalar loss ``f(params)`` of a parameter pytree (a dict of
float64 tensors with several leaves) and the point ``params``.  Three families are
drawn, all in float64 and small enough for a dense ``n x n`` Hessian:

* :func:`mlp_problems`: an ``nn.Sequential`` MLP with a smooth activation (tanh,
  softplus, sigmoid, GELU), MSE or cross-entropy loss with ``"mean"`` or ``"sum"``
  reduction. These also carry ``model``, ``loss_fn``, ``inputs``, ``targets`` for the
  module API (``f(params) == loss_fn(functional_call(model, params, inputs), targets)``).
* :func:`quadratic_problems`: :math:`\\tfrac12 x^\\top A x + b^\\top x` with a random
  symmetric, possibly indefinite :math:`A`, with ``x`` split into several leaves.
  The Hessian is known in closed form (``known_hessian``).
* :func:`cubic_problems`: a quadratic plus :math:`\\sum_i c_i x_i^3 + (u^\\top x)^3`,
  whose Hessian depends on the point (third derivatives are nonzero).  Known Hessian.

:func:`diagonal_problems` draws separable losses (diagonal, indefinite Hessians).
:func:`smooth_problems` draws from all of the first three families.

Hypothesis draws the sizes, the kind of problem and an integer seed; the tensors
come from a :class:`torch.Generator` with that seed (drawing every float through
hypothesis would be slow, and smooth functions do not hide bugs in particular floats).

The oracle, :func:`dense_hessian`, flattens the pytree's leaves (optree order, as
:func:`ravel`) and applies :func:`torch.func.hessian` to the flattened function,
under the math attention kernel so that transformers work.

Tolerances: results are compared with :func:`assert_close` at ``TOL = 1e-10``
(relative and absolute), the float64 standard of the project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "TOL",
    "Problem",
    "ReferenceNorms",
    "assert_close",
    "cubic_problems",
    "dense_hessian",
    "diagonal_problems",
    "hessian_of_closure",
    "make_mlp",
    "mlp_problems",
    "quadratic_problems",
    "ravel",
    "smooth_problems",
    "unravel",
]

DTYPE = torch.float64

#: Tolerance (relative and absolute) of float64 comparisons against the oracle.
TOL = 1e-10

#: Smooth activations of the MLP problems (twice differentiable everywhere).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}

#: Losses of the MLP problems: name -> (loss_fn(outputs, targets), kind of targets).
LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "mse-mean": (lambda out, y: F.mse_loss(out, y, reduction="mean"), "real"),
    "mse-sum": (lambda out, y: F.mse_loss(out, y, reduction="sum"), "real"),
    "ce-mean": (lambda out, y: F.cross_entropy(out, y, reduction="mean"), "class"),
    "ce-sum": (lambda out, y: F.cross_entropy(out, y, reduction="sum"), "class"),
}


# --------------------------------------------------------------------------- pytrees


def ravel(tree: Any) -> Tensor:
    """Concatenate the leaves of a pytree (optree order) into one flat vector."""
    return torch.cat([leaf.reshape(-1) for leaf in optree.tree_leaves(tree)])


def unravel(flat: Tensor, like: Any) -> Any:
    """Split a flat vector into a pytree shaped like ``like`` (inverse of :func:`ravel`)."""
    leaves, spec = optree.tree_flatten(like)
    pieces = torch.split(flat, [leaf.numel() for leaf in leaves])
    return optree.tree_unflatten(
        spec, [p.reshape(leaf.shape) for p, leaf in zip(pieces, leaves, strict=True)]
    )


def assert_close(actual: Any, expected: Any, tol: float = TOL) -> None:
    """Pytrees of tensors with the same structure and every entry within ``tol``."""
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec, f"structures differ: {a_spec} vs {e_spec}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert isinstance(a, Tensor), f"expected a tensor, got {type(a).__name__}"
        e = torch.as_tensor(e, dtype=a.dtype)
        torch.testing.assert_close(a.detach(), e.detach(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- oracle


def _reference_normalise(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(x.var(dim=dims, correction=0, keepdim=True) + eps)


def _reference_affine(out: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (out.dim() - 2)
    out = out if weight is None else out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def _reference_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    out = _reference_normalise(
        input, tuple(range(input.dim() - len(normalized_shape), input.dim())), eps
    )
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


def _reference_batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if training or running_mean is None:
        out = _reference_normalise(input, (0, *range(2, input.dim())), eps)
    else:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        out = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    return _reference_affine(out, weight, bias)


def _reference_instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    assert use_input_stats, "the oracle supports instance norm with input statistics only"
    return _reference_affine(
        _reference_normalise(input, tuple(range(2, input.dim())), eps), weight, bias
    )


class ReferenceNorms(TorchFunctionMode):
    """Layer, batch and instance norm from elementary operators, for the oracle.

    torch 2.13's double backward of ``F.layer_norm``, training-mode ``F.batch_norm`` and
    ``F.instance_norm`` is wrong (the mixed second derivative weight/input differs from
    input/weight: an asymmetric Hessian); these compositions have exact derivatives.
    Batch statistics never update running statistics here.
    """

    _impl = {
        F.layer_norm: _reference_layer_norm,
        F.batch_norm: _reference_batch_norm,
        F.instance_norm: _reference_instance_norm,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self._impl.get(func, func)(*args, **(kwargs or {}))


def dense_hessian(f: Callable[[Any], Tensor], params: Any) -> Tensor:
    """The dense ``(n, n)`` Hessian of ``f`` at ``params``, leaves flattened as :func:`ravel`.

    Computed by :func:`torch.func.hessian` of ``x -> f(unravel(x, params))``, under the
    math kernel of ``scaled_dot_product_attention`` (the only one with derivatives of
    every order) and :class:`ReferenceNorms`. ``params`` may be any pytree (a dict, a list).
    """
    like = optree.tree_map(lambda t: t.detach(), params)
    flat = ravel(like)
    with sdpa_kernel(SDPBackend.MATH), ReferenceNorms():
        return torch.func.hessian(lambda x: f(unravel(x, like)))(flat)


def hessian_of_closure(func: Callable[[], Tensor], params: list[Tensor]) -> Tensor:
    """Dense Hessian of a closure ``func()`` reading ``params`` (list order), by double backward.

    An oracle independent of ``torch.func``: one ``torch.autograd.grad`` of each gradient
    entry (tiny problems only). Tensors that ``func`` does not use get zero rows/columns.
    """
    flat_grads = []
    with torch.enable_grad():
        loss = func()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        g = torch.cat([gi.reshape(-1) for gi in grads])
        for i in range(g.numel()):
            if not g[i].requires_grad:
                flat_grads.append(torch.zeros_like(g))
                continue
            row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
            row = [
                torch.zeros_like(p) if r is None else r for p, r in zip(params, row, strict=True)
            ]
            flat_grads.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(flat_grads).detach()


# ---------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A pure scalar loss of a parameter pytree, and the point.

    Attributes:
        f: Pure function of a dict like ``params`` returning a 0-dim tensor.
        params: The point: a dict of float64 tensors (leaves not requiring grad).
        description: For hypothesis' failure reports.
        known_hessian: The Hessian in closed form (``ravel`` order), if known.
        model, loss_fn, inputs, targets: For MLP problems, the module API view.
    """

    f: Callable[[dict[str, Tensor]], Tensor]
    params: dict[str, Tensor]
    description: str
    known_hessian: Tensor | None = None
    model: nn.Module | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    inputs: Tensor | None = None
    targets: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Problem({self.description}, n={self.n})"

    @property
    def n(self) -> int:
        """Number of parameter entries."""
        return sum(p.numel() for p in self.params.values())

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    def hessian(self) -> Tensor:
        """The dense Hessian (``ravel`` order of the dict, i.e. optree's sorted keys)."""
        return dense_hessian(self.f, self.params)

    def list_f(self, values: list[Tensor]) -> Tensor:
        """``f`` as a function of a list of tensors in ``self.keys`` order."""
        return self.f(dict(zip(self.keys, values, strict=True)))

    def param_list(self) -> list[Tensor]:
        """The point as a list of tensors in ``self.keys`` order (detached copies)."""
        return [p.detach().clone() for p in self.params.values()]

    def list_hessian(self) -> Tensor:
        """The dense Hessian with the leaves in ``self.keys`` (insertion) order."""
        return dense_hessian(self.list_f, self.param_list())

    def closure(self) -> tuple[Callable[[], Tensor], list[Tensor]]:
        """The documented closure convention: fresh leaf tensors and ``func()`` reading them."""
        tensors = [p.detach().clone().requires_grad_(True) for p in self.params.values()]
        return (lambda: self.list_f(tensors)), tensors

    def random_vector(self, seed: int) -> list[Tensor]:
        """A random vector in list format (``self.keys`` order)."""
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in self.params.values()]


def _split_shapes(draw, n: int) -> list[tuple[int, ...]]:
    """Split ``n`` entries into 1-3 leaves, each a vector or a matrix."""
    num_leaves = draw(st.integers(1, min(3, n)))
    cuts = (
        sorted(
            draw(
                st.lists(
                    st.integers(1, n - 1),
                    min_size=num_leaves - 1,
                    max_size=num_leaves - 1,
                    unique=True,
                )
            )
        )
        if num_leaves > 1
        else []
    )
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    shapes = []
    for size in sizes:
        if size % 2 == 0 and draw(st.booleans()):
            shapes.append((2, size // 2))
        else:
            shapes.append((size,))
    return shapes


def _leaves_from_flat(x: Tensor, shapes: list[tuple[int, ...]]) -> dict[str, Tensor]:
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    return {
        f"x{i}": piece.reshape(s)
        for i, (piece, s) in enumerate(zip(torch.split(x, sizes), shapes, strict=True))
    }


def _concat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def random_symmetric(n: int, generator: torch.Generator) -> Tensor:
    """A random symmetric ``n x n`` float64 matrix with entries of order 1 (indefinite)."""
    B = torch.randn(n, n, generator=generator, dtype=DTYPE)
    return (B + B.T) / 2


@st.composite
def quadratic_problems(draw, min_n: int = 1, max_n: int = 8) -> Problem:
    r"""Draw :math:`\tfrac12 x^\top A x + b^\top x`, symmetric indefinite ``A``, ``x`` in leaves."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    shapes = _split_shapes(draw, n)
    g = torch.Generator().manual_seed(seed)
    A = random_symmetric(n, g)
    b = torch.randn(n, generator=g, dtype=DTYPE)
    x = torch.randn(n, generator=g, dtype=DTYPE)

    def f(p: dict[str, Tensor]) -> Tensor:
        z = _concat(p)
        return 0.5 * z @ A @ z + b @ z

    return Problem(
        f,
        _leaves_from_flat(x, shapes),
        f"quadratic n={n} seed={seed}",
        known_hessian=A,
        extra={"A": A, "b": b},
    )


@st.composite
def cubic_problems(draw, min_n: int = 1, max_n: int = 8) -> Problem:
    r"""Draw :math:`\tfrac12 x^\top A x + \sum_i c_i x_i^3 + (u^\top x)^3`.

    The Hessian depends on the point: third derivatives are nonzero.
    """
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    shapes = _split_shapes(draw, n)
    g = torch.Generator().manual_seed(seed)
    A = random_symmetric(n, g)
    c = torch.randn(n, generator=g, dtype=DTYPE)
    u = torch.randn(n, generator=g, dtype=DTYPE) / 2
    x = torch.randn(n, generator=g, dtype=DTYPE)

    def f(p: dict[str, Tensor]) -> Tensor:
        z = _concat(p)
        return 0.5 * z @ A @ z + (c * z**3).sum() + (u @ z) ** 3

    H = A + torch.diag(6 * c * x) + 6 * (u @ x) * torch.outer(u, u)
    return Problem(
        f,
        _leaves_from_flat(x, shapes),
        f"cubic n={n} seed={seed}",
        known_hessian=H,
        extra={"A": A, "c": c, "u": u},
    )


@st.composite
def diagonal_problems(draw, min_n: int = 1, max_n: int = 8) -> Problem:
    r"""Draw a separable :math:`\sum_i a_i x_i^2/2 + c_i x_i^3 + d_i \tanh(x_i)`.

    Its Hessian is diagonal and indefinite.
    """
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    shapes = _split_shapes(draw, n)
    g = torch.Generator().manual_seed(seed)
    a, c, d, x = (torch.randn(n, generator=g, dtype=DTYPE) for _ in range(4))

    def f(p: dict[str, Tensor]) -> Tensor:
        z = _concat(p)
        return (a * z**2 / 2 + c * z**3 + d * torch.tanh(z)).sum()

    t = torch.tanh(x)
    diag = a + 6 * c * x + d * (-2 * t * (1 - t**2))
    return Problem(
        f,
        _leaves_from_flat(x, shapes),
        f"separable n={n} seed={seed}",
        known_hessian=torch.diag(diag),
    )


def make_mlp(widths: list[int], activation: str, seed: int, bias: bool = True) -> nn.Sequential:
    """A float64 ``nn.Sequential`` MLP, Linear layers of ``widths``, ``activation`` between.

    Weights are standard normal over ``sqrt(fan_in)`` times 1.5 (curvature of order 1
    in the activations), biases standard normal over 2.
    """
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layer = nn.Linear(a, b, bias=bias).to(DTYPE)
        with torch.no_grad():
            layer.weight.copy_(1.5 * torch.randn(b, a, generator=g, dtype=DTYPE) / a**0.5)
            if bias:
                layer.bias.copy_(torch.randn(b, generator=g, dtype=DTYPE) / 2)
        layers.append(layer)
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@st.composite
def mlp_problems(
    draw,
    activations: tuple[str, ...] = tuple(ACTIVATIONS),
    losses: tuple[str, ...] = tuple(LOSSES),
    max_width: int = 3,
    max_hidden_layers: int = 2,
    max_batch: int = 4,
) -> Problem:
    """Draw a small MLP, a batch of data and a loss (float64)."""
    activation = draw(st.sampled_from(activations))
    loss_name = draw(st.sampled_from(losses))
    loss_fn, target_kind = LOSSES[loss_name]
    hidden = draw(st.lists(st.integers(1, max_width), min_size=1, max_size=max_hidden_layers))
    d_in = draw(st.integers(1, max_width))
    d_out = draw(st.integers(2 if target_kind == "class" else 1, max_width))
    batch = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**31 - 1))
    model = make_mlp([d_in, *hidden, d_out], activation, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, d_in, generator=g, dtype=DTYPE)
    if target_kind == "class":
        y = torch.randint(0, d_out, (batch,), generator=g)
    else:
        y = torch.randn(batch, d_out, generator=g, dtype=DTYPE)

    def f(p: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    description = f"mlp {[d_in, *hidden, d_out]} {activation} {loss_name} batch={batch} seed={seed}"
    return Problem(f, params, description, model=model, loss_fn=loss_fn, inputs=x, targets=y)


def smooth_problems(max_n: int = 8) -> st.SearchStrategy[Problem]:
    """MLPs, quadratics and cubics."""
    return st.one_of(mlp_problems(), quadratic_problems(max_n=max_n), cubic_problems(max_n=max_n))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _two_threads():
    """Tests run as CI does: two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def seeded_tanh_mlp_problem(seed: int, batch: int, d_in: int, hidden: int, d_out: int, kind: str):
    """A float64 tanh MLP with N(0, 1) weights and data from one seed; ``kind`` "ce" or "mse"."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    model = model.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(batch, d_in, generator=g, dtype=torch.float64)
    if kind == "ce":
        y = torch.randint(0, d_out, (batch,), generator=g)
    else:
        y = torch.randn(batch, d_out, generator=g, dtype=torch.float64)
    return model, x, y
