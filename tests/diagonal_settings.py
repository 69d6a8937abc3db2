"""Problems for the exact Hessian and GGN diagonals: BackPACK's and curvlinops' test settings.

Ported (rebuilt from their descriptions, no code copied) from

* BackPACK's second-order test settings (``test/extensions/secondorder/``:
  ``secondorder_settings.py``, the extra settings of ``diag_hessian/diagh_settings.py``,
  ``diag_ggn/diag_ggn_settings.py`` and the batch-size-1 settings of
  ``hbp/kfac_settings.py``): activations, 1d/2d/3d max/average/adaptive pooling,
  1d/2d/3d convolutions (grouped, transposed, padding, dilation, stride), padding and
  slicing modules, linear layers on extra dimensions, multi-dimensional
  cross-entropy, ``BCEWithLogitsLoss``, MSE, sum and mean reductions, recurrent
  layers, batch norm in eval mode, embeddings, branches and its two ResNets;
* curvlinops' test cases (``test/cases.py``, ``test/kfac_cases.py`` and the models of
  ``test/utils.py``): MLPs with every loss, dict inputs, weight sharing over a
  sequence or spatial dimension, its LeNet-like CNN, dropout, batch norm (training and
  eval mode), tied weights, a U-Net-like model with upsampling;
* and a few settings the issue asks for that neither has (``padding="same"``,
  reflect padding, residual blocks with norms).

Every problem is float64, small (at most about 2,000 parameters, batch at most 8),
built from one seed, so that the dense Hessian is quick.  A :class:`Setting` holds
its name, where it comes from, a builder returning :class:`Built` ``(model,
loss_fn, inputs, targets)``, which BackPACK extensions its source runs it with (for
the benchmark), and the routes expected of the fast diagonal once the engine of
issue 8 is done, as data (:meth:`Setting.expected_route`):

* ``"fast"``: any route but the one-hot sweep (the issue demands it);
* ``"any"``: the issue does not demand the fast route there (the reason is kept in
  ``Setting.not_fast``): parameters upstream of training-mode batch norm (the batch
  couples the samples), tied weights (one parameter read by two calls), recurrent
  layers, parameters upstream of softmax attention in a tiny problem (blocks per
  sample or the sweep, whichever the engine measures cheaper).

:func:`route_matches` checks a route of :func:`torch_secorder.func.diagonal_plan`
against the expectation; :func:`ours_plan` gives the plan of a built setting (w.r.t.
its trainable parameters, the names of ``model.named_parameters()``).  The settings
drawn by :func:`conv_settings` and :func:`pool_settings` expect ``"fast"`` everywhere.

Only parameters with ``requires_grad`` are differentiated (BackPACK freezes the last
linear layer of its automated settings); :func:`trainable` gives them.

The oracles (:func:`dense_hessian_diagonal`, :func:`dense_ggn_diagonal`) are the
dense float64 matrices: ``torch.func.hessian`` of the loss (tests/conftest.py's
``dense_hessian``, norms by their definition), and :math:`J^\\top H_{out} J` with
``J`` from ``torch.func.jacrev``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from conftest import dense_hessian
from hypothesis import assume
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

__all__ = [
    "ALL_SETTINGS",
    "BACKPACK_SETTINGS",
    "CURVLINOPS_SETTINGS",
    "Built",
    "Setting",
    "conv_settings",
    "dense_ggn_diagonal",
    "dense_hessian_diagonal",
    "loss_of_params",
    "ours_ggn_diagonal",
    "ours_hessian_diagonal",
    "ours_plan",
    "pool_settings",
    "route_matches",
    "trainable",
]

DT = torch.float64
BOTH = ("DiagHessian", "DiagGGNExact")


class Built(NamedTuple):
    """``(model, loss_fn, inputs, targets)``: the loss is ``loss_fn(model(inputs), targets)``."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: Any
    targets: Tensor


@dataclass(frozen=True)
class Setting:
    """One problem: a name, its source, a builder, BackPACK's extensions, expected routes.

    Attributes:
        name: Unique id (the pytest id).
        source: Where it comes from, e.g. ``"backpack/secondorder_settings"``.
        build: Returns a fresh :class:`Built` (same numbers every call).
        backpack: The BackPACK extensions its source runs it with (``"DiagHessian"``,
            ``"DiagGGNExact"``); empty for settings that are not BackPACK's.
        not_fast: Regular expression on a parameter name -> why the fast route is not
            demanded there (:meth:`expected_route` is then ``"any"``).
    """

    name: str
    source: str
    build: Callable[[], Built]
    backpack: tuple[str, ...] = ()
    not_fast: Mapping[str, str] = field(default_factory=dict)

    def expected_route(self, param_name: str) -> str:
        """``"fast"`` (not the sweep) or ``"any"`` for the parameter ``param_name``."""
        return "any" if any(re.search(p, param_name) for p in self.not_fast) else "fast"

    def __repr__(self) -> str:
        return f"Setting({self.name})"


def route_matches(expected: str, route: str) -> bool:
    """Whether a route of :func:`torch_secorder.func.diagonal_plan` meets ``expected``."""
    if expected == "any":
        return True
    if expected == "fast":
        return route != "sweep"
    raise ValueError(f"expected must be 'fast' or 'any', got {expected!r}")


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, detached (name -> tensor)."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


# ------------------------------------------------------------------------------ oracles


