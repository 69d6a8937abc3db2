"""Parameter bookkeeping: flat vectors <-> parameter lists, and selecting parameters of a model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.errors import ShapeError
from torch_secorder.func._tree import tree_ravel
from torch_secorder.problems._inputs import as_param_list, check_module

__all__ = [
    "flatten_params",
    "unflatten_params",
    "get_param_shapes",
    "get_params_by_module_type",
    "get_params_by_name_pattern",
]


def flatten_params(params: Iterable[Tensor] | Tensor) -> Tensor:
    """Concatenate the tensors of ``params``, each flattened, into one 1-D tensor.

    The result is a new tensor (differentiable with respect to ``params``);
    non-contiguous tensors are accepted (0.0.1 used ``view`` and failed on them).

    Args:
        params: A tensor or an iterable of floating tensors on one device.

    Returns:
        A 1-D tensor of ``sum(p.numel() for p in params)`` entries.

    Example:
        >>> import torch
        >>> flatten_params([torch.ones(2, 2), torch.zeros(1)])
        tensor([1., 1., 1., 1., 0.])
    """
    return tree_ravel(as_param_list(params))


def _as_shapes(param_shapes: Any) -> list[torch.Size]:
    if isinstance(param_shapes, (torch.Size, Tensor)) or not isinstance(param_shapes, Sequence):
        raise TypeError(
            "param_shapes must be a list of shapes (torch.Size or tuples of ints), "
            f"got {type(param_shapes).__name__}"
        )
    shapes = []
    for i, shape in enumerate(param_shapes):
        try:
            size = torch.Size(shape)
        except TypeError:
            raise TypeError(
                f"param_shapes[{i}] must be a torch.Size or a tuple of ints, got {shape!r}"
            ) from None
        if any(d < 0 for d in size):
            raise ValueError(f"param_shapes[{i}] has a negative dimension: {tuple(size)}")
        shapes.append(size)
    return shapes


def unflatten_params(flat_params: Tensor, param_shapes: Sequence[Any]) -> list[Tensor]:
    """Split a 1-D tensor into consecutive pieces reshaped to ``param_shapes``.

    The inverse of :func:`flatten_params`: the pieces are views of ``flat_params``.
    Unlike 0.0.1, a ``flat_params`` whose length is not the total size of
    ``param_shapes`` raises instead of silently dropping or failing mid-way.

    Args:
        flat_params: 1-D tensor.
        param_shapes: Shapes (``torch.Size`` or tuples of ints), e.g. from
            :func:`get_param_shapes`.

    Returns:
        One tensor per shape.

    Raises:
        TypeError: ``flat_params`` is not a tensor, or a shape is not a shape.
        ValueError: ``flat_params`` is not 1-D or its length does not match.

    Example:
        >>> import torch
        >>> unflatten_params(torch.arange(5.0), [torch.Size([2, 2]), torch.Size([1])])
        [tensor([[0., 1.],
                [2., 3.]]), tensor([4.])]
    """
    if not isinstance(flat_params, Tensor):
        raise TypeError(f"flat_params must be a torch.Tensor, got {type(flat_params).__name__}")
    if flat_params.dim() != 1:
        raise ShapeError(f"flat_params must be 1-D, got shape {tuple(flat_params.shape)}")
    shapes = _as_shapes(param_shapes)
    sizes = [s.numel() for s in shapes]
    if sum(sizes) != flat_params.numel():
        raise ShapeError(
            f"flat_params has {flat_params.numel()} entries but param_shapes describe {sum(sizes)}"
        )
    pieces = torch.split(flat_params, sizes)
    return [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]


def get_param_shapes(params: Iterable[Tensor] | Tensor) -> list[torch.Size]:
    """The shape of each tensor of ``params``.

    Example:
        >>> import torch
        >>> get_param_shapes([torch.ones(2, 3), torch.ones(4)])
        [torch.Size([2, 3]), torch.Size([4])]
    """
    if isinstance(params, Tensor):
        params = [params]
    if not isinstance(params, Iterable):
        raise TypeError(
            f"params must be a tensor or an iterable of tensors, got {type(params).__name__}"
        )
    shapes = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        shapes.append(p.shape)
    return shapes


def _as_type_tuple(module_type: Any) -> tuple[type, ...]:
    types = tuple(module_type) if isinstance(module_type, (list, tuple)) else (module_type,)
    if not types:
        raise ValueError("module_type must name at least one type, got an empty sequence")
    for t in types:
        if not isinstance(t, type):
            raise TypeError(
                "module_type must be a type or a list/tuple of types (e.g. torch.nn.Linear), "
                f"got {t!r}"
            )
    return types


def get_params_by_module_type(
    model: nn.Module, module_type: type | list[type] | tuple[type, ...]
) -> dict[str, list[Tensor]]:
    """Parameters of every submodule of the given type(s), keyed by module name.

    Each entry holds ``module.parameters()`` (its own and its children's), in
    the order of ``model.named_modules()``; a matching module without
    parameters maps to an empty list (as in 0.0.1).

    Args:
        model: The network.
        module_type: A module class or a list/tuple of classes.

    Returns:
        ``{module name: [parameters]}``; the root module's name is ``""``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> {k: [tuple(p.shape) for p in v]
        ...  for k, v in get_params_by_module_type(net, torch.nn.Linear).items()}
        {'0': [(3, 2), (3,)], '2': [(1, 3), (1,)]}
    """
    check_module(model)
    types = _as_type_tuple(module_type)
    return {
        name: list(module.parameters())
        for name, module in model.named_modules()
        if isinstance(module, types)
    }


def get_params_by_name_pattern(model: nn.Module, pattern: str | re.Pattern) -> list[Tensor]:
    """Parameters whose name (as in ``model.named_parameters()``) matches ``pattern``.

    Matching is :func:`re.search` (anywhere in the name), as in 0.0.1.

    Args:
        model: The network.
        pattern: A regular expression (string or compiled).

    Returns:
        The matching parameters, in ``named_parameters()`` order.

    Raises:
        TypeError: ``model`` is not a module or ``pattern`` not a string/pattern.
        ValueError: ``pattern`` is not a valid regular expression.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> [tuple(p.shape) for p in get_params_by_name_pattern(net, r"weight$")]
        [(3, 2), (1, 3)]
    """
    check_module(model)
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"pattern is not a valid regular expression ({pattern!r}): {exc}"
            ) from exc
    elif isinstance(pattern, re.Pattern):
        regex = pattern
    else:
        raise TypeError(
            f"pattern must be a regular expression string, got {type(pattern).__name__}"
        )
    return [p for name, p in model.named_parameters() if regex.search(name)]
