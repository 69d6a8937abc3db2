r"""Curvature diagonals per layer, keyed by module name, and their summary statistics.

A layer's entry is the diagonal of the curvature matrix restricted to that
layer's parameters, flattened and concatenated in ``module.parameters()`` order.
The diagonal of a block of a matrix is that part of the matrix's diagonal, so
all layers come out of one computation over the selected parameters:

* Hessian: :math:`\operatorname{diag}(\nabla^2_\theta L)`, exact, from
  :func:`~torch_secorder.core.hessian_diagonal.model_hessian_diagonal`.
* Empirical Fisher: :math:`\frac1N \sum_{i=1}^N \nabla_\theta \ell_i \odot
  \nabla_\theta \ell_i` with :math:`\ell_i = \text{loss\_fn}(\text{model}(x_i), y_i)`
  the loss of sample :math:`i` alone, from per-sample gradients
  (:func:`~torch_secorder.problems._per_sample.empirical_sq_sum`, as the empirical
  Fisher of :mod:`torch_secorder.approximations`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.core.hessian_diagonal import model_hessian_diagonal
from torch_secorder.core.utils import get_params_by_module_type
from torch_secorder.problems._inputs import check_module
from torch_secorder.problems._per_sample import empirical_sq_sum

__all__ = [
    "per_layer_hessian_diagonal",
    "per_layer_fisher_diagonal",
    "get_layer_curvature_stats",
]


def select_layers(
    model: nn.Module, layer_types: type | Sequence[type] | None
) -> dict[str, list[Tensor]]:
    """``{module name: parameters}`` of the layers to report (modules without parameters dropped).

    ``layer_types=None``: every module that owns parameters directly, with those
    parameters; otherwise every module of the given type(s), with all its
    parameters (children included, as in 0.0.1).  No such module: ``{}`` with a
    warning (0.0.1 returned ``{}``), so that the callers return ``{}``.
    """
    check_module(model)
    if layer_types is None:
        layers = {
            name: list(module.parameters(recurse=False)) for name, module in model.named_modules()
        }
    else:
        layers = get_params_by_module_type(model, layer_types)
    layers = {name: params for name, params in layers.items() if params}
    if not layers:
        warnings.warn(
            f"layer_types={layer_types!r} selects no module with parameters in "
            f"{type(model).__name__}: returning {{}}",
            stacklevel=3,
        )
    return layers


def _check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


@contextlib.contextmanager
def _differentiating_only(model: nn.Module, selected: list[Tensor]) -> Iterator[None]:
    """Temporarily make exactly the ``selected`` parameters require grad (as 0.0.1 did)."""
    ids = {id(p) for p in selected}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _by_layer(
    model: nn.Module, layers: dict[str, list[Tensor]], values: list[Tensor]
) -> dict[str, Tensor]:
    by_id = {id(p): v for p, v in zip(model.parameters(), values, strict=True)}
    return {
        name: torch.cat([by_id[id(p)].reshape(-1) for p in params])
        for name, params in layers.items()
    }


def per_layer_hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    layer_types: type | Sequence[type] | None = None,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    r"""Exact Hessian diagonal of ``loss_fn(model(inputs), targets)``, one entry per layer.

    .. math::
        d_\ell = \operatorname{diag}\big(\nabla^2_{\theta_\ell} L\big),

    the diagonal of the Hessian block of layer :math:`\ell` (which is the
    corresponding part of the full Hessian's diagonal).  All selected layers
    come from one call of
    :func:`~torch_secorder.core.hessian_diagonal.model_hessian_diagonal`
    restricted to their parameters; 0.0.1 made one call per layer.

    Differences from 0.0.1: ``layer_types=None`` selects every module that owns
    parameters (as 0.0.1's docstring said; its code used only ``Linear`` and
    ``Conv2d``).  As in 0.0.1 the selected parameters are differentiated even if
    they do not require grad; ``requires_grad`` flags are restored.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        layer_types: A module class or a list/tuple of classes; ``None``: every
            module that owns parameters directly.
        create_graph: Make the result differentiable.

    Returns:
        ``{module name: 1-D tensor}``, the layer's parameters' diagonals
        flattened and concatenated in ``module.parameters()`` order; ``{}``
        (with a warning, nothing computed) when ``layer_types`` selects no
        module with parameters, as in 0.0.1.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> per_layer_hessian_diagonal(model, torch.nn.functional.mse_loss, x, y)
        {'0': tensor([2., 8.])}
    """
    check_module(model)
    _check_loss_fn(loss_fn)
    layers = select_layers(model, layer_types)
    if not layers:
        return {}
    selected = [p for params in layers.values() for p in params]
    with _differentiating_only(model, selected):
        diag = model_hessian_diagonal(model, loss_fn, inputs, targets, create_graph=create_graph)
    return _by_layer(model, layers, diag)


def per_layer_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    layer_types: type | Sequence[type] | None = None,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    r"""Empirical Fisher diagonal, one entry per layer.

    .. math::
        d_\ell = \frac1N \sum_{i=1}^N \nabla_{\theta_\ell}\ell_i \odot
        \nabla_{\theta_\ell}\ell_i,
        \qquad \ell_i = \text{loss\_fn}(\text{model}(x_i), y_i),

    the diagonal of the empirical Fisher :math:`\frac1N\sum_i g_i g_i^\top`
    restricted to layer :math:`\ell`, from per-sample gradients (vmap), all
    layers in one pass of
    :func:`~torch_secorder.approximations.fisher_diagonal.empirical_fisher_diagonal`.
    Samples must not interact (no batch norm in training mode).

    Differences from 0.0.1: 0.0.1 squared the batch gradient,
    :math:`(\frac1N\sum_i g_i)^{\odot 2}`, which is not the empirical Fisher;
    ``layer_types=None`` selects every module that owns parameters (0.0.1:
    ``Linear`` and ``Conv2d`` only).  As in 0.0.1, the selected parameters are
    differentiated even if they do not require grad.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar; called on
            one sample at a time (batch of one).
        inputs: Model input with a leading batch dimension (a tuple of such
            tensors is unpacked into positional arguments).
        targets: Targets with the same leading batch dimension.
        layer_types: A module class or a list/tuple of classes; ``None``: every
            module that owns parameters directly.
        create_graph: Make the result differentiable.

    Returns:
        ``{module name: 1-D tensor}`` in ``module.parameters()`` order; ``{}``
        (with a warning, nothing computed) when ``layer_types`` selects no
        module with parameters, as in 0.0.1.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)
        >>> per_layer_fisher_diagonal(model, torch.nn.functional.mse_loss, x, y)
        {'0': tensor([34.])}
    """
    check_module(model)
    _check_loss_fn(loss_fn)
    layers = select_layers(model, layer_types)
    if not layers:
        return {}
    selected = [p for params in layers.values() for p in params]
    with _differentiating_only(model, selected):
        sums, n = empirical_sq_sum(model, loss_fn, inputs, targets, create_graph=create_graph)
    return _by_layer(model, layers, [s / n for s in sums])


def get_layer_curvature_stats(
    layer_curvatures: dict[str, Tensor],
) -> dict[str, dict[str, float]]:
    r"""Summary statistics of each layer's curvature values.

    For each layer with values :math:`d \in \mathbb{R}^k`: ``mean``, ``std``
    (Bessel-corrected, as 0.0.1; ``0.0`` for a single value, where 0.0.1 gave
    ``nan``), ``max``, ``min``, ``norm`` (:math:`\|d\|_2`), ``abs_mean``
    (:math:`\frac1k\sum|d_j|`) and ``sum`` (for a Hessian diagonal: the trace of
    the layer's block).  Computed in float64.

    Args:
        layer_curvatures: ``{layer name: tensor}``, e.g. from
            :func:`per_layer_hessian_diagonal`.

    Returns:
        ``{layer name: {statistic: float}}``.

    Raises:
        TypeError: not a dict of tensors.
        ValueError: a tensor is empty.

    Example:
        >>> import torch
        >>> stats = get_layer_curvature_stats({"fc": torch.tensor([3.0, 4.0])})
        >>> stats["fc"]["norm"], stats["fc"]["mean"], stats["fc"]["sum"]
        (5.0, 3.5, 7.0)
    """
    if not isinstance(layer_curvatures, dict):
        raise TypeError(
            "layer_curvatures must be a dict {layer name: tensor}, "
            f"got {type(layer_curvatures).__name__}"
        )
    stats = {}
    for name, values in layer_curvatures.items():
        if not isinstance(values, Tensor):
            raise TypeError(
                f"layer_curvatures[{name!r}] must be a torch.Tensor, got {type(values).__name__}"
            )
        if values.numel() == 0:
            raise ValueError(f"layer_curvatures[{name!r}] is empty: no statistics to compute")
        d = values.detach().reshape(-1).to(torch.float64)
        stats[name] = {
            "mean": float(d.mean()),
            "std": float(d.std()) if d.numel() > 1 else 0.0,
            "max": float(d.max()),
            "min": float(d.min()),
            "norm": float(d.norm()),
            "abs_mean": float(d.abs().mean()),
            "sum": float(d.sum()),
        }
    return stats