def _call(model: nn.Module, params: dict[str, Tensor], x: Any) -> Any:
    """``model(x)`` with ``params``, on copies of the buffers made inside the call (a pure
    function: training-mode batch norm updates the copies, not the model)."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


def _restoring_buffers(model: nn.Module, fn: Callable[[], Any]) -> Any:
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        return fn()
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)


def dense_hessian_diagonal(built: Built) -> dict[str, Tensor]:
    """``diag`` of the dense float64 Hessian w.r.t. :func:`trainable`, shaped like it."""
    model, loss_fn, x, y = built
    params = trainable(model)

    def f(p: dict[str, Tensor]) -> Tensor:
        return loss_fn(_call(model, p, x), y)

    H = _restoring_buffers(model, lambda: dense_hessian(f, params))
    names = sorted(params)  # dense_hessian ravels a dict in optree order: sorted keys
    pieces = dict(zip(names, torch.split(torch.diagonal(H), [params[k].numel() for k in names])))
    return {k: pieces[k].reshape(params[k].shape) for k in params}


def dense_ggn_diagonal(built: Built) -> dict[str, Tensor]:
    r"""``diag`` of :math:`J^\top H_{out} J` in float64, ``J`` by ``jacrev``; shaped like params."""
    model, loss_fn, x, y = built
    params = trainable(model)
    names = list(params)
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def output_of(theta: Tensor) -> Tensor:
        p = {k: c.view_as(params[k]) for k, c in zip(names, torch.split(theta, sizes), strict=True)}
        return _call(model, p, x)

    def compute() -> Tensor:
        out = output_of(flat).detach()
        J = jacrev(output_of)(flat).reshape(out.numel(), -1)
        H = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
        return torch.einsum("oi,op,pi->i", J, H, J)

    diag = _restoring_buffers(model, compute)
    return {
        k: d.reshape(params[k].shape) for k, d in zip(names, torch.split(diag, sizes), strict=True)
    }


# --------------------------------------------------------------------------------- ours


def loss_of_params(built: Built) -> Callable[[dict[str, Tensor]], Tensor]:
    """``p -> loss_fn(functional_call(model, p, inputs), targets)`` (``p``: :func:`trainable`)."""
    model, loss_fn, x, y = built
    return lambda p: loss_fn(_call(model, p, x), y)


def ours_hessian_diagonal(built: Built, **kwargs: Any) -> dict[str, Tensor]:
    """:func:`torch_secorder.func.fast_hessian_diagonal` of the loss w.r.t. :func:`trainable`."""
    from torch_secorder.func import fast_hessian_diagonal

    params = trainable(built.model)
    return _restoring_buffers(
        built.model, lambda: fast_hessian_diagonal(loss_of_params(built), params, **kwargs)
    )


def ours_ggn_diagonal(built: Built, **kwargs: Any) -> dict[str, Tensor]:
    """:func:`torch_secorder.func.ggn_diagonal` w.r.t. :func:`trainable`."""
    from torch_secorder.func import ggn_diagonal

    model, loss_fn, x, y = built
    params = trainable(model)
    return _restoring_buffers(
        model,
        lambda: ggn_diagonal(
            lambda p: _call(model, p, x), lambda o: loss_fn(o, y), params, **kwargs
        ),
    )


def ours_plan(built: Built) -> dict[str, str]:
    """:func:`torch_secorder.func.diagonal_plan` of the loss w.r.t. :func:`trainable`."""
    from torch_secorder.func import diagonal_plan

    return _restoring_buffers(
        built.model, lambda: diagonal_plan(loss_of_params(built), trainable(built.model))
    )


# ------------------------------------------------------------------------ small modules


class Pad(nn.Module):
    """``F.pad(x, pad, mode, value)`` as a module."""

    def __init__(self, pad: tuple[int, ...], mode: str = "constant", value: float = 0.0):
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "constant":
            return F.pad(x, self.pad, mode="constant", value=self.value)
        return F.pad(x, self.pad, mode=self.mode)


class Slicing(nn.Module):
    """``x[index]`` as a module."""

    def __init__(self, index: tuple[Any, ...]):
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x[self.index]


class Parallel(nn.Module):
    """The sum of its branches applied to the same input (a residual connection with Identity)."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class Scale(nn.Module):
    """``x * weight`` for a constant float."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class First(nn.Module):
    """The first element of a tuple output (of a recurrent layer)."""

    def forward(self, out: tuple[Tensor, ...]) -> Tensor:
        return out[0]


class FixedMask(nn.Module):
    """Dropout with one fixed mask (drawn at construction): ``x * mask / (1 - p)``."""

    def __init__(self, shape: tuple[int, ...], p: float = 0.5):
        super().__init__()
        self.register_buffer("mask", (torch.rand(shape) > p).to(DT) / (1 - p))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


# ------------------------------------------------------------------------------ helpers


def _ce(reduction: str = "mean") -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction)


def _mse(reduction: str = "mean") -> nn.Module:
    return nn.MSELoss(reduction=reduction)


def _bce(reduction: str = "mean") -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction=reduction)


def _classes(shape: tuple[int, ...], c: int) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, c, shape)


def _real(shape: tuple[int, ...]) -> Callable[[], Tensor]:
    return lambda: torch.randn(shape, dtype=DT)


def _unit(shape: tuple[int, ...]) -> Callable[[], Tensor]:
    return lambda: torch.rand(shape, dtype=DT)


def _builder(
    make_model: Callable[[], nn.Module],
    make_inputs: Callable[[], Any],
    make_loss: Callable[[], nn.Module],
    make_targets: Callable[[], Tensor],
    seed: int,
    train: bool = False,
) -> Callable[[], Built]:
    """A builder: model, inputs, targets drawn under ``seed`` (global RNG left as it was)."""

    def build() -> Built:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model().to(DT).train(train)
            x = make_inputs()
            y = make_targets()
        return Built(model, make_loss(), x, y)

    return build


def _frozen(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def _flat_size(body: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        out = body.to(DT)(torch.zeros(shape, dtype=DT))
    return out[0].numel()


def _head(
    body: list[nn.Module], shape: tuple[int, ...], classes: int = 5, frozen: bool = True
) -> nn.Module:
    """``body``, flatten, a linear layer to ``classes``, frozen as in BackPACK's automated CNNs."""
    width = _flat_size(nn.Sequential(*body), shape)
    head = nn.Linear(width, classes)
    return nn.Sequential(*body, nn.Flatten(), _frozen(head) if frozen else head)


def _init_norm(norm: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters (as BackPACK's eval-mode settings)."""
    with torch.no_grad():
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.uniform_(0, 1)
            norm.running_var.uniform_(0.2, 1.2)
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0, 1)
            norm.bias.uniform_(0, 1)
    return norm


_counter = iter(range(10**6))


def _setting(
    name: str,
    source: str,
    model: Callable[[], nn.Module],
    x_shape: tuple[int, ...] | Callable[[], Any],
    loss: Callable[[], nn.Module],
    targets: Callable[[], Tensor],
    backpack: tuple[str, ...] = (),
    train: bool = False,
    not_fast: Mapping[str, str] | None = None,
    seed: int | None = None,
) -> Setting:
    inputs = x_shape if callable(x_shape) else _unit(x_shape)
    seed = next(_counter) if seed is None else seed
    return Setting(
        name,
        source,
        _builder(model, inputs, loss, targets, seed, train),
        backpack,
        dict(not_fast or {}),
    )


# ------------------------------------------------------------------------------ BackPACK

_SO = "backpack/secondorder_settings"
_DH = "backpack/diagh_settings"
_DG = "backpack/diag_ggn_settings"
_KF = "backpack/kfac_settings"


def _act_setting(act: type[nn.Module], bias: bool) -> Setting:
    shape = (3, 3, 7, 7)
    return _setting(
        f"act-{act.__name__}-{'bias' if bias else 'nobias'}",
        _SO,
        lambda: _head([nn.Conv2d(3, 2, 2, bias=bias), act()], shape),
        shape,
        _ce,
        _classes((3,), 5),
        BOTH,
    )


def _pool_setting(
    shape: tuple[int, ...], pool: type[nn.Module], args: tuple[Any, ...], source: str = _SO
) -> Setting:
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)]
    backpack = BOTH if source == _SO else ("DiagHessian",)
    return _setting(
        f"pool-{pool.__name__}-{'x'.join(map(str, shape[2:]))}-{args}",
        source,
        lambda: _head([conv(3, 2, 2), nn.ReLU(), pool(*args)], shape),
        shape,
        lambda: _ce("sum"),
        _classes((3,), 5),
        backpack,
    )


def _conv_setting(
    shape: tuple[int, ...], conv: type[nn.Module], args: tuple[Any, ...], tag: str = ""
) -> Setting:
    return _setting(
        f"conv-{conv.__name__}{tag}-{'x'.join(map(str, shape[1:]))}-{args}",
        _SO,
        lambda: _head([conv(*args), nn.ReLU()], shape),
        shape,
        lambda: _ce("sum"),
        _classes((3,), 5),
        BOTH,
    )


def _backpack_settings() -> list[Setting]:  # noqa: PLR0915 - one list, in BackPACK's order
    out = [
        _setting(
            "example-linear",
            _SO,
            lambda: nn.Sequential(nn.Linear(10, 5)),
            (3, 10),
            _ce,
            _classes((3,), 5),
            BOTH,
        ),
        _setting(
            "linear-linear-ce-mean",
            _SO,
            lambda: nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 5)),
            (3, 10),
            _ce,
            _classes((3,), 5),
            BOTH,
        ),
        _setting(
            "linear-relu-linear-ce-sum",
            _SO,
            lambda: nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5)),
            (3, 10),
            lambda: _ce("sum"),
            _classes((3,), 5),
            BOTH,
        ),
        _setting(
            "linear-sigmoid-linear-mse-mean",
            _SO,
            lambda: nn.Sequential(nn.Linear(10, 7), nn.Sigmoid(), nn.Linear(7, 5)),
            (3, 10),
            _mse,
            _real((3, 5)),
            BOTH,
        ),
    ]
    acts = [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.LogSigmoid, nn.ELU, nn.SELU]
    out += [_act_setting(act, bias) for act in acts for bias in (True, False)]
    # pooling (diagh_settings repeats the LogSigmoid activation settings: not repeated here)
    for pool, extra in (
        (nn.MaxPool1d, [(2, 1), (2, 1, 0, 2), (2, 1, 0, 2, False, True)]),
        (nn.AvgPool1d, [(2, 1), (2, 1, 0, True), (2, 1, 0, False)]),
    ):
        dims = {"1d": 1, "2d": 2, "3d": 3}
        for suffix, d in dims.items():
            cls = getattr(nn, pool.__name__[:-2] + suffix)
            for i, args in enumerate(extra):
                shape = (3, 3, *([11 if d == 2 and i == 0 else 7] * d))
                out.append(_pool_setting(shape, cls, args))
    # convolutions (BackPACK's hyperparameters, in its order)
    C1, C2, C3 = nn.Conv1d, nn.Conv2d, nn.Conv3d
    T1, T2, T3 = nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
    convs = [
        ((3, 3, 7), C1, (3, 2, 2)),
        ((3, 2, 7), C1, (2, 3, 2, 2, 0, 2)),
        ((3, 3, 7), C1, (3, 2, 2, 2, 1)),
        ((3, 3, 8), C1, (3, 6, 2, 4, 2, 3)),
        ((3, 3, 7), C1, (3, 2, 2, 4, 2, 1, 1, False)),
        ((3, 3, 7, 7), C2, (3, 2, 2)),
        ((3, 2, 7, 7), C2, (2, 3, 2, 2, 0, 2)),
        ((3, 3, 7, 7), C2, (3, 2, 2, 2, 1)),
        ((3, 3, 8, 8), C2, (3, 6, 2, 4, 2, 3)),
        ((3, 3, 7, 7), C2, (3, 2, 2, 4, 2, 1, 1, False)),
        ((3, 3, 2, 7, 7), C3, (3, 2, 2)),
        ((3, 2, 3, 7, 7), C3, (2, 3, 2, 2, 0, 2)),
        ((3, 3, 2, 7, 7), C3, (3, 2, 2, 3, 2)),
        ((3, 3, 4, 8, 8), C3, (3, 6, 2, 4, 2, 3)),
        ((3, 3, 2, 7, 7), C3, (3, 2, 2, 4, 2, 1, 1, False)),
        ((3, 3, 7), T1, (3, 2, 2)),
        ((3, 2, 7), T1, (2, 3, 2, 2, 0, 0, 1, True, 2)),
        ((3, 3, 7), T1, (3, 2, 2, 2, 1)),
        ((3, 3, 8), T1, (3, 6, 2, 4, 2, 0, 1, True, 3)),
        ((3, 3, 7), T1, (3, 2, 2, 4, 2, 0, 1, False)),
        ((3, 3, 7, 7), T2, (3, 2, 2)),
        ((3, 2, 9, 9), T2, (2, 4, 2, 1, 0, 0, 1, True, 2)),
        ((3, 3, 7, 7), T2, (3, 2, 2, 2, 1)),
        ((3, 3, 7, 7), T2, (3, 2, 2, 4, 2, 0, 1, False)),
        ((3, 3, 2, 7, 7), T3, (3, 2, 2)),
        ((3, 2, 3, 5, 5), T3, (2, 3, 2, 2, 2, 0, 1, True, 2)),
        ((3, 3, 2, 7, 7), T3, (3, 2, 2, 4, 2, 0, 1, False)),
    ]
    out += [_conv_setting(*c) for c in convs]
    groups = [
        ((3, 6, 7), C1, (6, 4, 2, 1, 0, 1, 2)),
        ((3, 6, 7, 5), C2, (6, 3, 2, 1, 0, 1, 3)),
        ((3, 4, 7, 5, 6), C3, (4, 2, 2, 1, 0, 2, 2)),
        ((3, 6, 8), T1, (6, 3, 2, 4, 2, 0, 3, True, 3)),
        ((3, 4, 9, 9), T2, (4, 2, 2, 1, 0, 0, 2, True, 2)),
        ((3, 4, 3, 5, 5), T3, (4, 2, (2, 2, 1), 2, 2, 0, 2, True, 2)),
    ]
    out += [_conv_setting(*g, tag="-grouped") for g in groups]
    # linear layers on extra dimensions; multi-dimensional cross-entropy
    extra = [
        ("one", (3, 4, 5), False, _mse, (3, 8), "real"),
        ("two", (3, 4, 2, 5), True, _mse, (3, 16), "real"),
        ("three", (3, 4, 2, 3, 5), False, lambda: _mse("sum"), (3, 48), "real"),
        ("one", (3, 4, 5), False, _ce, 8, "class"),
        ("two", (3, 4, 2, 5), True, _ce, 16, "class"),
        ("three", (3, 4, 2, 3, 5), "relu", lambda: _ce("sum"), 48, "class"),
    ]
    for tag, shape, act, loss, target, kind in extra:
        mid = [nn.Sigmoid()] if act is True else [nn.ReLU()] if act == "relu" else []

        def model(mid=mid):
            return nn.Sequential(nn.Linear(5, 3), *mid, nn.Linear(3, 2), nn.Flatten())

        out.append(
            _setting(
                f"linear-{tag}-additional-{kind}",
                _SO,
                model,
                shape,
                loss,
                _real(target) if kind == "real" else _classes((3,), target),
                BOTH,
            )
        )
    out.append(
        _setting(
            "multi-d-cross-entropy",
            _SO,
            lambda: nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)),
            (3, 4, 2, 3, 5),
            lambda: _ce("sum"),
            _classes((3, 2, 3, 2), 4),
            BOTH,
        )
    )
    # padding and slicing modules
    out += [
        _setting(
            "pad-constant-0",
            _SO,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 2),
                Pad((1, 1, 0, 2)),
                nn.Conv2d(2, 2, 3, stride=2),
                nn.Flatten(),
                nn.Linear(8, 2),
            ),
            (5, 3, 4, 4),
            _mse,
            _real((5, 2)),
            BOTH,
        ),
        _setting(
            "pad-constant-1-channels",
            _SO,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 3, padding=1),
                nn.ReLU(),
                Pad((1, 1, 2, 0, 1, 2), value=1.0),
                nn.Conv2d(5, 2, 3, stride=2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(8, 3),
            ),
            (5, 3, 4, 4),
            _ce,
            _classes((5,), 3),
            BOTH,
        ),
        _setting(
            "slicing-strided",
            _SO,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 2, padding=1),
                Slicing((slice(None), 0, slice(None, None, 2), slice(0, 2))),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(6, 4),
            ),
            (3, 3, 4, 5),
            _ce,
            _classes((3,), 4),
            BOTH,
        ),
        _setting(
            "slicing-twice",
            _SO,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 2, padding=1),
                Slicing((slice(None), slice(None), 2)),
                nn.ReLU(),
                Slicing((slice(None), 1)),
                nn.Linear(6, 4),
            ),
            (3, 3, 4, 5),
            _mse,
            _real((3, 4)),
            BOTH,
        ),
        _setting(
            "bce-soft-labels-mean",
            _SO,
            lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)),
            (3, 6),
            _bce,
            _unit((3, 1)),
            BOTH,
        ),
        _setting(
            "bce-binary-labels-sum",
            _SO,
            lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)),
            (3, 6),
            lambda: _bce("sum"),
            lambda: torch.randint(0, 2, (3, 1)).to(DT),
            BOTH,
        ),
    ]
    # diagh_settings: adaptive average pooling after a convolution
    out += [
        _pool_setting((3, 3, 7), nn.AdaptiveAvgPool1d, (2,), _DH),
        _pool_setting((3, 3, 11, 11), nn.AdaptiveAvgPool2d, (2,), _DH),
        _pool_setting((3, 3, 7, 7, 7), nn.AdaptiveAvgPool3d, (2,), _DH),
    ]
    out += _diag_ggn_settings()
    out += _kfac_batch_one_settings()
    return out


_RECURRENT = {r"^0\.": "a recurrent layer (not in issue 8)"}


def _diag_ggn_settings() -> list[Setting]:
    G = ("DiagGGNExact",)
    out = [
        _setting(
            "rnn-permute-flatten",
            _DG,
            lambda: nn.Sequential(
                nn.RNN(6, 3, batch_first=True), First(), Permute(0, 2, 1), nn.Flatten()
            ),
            (8, 5, 6),
            _mse,
            _real((8, 15)),
            G,
            not_fast=_RECURRENT,
        ),
        _setting(
            "lstm-flatten",
            _DG,
            lambda: nn.Sequential(nn.LSTM(5, 4, batch_first=True), First(), nn.Flatten()),
            (4, 3, 5),
            _ce,
            _classes((4,), 12),
            G,
            not_fast=_RECURRENT,
        ),
        _setting(
            "rnn-linear-permute-ce",
            _DG,
            lambda: nn.Sequential(
                nn.RNN(6, 3, batch_first=True), First(), nn.Linear(3, 3), Permute(0, 2, 1)
            ),
            (8, 5, 6),
            _ce,
            _classes((8, 5), 3),
            G,
            not_fast=_RECURRENT,
        ),
        _setting(
            "linear-adaptive-avg-pool-1d",
            _DG,
            lambda: nn.Sequential(nn.Linear(9, 9), nn.AdaptiveAvgPool1d((3,)), nn.Flatten()),
            (2, 2, 9),
            _mse,
            _real((2, 6)),
            G,
        ),
        _setting(
            "linear-adaptive-avg-pool-2d",
            _DG,
            lambda: nn.Sequential(nn.Linear(8, 8), nn.AdaptiveAvgPool2d((3, 4)), nn.Flatten()),
            (2, 2, 6, 8),
            _mse,
            _real((2, 24)),
            G,
        ),
        _setting(
            "linear-adaptive-avg-pool-3d",
            _DG,
            lambda: nn.Sequential(nn.Linear(4, 4), nn.AdaptiveAvgPool3d((3, 5, 2)), nn.Flatten()),
            (2, 2, 9, 5, 4),
            _mse,
            _real((2, 60)),
            G,
        ),
        _setting(
            "batchnorm1d-eval",
            _DG,
            lambda: nn.Sequential(_init_norm(nn.BatchNorm1d(3)), nn.Flatten()),
            (2, 3, 4),
            _mse,
            _real((2, 12)),
            G,
        ),
        _setting(
            "batchnorm2d-eval",
            _DG,
            lambda: nn.Sequential(_init_norm(nn.BatchNorm2d(2)), nn.Flatten()),
            (3, 2, 4, 3),
            _mse,
            _real((3, 24)),
            G,
        ),
        _setting(
            "batchnorm3d-eval",
            _DG,
            lambda: nn.Sequential(_init_norm(nn.BatchNorm3d(3)), nn.Flatten()),
            (3, 3, 4, 1, 2),
            _mse,
            _real((3, 24)),
            G,
        ),
        _setting(
            "batchnorm3d-eval-linear-relu",
            _DG,
            lambda: nn.Sequential(
                _init_norm(nn.BatchNorm3d(3)),
                nn.Linear(2, 3),
                _init_norm(nn.BatchNorm3d(3)),
                nn.ReLU(),
                _init_norm(nn.BatchNorm3d(3)),
                nn.Flatten(),
            ),
            (3, 3, 4, 1, 2),
            _mse,
            _real((3, 36)),
            G,
        ),
        _setting(
            "embedding-linear",
            _DG,
            lambda: nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)),
            lambda: torch.randint(0, 5, (6,)),
            _ce,
            _classes((6,), 4),
            G,
        ),
        _setting(
            "embedding-flatten",
            _DG,
            lambda: nn.Sequential(nn.Embedding(3, 2), nn.Flatten()),
            lambda: torch.randint(0, 3, (3, 2, 2)),
            _ce,
            _classes((3,), 4),
            G,
        ),
        _setting(
            "branching-linear",
            _DG,
            lambda: nn.Sequential(
                nn.Linear(10, 5),
                nn.ReLU(),
                Parallel(nn.Identity(), nn.Linear(5, 5)),
                nn.Sigmoid(),
                nn.Linear(5, 4),
            ),
            (3, 10),
            _ce,
            _classes((3,), 4),
            G,
        ),
        _setting(
            "branching-convolution",
            _DG,
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1),
                nn.ReLU(),
                Parallel(
                    nn.Identity(),
                    nn.Sequential(
                        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1)
                    ),
                ),
                nn.MaxPool2d(3, stride=2),
                nn.Flatten(),
                nn.Linear(12, 5),
            ),
            (4, 2, 6, 6),
            _ce,
            _classes((4,), 5),
            G,
        ),
        _setting(
            "nested-branching-convolution",
            _DG,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 3, padding=1),
                nn.ReLU(),
                Parallel(
                    nn.Identity(),
                    nn.Sequential(
                        nn.Conv2d(2, 4, 3, padding=1),
                        nn.Sigmoid(),
                        nn.Conv2d(4, 2, 3, padding=1),
                        Parallel(
                            nn.Identity(),
                            nn.Sequential(
                                nn.Conv2d(2, 4, 3, padding=1),
                                nn.ReLU(),
                                nn.Conv2d(4, 2, 3, padding=1),
                            ),
                        ),
                    ),
                ),
                nn.MaxPool2d(3, stride=2),
                nn.Flatten(),
                nn.Linear(8, 5),
            ),
            (4, 3, 6, 6),
            _ce,
            _classes((4,), 5),
            G,
        ),
        _setting(
            "resnet1-euler-step",
            _DG,
            EulerResNet,
            lambda: torch.tensor([[1.0, 2.0]], dtype=DT),
            _mse,
            lambda: torch.tensor([[1.0, 1.0]], dtype=DT),
            G,
        ),
        _setting(
            "resnet2-small-eval",
            _DG,
            lambda: SmallResNet(planes=1, depth=1, c_in=1),
            (2, 1, 7, 7),
            _mse,
            _real((2, 3)),
            G,
        ),
    ]
    return out


def _kfac_batch_one_settings() -> list[Setting]:
    """The batch-size-1 settings of BackPACK's KFAC/KFLR/KFRA tests (single outputs)."""
    return [
        _setting(
            "b1-linear-relu-linear-mse",
            _KF,
            lambda: nn.Sequential(nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 1)),
            (1, 7),
            _mse,
            _real((1, 1)),
            BOTH,
        ),
        _setting(
            "b1-linear-sigmoid-linear-ce",
            _KF,
            lambda: nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)),
            (1, 5),
            _ce,
            _classes((1,), 3),
            BOTH,
        ),
        _setting(
            "b1-conv2d-single-output",
            _KF,
            lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1), nn.Flatten()),
            (1, 2, 3, 3),
            _mse,
            _real((1, 1)),
            BOTH,
        ),
        _setting(
            "b1-conv3d-single-output",
            _KF,
            lambda: nn.Sequential(nn.Conv3d(2, 3, 3), nn.ReLU(), nn.Conv3d(3, 1, 1), nn.Flatten()),
            (1, 2, 3, 3, 3),
            _mse,
            _real((1, 1)),
            BOTH,
        ),
        _setting(
            "b1-convtranspose1d-single-output",
            _KF,
            lambda: nn.Sequential(
                nn.ConvTranspose1d(2, 4, 3, padding=5),
                nn.Sigmoid(),
                nn.ConvTranspose1d(4, 1, 1),
                nn.Flatten(),
            ),
            (1, 2, 9),
            _mse,
            _real((1, 1)),
            BOTH,
        ),
        _setting(
            "b1-convtranspose2d-single-output",
            _KF,
            lambda: nn.Sequential(
                nn.ConvTranspose2d(2, 3, 2, padding=2),
                nn.Sigmoid(),
                nn.ConvTranspose2d(3, 1, 1),
                nn.Flatten(),
            ),
            (1, 2, 4, 4),
            _mse,
            _real((1, 1)),
            BOTH,
        ),
        _setting(
            "b1-branching-scalar",
            _KF,
            lambda: nn.Sequential(
                nn.Linear(10, 5),
                nn.ReLU(),
                Parallel(Scale(3.0), nn.Linear(5, 5)),
                nn.Sigmoid(),
                nn.Linear(5, 4),
            ),
            (1, 10),
            _ce,
            _classes((1,), 4),
            ("DiagGGNExact",),
        ),
    ]


class EulerResNet(nn.Module):
    """BackPACK's ``ResNet1``: one Euler step ``x + 0.1 * mlp(x)`` of a tanh MLP 2-10-10-2."""

    def __init__(self, d: int = 2, width: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x) * 0.1


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn plus the (downsampled) input, relu."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _init_norm(nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _init_norm(nn.BatchNorm2d(c_out))
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _init_norm(nn.BatchNorm2d(c_out))
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """BackPACK's ``ResNet2`` (resnet18 made small: three stages of ``depth`` basic blocks,
    batch norm in eval mode) on ``(N, c_in, 7, 7)`` images.  The defaults are BackPACK's
    (n = 3,165 parameters); the tests take ``planes=1, depth=1, c_in=1`` (n = 404)."""

    def __init__(self, planes: int = 2, depth: int = 2, c_in: int = 3, classes: int = 3):
        super().__init__()
        p = planes
        self.conv1 = nn.Conv2d(c_in, p, 7, 2, 3, bias=False)
        self.bn1 = _init_norm(nn.BatchNorm2d(p))
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(p, p, 1, depth)
        self.layer2 = self._stage(p, 2 * p, 2, depth)
        self.layer3 = self._stage(2 * p, 4 * p, 2, depth)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * p, classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, stride: int, depth: int) -> nn.Sequential:
        rest = [BasicBlock(c_out, c_out) for _ in range(depth - 1)]
        return nn.Sequential(BasicBlock(c_in, c_out, stride), *rest)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------- curvlinops

_CC = "curvlinops/cases"
_CK = "curvlinops/kfac_cases"
_CU = "curvlinops/utils"
_TIED = {r"^linear\.weight$|^linear1\.weight$|^linear\.bias$": "tied weights (read twice)"}


class DictInput(nn.Module):
    """curvlinops' ``ModelWithDictInput``: ``Linear(10, 5), ReLU, Linear(5, c)`` on ``x["x"]``."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, classes))

    def forward(self, data: Mapping[str, Tensor]) -> Tensor:
        return self.net(data["x"])


class FunctionalMLP(nn.Module):
    """curvlinops' callable case: ``linear(relu(linear(x, W1, b1)), W2, b2)`` written with F."""

    def __init__(self, d_in: int = 10, hidden: int = 5, d_out: int = 3):
        super().__init__()
        self.W1 = nn.Parameter(torch.rand(hidden, d_in))
        self.b1 = nn.Parameter(torch.rand(hidden))
        self.W2 = nn.Parameter(torch.rand(d_out, hidden))
        self.b2 = nn.Parameter(torch.rand(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.W1, self.b1)), self.W2, self.b2)


class SharedOverPositions(nn.Module):
    """curvlinops' ``WeightShareModel``: a body on ``(N, ..., D)``, then per sample
    ``"expand"`` (keep the positions; class axis moved to dim 1 for cross-entropy),
    ``"expand-flatten"`` (flatten the positions) or ``"reduce"`` (mean over positions)."""

    def __init__(self, *body: nn.Module, setting: str = "expand", ce: bool = False):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.setting, self.ce = setting, ce

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        if self.setting == "reduce":
            return out.flatten(1, -2).mean(1)
        if self.setting == "expand-flatten":
            return out.flatten(1)
        return out.movedim(-1, 1) if self.ce else out


class SplitConcat(nn.Module):
    """One ``Linear(D, D)`` applied to both halves of the input, concatenated (tied weights)."""

    def __init__(self, d: int, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(d, d, bias=bias)
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.split(self.d, dim=-1)
        return torch.cat([self.linear(a), self.linear(b)], dim=-1)


class TiedSplitConcat(nn.Module):
    """Two linear layers sharing one weight, on the halves of the input, concatenated."""

    def __init__(self, d: int, bias1: bool = False, bias2: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d, d, bias=bias1)
        self.linear2 = nn.Linear(d, d, bias=bias2)
        self.linear2.weight = self.linear1.weight
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.split(self.d, dim=-1)
        return torch.cat([self.linear1(a), self.linear2(b)], dim=-1)


class UNetLike(nn.Module):
    """curvlinops' ``UnetModel``: strided conv, conv, nearest upsampling, conv; then the output
    as ``(N, H, W, C)`` (MSE/BCE) or ``(N, C, H, W)`` (cross-entropy)."""

    def __init__(self, ce: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1, stride=2),
            nn.Conv2d(2, 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2, 3, 3, padding=1),
        )
        self.ce = ce

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out if self.ce else out.permute(0, 2, 3, 1)


def lenet_curvlinops() -> nn.Module:
    """curvlinops' CNN case: conv 1->3 (5x5), relu, max-pool 2, conv 3->6 (5x5), relu,
    max-pool 2, flatten, linear 24->10, on 1x20x20 images (n = 784)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4, 10),
    )


def _mlp(d_in: int, hidden: int, d_out: int) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _curvlinops_settings() -> list[Setting]:  # noqa: PLR0915 - one list
    out = []
    for red in ("mean", "sum"):
        out.append(
            _setting(
                f"mlp-ce-{red}",
                _CC,
                _mlp(10, 5, 3),
                (7, 10),
                lambda r=red: _ce(r),
                _classes((7,), 3),
            )
        )
    out += [
        _setting("mlp-bce-1-mean", _CC, _mlp(10, 5, 1), (7, 10), _bce, _unit((7, 1))),
        _setting("mlp-bce-2-mean", _CC, _mlp(10, 5, 2), (7, 10), _bce, _unit((7, 2))),
        _setting("mlp-bce-2-sum", _CC, _mlp(10, 5, 2), (7, 10), lambda: _bce("sum"), _unit((7, 2))),
        _setting("mlp-mse-mean", _CC, _mlp(8, 5, 3), (8, 8), _mse, _real((8, 3))),
        _setting("mlp-mse-sum", _CC, _mlp(8, 5, 3), (8, 8), lambda: _mse("sum"), _real((8, 3))),
        _setting(
            "dict-input-ce",
            _CC,
            lambda: DictInput(3),
            lambda: {"x": torch.rand(7, 10, dtype=DT)},
            _ce,
            _classes((7,), 3),
        ),
        _setting(
            "dict-input-bce",
            _CC,
            lambda: DictInput(1),
            lambda: {"x": torch.rand(7, 10, dtype=DT)},
            _bce,
            _unit((7, 1)),
        ),
        _setting(
            "dict-input-mse",
            _CC,
            lambda: DictInput(2),
            lambda: {"x": torch.rand(7, 10, dtype=DT)},
            _mse,
            _real((7, 2)),
        ),
    ]
    for red in ("mean", "sum"):
        out.append(
            _setting(
                f"sequence-ce-{red}",
                _CC,
                lambda: SharedOverPositions(
                    nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3), setting="expand", ce=True
                ),
                (3, 5, 10),
                lambda r=red: _ce(r),
                _classes((3, 5), 3),
            )
        )
        out.append(
            _setting(
                f"sequence-bce-{red}",
                _CC,
                _mlp(10, 5, 2),
                (3, 5, 10),
                lambda r=red: _bce(r),
                _unit((3, 5, 2)),
            )
        )
        out.append(
            _setting(
                f"sequence-mse-{red}",
                _CC,
                _mlp(8, 5, 3),
                (2, 5, 8),
                lambda r=red: _mse(r),
                _real((2, 5, 3)),
            )
        )
    out += [
        _setting("functional-mlp", _CC, FunctionalMLP, (7, 10), _mse, _real((7, 3))),
        _setting("lenet-cnn", _CC, lenet_curvlinops, (5, 1, 20, 20), _ce, _classes((5,), 10)),
        _setting(
            "mlp-fixed-dropout-mask",
            _CC,
            lambda: nn.Sequential(nn.Linear(10, 5), FixedMask((6, 5)), nn.ReLU(), nn.Linear(5, 2)),
            (6, 10),
            _ce,
            _classes((6,), 2),
        ),
        _setting(
            "mlp-dropout-eval",
            _CC,
            lambda: nn.Sequential(nn.Linear(10, 5), nn.Dropout(), nn.ReLU(), nn.Linear(5, 2)),
            (6, 10),
            _ce,
            _classes((6,), 2),
        ),
        _setting(
            "mlp-batchnorm-train",
            _CC,
            lambda: nn.Sequential(
                nn.Linear(10, 5), _init_norm(nn.BatchNorm1d(5)), nn.ReLU(), nn.Linear(5, 2)
            ),
            (6, 10),
            _ce,
            _classes((6,), 2),
            train=True,
            not_fast={r"^0\.": "upstream of training-mode batch norm (the batch couples samples)"},
        ),
        _setting(
            "mlp-batchnorm-eval",
            _CC,
            lambda: nn.Sequential(
                nn.Linear(10, 5), _init_norm(nn.BatchNorm1d(5)), nn.ReLU(), nn.Linear(5, 2)
            ),
            (6, 10),
            _ce,
            _classes((6,), 2),
        ),
    ]
    # kfac_cases: deep linear networks, one datum, shared weights over two extra axes
    for red in ("mean", "sum"):
        out.append(
            _setting(
                f"linear-linear-mse-{red}",
                _CK,
                lambda: nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 1)),
                (7, 6),
                lambda r=red: _mse(r),
                _real((7, 1)),
            )
        )
        out.append(
            _setting(
                f"shared-4d-expand-mse-{red}",
                _CK,
                lambda: SharedOverPositions(nn.Linear(5, 4), nn.Linear(4, 3)),
                (2, 4, 3, 5),
                lambda r=red: _mse(r),
                _real((2, 4, 3, 3)),
            )
        )
    out += [
        _setting(
            "one-datum-linear-linear-ce",
            _CK,
            lambda: nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)),
            (1, 5),
            _ce,
            _classes((1,), 3),
        ),
        _setting(
            "one-datum-linear-linear-bce-sum",
            _CK,
            lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
            (1, 4),
            lambda: _bce("sum"),
            _unit((1, 2)),
        ),
        _setting(
            "shared-4d-reduce-mse",
            _CK,
            lambda: SharedOverPositions(nn.Linear(5, 4), nn.Linear(4, 3), setting="reduce"),
            (3, 4, 3, 5),
            _mse,
            _real((3, 3)),
        ),
        _setting(
            "conv-expand-mse",
            _CK,
            lambda: nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), Permute(0, 2, 3, 1)),
            (2, 3, 8, 8),
            _mse,
            _real((2, 9, 9, 2)),
        ),
        _setting(
            "conv-expand-flatten-mse",
            _CK,
            lambda: nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), Permute(0, 2, 3, 1), nn.Flatten()),
            (2, 3, 8, 8),
            lambda: _mse("sum"),
            _real((2, 162)),
        ),
        _setting(
            "conv-reduce-mse",
            _CK,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 4, padding=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
            (4, 3, 8, 8),
            _mse,
            _real((4, 2)),
        ),
        _setting("single-linear-mse", _CK, lambda: nn.Linear(5, 3), (7, 5), _mse, _real((7, 3))),
        # utils: tied weights and the U-Net-like model
        _setting(
            "split-concat-shared-linear",
            _CU,
            lambda: SplitConcat(3, bias=True),
            (5, 6),
            _mse,
            _real((5, 6)),
            not_fast=_TIED,
        ),
        _setting(
            "weight-tied-split-concat",
            _CU,
            lambda: TiedSplitConcat(3),
            (5, 6),
            _mse,
            _real((5, 6)),
            not_fast=_TIED,
        ),
        _setting(
            "unet-upsample-mse",
            _CU,
            UNetLike,
            (2, 3, 6, 6),
            _mse,
            _real((2, 6, 6, 3)),
        ),
        _setting(
            "unet-upsample-bce",
            _CU,
            UNetLike,
            (2, 3, 6, 6),
            _bce,
            _unit((2, 6, 6, 3)),
        ),
        _setting(
            "unet-upsample-ce",
            _CU,
            lambda: UNetLike(ce=True),
            (2, 3, 6, 6),
            _ce,
            _classes((2, 6, 6), 3),
        ),
    ]
    return out


# ------------------------------------------------------------------------- issue 8's own

_OWN = "issue 8"


class TanhResBlock(nn.Module):
    """``x + conv(tanh(norm(conv(x))))``, optionally with a norm (group/batch)."""

    def __init__(self, c: int, norm: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.Identity() if norm is None else _init_norm(norm(c))
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(torch.tanh(self.norm(self.conv1(x))))


def tanh_resnet(width: int = 2, blocks: int = 2, size: int = 6, classes: int = 3, norm=None):
    """conv 3->width, tanh, ``blocks`` residual tanh blocks, tanh, average pool 2, linear."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.Tanh(),
        *[TanhResBlock(width, norm) for _ in range(blocks)],
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * (size // 2) ** 2, classes),
    )


class TinyAttention(nn.Module):
    """Embedding, one pre-LN attention block (heads written out), GELU MLP, mean pool, head."""

    def __init__(self, vocab: int = 7, d: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)
        self.heads = heads

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx)
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def _own_settings() -> list[Setting]:
    return [
        _setting(
            "conv2d-padding-same-dilated",
            _OWN,
            lambda: _head(
                [nn.Conv2d(2, 3, 4, padding="same", dilation=2), nn.Tanh()], (3, 2, 6, 6), 5, False
            ),
            (3, 2, 6, 6),
            _ce,
            _classes((3,), 5),
        ),
        _setting(
            "conv1d-padding-same-reflect",
            _OWN,
            lambda: _head(
                [nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect"), nn.Sigmoid()],
                (3, 2, 7),
                frozen=False,
            ),
            (3, 2, 7),
            lambda: _mse("sum"),
            _real((3, 5)),
        ),
        _setting(
            "tanh-resnet-2-blocks",
            _OWN,
            tanh_resnet,
            (3, 3, 6, 6),
            _ce,
            _classes((3,), 3),
        ),
        _setting(
            "tanh-resnet-groupnorm",
            _OWN,
            lambda: tanh_resnet(norm=lambda c: nn.GroupNorm(1, c)),
            (3, 3, 6, 6),
            _mse,
            _real((3, 3)),
        ),
        _setting(
            "relu-cnn-cat-branches",
            _OWN,
            CatBranches,
            (3, 2, 5, 5),
            _ce,
            _classes((3,), 3),
        ),
        _setting(
            "mlp-rmsnorm-layernorm",
            _OWN,
            lambda: nn.Sequential(
                nn.Linear(4, 5),
                nn.RMSNorm(5),
                nn.Tanh(),
                nn.Linear(5, 4),
                nn.LayerNorm(4),
                nn.Linear(4, 3),
            ),
            (5, 4),
            _mse,
            _real((5, 3)),
        ),
        _setting(
            "attention-layernorm",
            _OWN,
            TinyAttention,
            lambda: torch.randint(0, 7, (3, 4)),
            _ce,
            _classes((3,), 3),
            not_fast={
                r"^(emb|ln1|qkv)\.": "upstream of softmax attention: the engine chooses "
                "per-sample blocks or the sweep by cost (issue 8)"
            },
        ),
    ]


class CatBranches(nn.Module):
    """Two convolution branches (max- and average-pooled), concatenated, then a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = F.max_pool2d(F.relu(self.a(x)), 2)
        b = F.adaptive_avg_pool2d(F.relu(self.b(x)), 2)
        return self.head(torch.cat([a, b], dim=1).flatten(1))


# --------------------------------------------------------------------- drawn by hypothesis


def _buildable(setting: Setting) -> Setting:
    """Reject (``hypothesis.assume``) a drawn setting whose layers give an empty output."""
    try:
        setting.build()
    except RuntimeError as exc:
        assume(False)
        raise AssertionError("unreachable") from exc
    return setting


@st.composite
def conv_settings(draw) -> Setting:
    """A convolution (1d/2d/3d, maybe transposed, grouped, strided, dilated, padded incl.
    ``"same"``) then an activation, flatten and a trainable linear layer; CE or MSE."""
    dim = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    same = not transposed and draw(st.booleans())
    stride = 1 if same else draw(st.integers(1, 2))
    padding: Any = "same" if same else draw(st.integers(0, kernel - 1 if kernel > 1 else 0))
    bias = draw(st.booleans())
    act = draw(st.sampled_from([nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity]))
    size = draw(st.integers(3 if dim < 3 else 2, 6 if dim == 1 else 4))
    batch = draw(st.integers(1, 3))
    loss = draw(st.sampled_from(["ce", "mse"]))
    seed = draw(st.integers(0, 2**16))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    name = "ConvTranspose" if transposed else "Conv"
    cls = getattr(nn, f"{name}{dim}d")
    shape = (batch, c_in, *([size] * dim))

    def model():
        return _head([cls(c_in, c_out, kernel, **kwargs), act()], shape, classes=3)

    def model_trainable():
        m = model()
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    targets = _classes((batch,), 3) if loss == "ce" else _real((batch, 3))
    return _buildable(
        _setting(
            f"drawn-{cls.__name__}-{kwargs}-{act.__name__}-{shape}-{loss}",
            "drawn",
            model_trainable,
            shape,
            _ce if loss == "ce" else _mse,
            targets,
            seed=seed,
        )
    )


@st.composite
def pool_settings(draw) -> Setting:
    """A convolution, relu/tanh, a max/average/adaptive-average pooling (1d/2d/3d, drawn
    kernel, stride, padding, ceil mode), flatten, linear; CE with sum or mean."""
    dim = draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["max", "avg", "adaptive"]))
    act = draw(st.sampled_from([nn.ReLU, nn.Tanh]))
    size = draw(st.integers(4, 7 if dim < 3 else 5))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    conv = getattr(nn, f"Conv{dim}d")
    if kind == "adaptive":
        args: tuple[Any, ...] = (draw(st.integers(1, 3)),)
        pool = getattr(nn, f"AdaptiveAvgPool{dim}d")
    else:
        kernel = draw(st.integers(2, 3))
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, kernel // 2))
        ceil = draw(st.booleans())
        pool = getattr(nn, f"{'Max' if kind == 'max' else 'Avg'}Pool{dim}d")
        if kind == "max":
            dilation = draw(st.integers(1, 2))
            args = (kernel, stride, padding, dilation, False, ceil)
        else:
            args = (kernel, stride, padding, ceil, draw(st.booleans()))
    shape = (batch, 2, *([size] * dim))

    def model():
        m = _head([conv(2, 2, 2), act(), pool(*args)], shape, classes=3)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    return _buildable(
        _setting(
            f"drawn-{pool.__name__}{args}-{act.__name__}-{shape}-{reduction}",
            "drawn",
            model,
            shape,
            lambda: _ce(reduction),
            _classes((batch,), 3),
            seed=seed,
        )
    )


BACKPACK_SETTINGS: list[Setting] = _backpack_settings()
CURVLINOPS_SETTINGS: list[Setting] = _curvlinops_settings() + _own_settings()
ALL_SETTINGS: list[Setting] = BACKPACK_SETTINGS + CURVLINOPS_SETTINGS

_names = [s.name for s in ALL_SETTINGS]
assert len(_names) == len(set(_names)), sorted(n for n in _names if _names.count(n) > 1)
