r"""Loss surfaces along directions in parameter space (Li et al., 2018).

.. math::
    L(\alpha) = \mathrm{loss}\big(f(x; \theta + \alpha d), y\big), \qquad
    L(\alpha, \beta) = \mathrm{loss}\big(f(x; \theta + \alpha d_1 + \beta d_2), y\big).

The grid points are evaluated through the one model adapter (:func:`torch.func.functional_call`) on
:math:`\theta + \alpha d`, vmapped over ``chunk_size`` points at a time (bounded
memory), under ``torch.no_grad``; the model's parameters are never written, so
they are bit for bit as before afterwards, also when the call raises.  The model
is evaluated in the mode the user left it in: in training mode batch norm
normalises with the batch statistics (its running statistics are not updated)
and dropout uses one mask for every grid point; in eval mode neither applies.
Buffers, ``.grad``, ``requires_grad`` and the global RNG are as before.

:func:`create_random_direction` draws a Gaussian direction of unit norm per
tensor (0.0.1's default) or, with ``normalization="filter"``, filter-normalised
(Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural
Nets", NeurIPS 2018), the usual choice for plots comparable across networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from torch_secorder._chunks import chunk_entries
from torch_secorder.linalg.trace import chunk_ranges
from torch_secorder.problems._batch_checks import check_batch_fits
from torch_secorder.problems._inputs import (
    as_vector_list,
    check_chunk_size,
    check_loss,
    check_module,
    check_positive_int,
)
from torch_secorder.problems._model_function import ModelFunction
from torch_secorder.problems._purity import preserved_state

__all__ = ["compute_loss_surface_1d", "compute_loss_surface_2d", "create_random_direction"]

#: Most grid points per vmapped chunk by default.
MAX_CHUNK = 64


def _check_range(value: Any, name: str) -> tuple[float, float]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {value!r}")
    return float(value[0]), float(value[1])


def _loss_grid(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    directions: Sequence[Any],
    coeffs_of: Callable[[torch.dtype, torch.device], Tensor],
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Loss at ``theta + sum_k c[p, k] d_k`` for each row ``c[p]``: ``(coeffs, losses)``."""
    check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    model_fn = ModelFunction(
        model, empty="there is no parameter space to move in", inputs=inputs, targets=targets
    )
    params, names = model_fn.params, model_fn.names
    dirs = [
        as_vector_list(d, params, name=f"direction{k + 1}" if len(directions) > 1 else "direction")
        for k, d in enumerate(directions)
    ]
    check_chunk_size(chunk_size)
    like = params[0]
    coeffs = coeffs_of(like.dtype, like.device)
    n = sum(p.numel() for p in params)
    if chunk_size is None:
        chunk_size = max(1, min(MAX_CHUNK, chunk_entries(like.device) // n))

    with preserved_state(params, model) as rewind, torch.no_grad():
        rewind()  # the first evaluation: its random draws are replayed in all others
        check_batch_fits(model, loss_fn, inputs, targets, params, keep_rng=False)
        base = [p.detach() for p in params]

        def loss_at(c: Tensor) -> Tensor:
            values = {
                name: b + sum(c[k] * d[i] for k, d in enumerate(dirs))
                for i, (name, b) in enumerate(zip(names, base, strict=True))
            }
            return loss_fn(model_fn(values, inputs), targets)

        rewind()
        check_loss(loss_at(coeffs[0]), "loss_fn(model(inputs), targets)")

        def loop(rows: Tensor) -> Tensor:
            out = []
            for c in rows:
                rewind()
                out.append(loss_at(c).reshape(()))
            return torch.stack(out)

        batched = vmap(lambda c: loss_at(c).reshape(()), randomness="same")
        losses = []
        use_vmap = chunk_size > 1
        for start, stop in chunk_ranges(coeffs.shape[0], chunk_size):
            rows = coeffs[start:stop]
            if use_vmap:
                try:
                    rewind()
                    losses.append(batched(rows))
                    continue
                except (RuntimeError, NotImplementedError, ValueError):
                    use_vmap = False  # an operator without a batching rule: plain loop
            losses.append(loop(rows))
    return coeffs, torch.cat(losses).to(like.dtype)


def compute_loss_surface_1d(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    direction: list[Tensor],
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    num_points: int = 50,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Loss along a line :math:`\theta + \alpha d`, for ``num_points`` values of :math:`\alpha`.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        direction: :math:`d`, one tensor per parameter of ``model.parameters()``.
        alpha_range: ``(low, high)``; the grid is ``torch.linspace(low, high, num_points)``.
        num_points: Number of grid points.
        chunk_size: Grid points per vmapped evaluation (default: about ``2**24``
            parameter entries, at most 64 points); ``1``: a plain loop.  An
            operator that vmap cannot batch falls back to the loop.

    Returns:
        ``(alphas, losses)``, both ``(num_points,)`` in the parameters' dtype and device.

    Differences from 0.0.1: 0.0.1 overwrote ``p.data`` point by point (restored
    only on success, and with a new tensor object) and updated batch norm
    running statistics in training mode; the grid is now vmapped and the model
    untouched.  ``alphas`` has the parameters' dtype (0.0.1: the default dtype).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> x, y = torch.ones(1, 1), torch.zeros(1, 1)
        >>> d = [torch.ones(1, 1)]
        >>> compute_loss_surface_1d(model, torch.nn.MSELoss(), x, y, d, (-1.0, 1.0), 3)
        (tensor([-1.,  0.,  1.]), tensor([0., 1., 4.]))
    """
    check_chunk_size(chunk_size)
    low, high = _check_range(alpha_range, "alpha_range")
    num_points = check_positive_int(num_points, "num_points")

    def coeffs_of(dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.linspace(low, high, num_points, dtype=dtype, device=device)[:, None]

    coeffs, losses = _loss_grid(model, loss_fn, inputs, targets, [direction], coeffs_of, chunk_size)
    return coeffs[:, 0], losses


def compute_loss_surface_2d(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    direction1: list[Tensor],
    direction2: list[Tensor],
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    beta_range: tuple[float, float] = (-1.0, 1.0),
    num_points: int = 25,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Loss on a plane :math:`\theta + \alpha d_1 + \beta d_2`, on a ``num_points``-square grid.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input (a tuple is unpacked into positional arguments).
        targets: Second argument of ``loss_fn``.
        direction1: :math:`d_1`, one tensor per parameter.
        direction2: :math:`d_2`, one tensor per parameter.
        alpha_range: ``(low, high)`` of :math:`\alpha`.
        beta_range: ``(low, high)`` of :math:`\beta`.
        num_points: Grid points along each axis.
        chunk_size: Grid points per vmapped evaluation (see
            :func:`compute_loss_surface_1d`).

    Returns:
        ``(alphas, betas, losses)``: ``(num_points,)``, ``(num_points,)`` and
        ``(num_points, num_points)`` with ``losses[i, j]`` at
        :math:`(\alpha_i, \beta_j)`.

    Differences from 0.0.1: as :func:`compute_loss_surface_1d`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> d1, d2 = [torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 1.0]])]
        >>> a, b, L = compute_loss_surface_2d(model, torch.nn.MSELoss(reduction="sum"),
        ...                                   x, y, d1, d2, num_points=3)
        >>> L
        tensor([[2., 1., 2.],
                [1., 0., 1.],
                [2., 1., 2.]])
    """
    check_chunk_size(chunk_size)
    a_low, a_high = _check_range(alpha_range, "alpha_range")
    b_low, b_high = _check_range(beta_range, "beta_range")
    num_points = check_positive_int(num_points, "num_points")

    def coeffs_of(dtype: torch.dtype, device: torch.device) -> Tensor:
        alphas = torch.linspace(a_low, a_high, num_points, dtype=dtype, device=device)
        betas = torch.linspace(b_low, b_high, num_points, dtype=dtype, device=device)
        grid_a, grid_b = torch.meshgrid(alphas, betas, indexing="ij")
        return torch.stack([grid_a.reshape(-1), grid_b.reshape(-1)], dim=1)

    coeffs, losses = _loss_grid(
        model, loss_fn, inputs, targets, [direction1, direction2], coeffs_of, chunk_size
    )
    alphas = coeffs[::num_points, 0]
    betas = coeffs[:num_points, 1]
    return alphas, betas, losses.reshape(num_points, num_points)


#: Accepted values of ``normalization`` in :func:`create_random_direction`.
NORMALIZATIONS = ("unit", "filter")


def create_random_direction(
    model: nn.Module,
    *,
    normalization: str = "unit",
    generator: torch.Generator | None = None,
    ignore_1d: bool | None = None,
) -> list[Tensor]:
    r"""A random Gaussian direction in parameter space, normalised per tensor or per filter.

    ``normalization="unit"`` (the default, 0.0.1's direction): for each
    parameter a Gaussian :math:`d` is drawn and scaled to unit Frobenius norm,
    :math:`d \leftarrow d / \|d\|`.

    ``normalization="filter"``: filter normalisation (Li, Xu, Taylor, Studer,
    Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018).
    For each parameter with two or more dimensions every filter of :math:`d`
    (slice along the first dimension: an output unit of a linear layer, an
    output channel of a convolution) is rescaled to the norm of the same filter
    of the parameter, :math:`d_f \leftarrow d_f \, \|\theta_f\| / \|d_f\|`, so
    that the surface does not depend on the weights' scale.  One-dimensional
    parameters (biases, normalisation scales and shifts) get a zero direction,
    as in Li et al.'s ``ignore='biasbn'`` setting; with ``ignore_1d=False`` the
    whole vector is treated as one filter instead.

    Args:
        model: The network.
        normalization: ``"unit"`` (unit norm per tensor) or ``"filter"``
            (filter-normalised, Li et al.).
        generator: Source of the random numbers (default: the global RNG).
        ignore_1d: Zero direction for parameters with fewer than two dimensions;
            default ``True`` with ``"filter"``, ``False`` with ``"unit"``.

    Returns:
        One tensor per parameter of ``model.parameters()``, shaped like it (a
        parameter without entries gets an empty tensor; an all-zero filter gets
        a zero direction).

    Differences from 0.0.1: the default is 0.0.1's unit norm per tensor; filter
    normalisation, which 0.0.1's documentation named but did not compute, is
    ``normalization="filter"``.  (0.1.0 development versions made filter
    normalisation the default.)

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> [round(d.norm().item(), 6) for d in create_random_direction(model, generator=g)]
        [1.0, 1.0]
        >>> d = create_random_direction(model, normalization="filter", generator=g)
        >>> torch.allclose(d[0].norm(dim=1), model.weight.norm(dim=1)), d[1].abs().sum().item()
        (True, 0.0)
    """
    check_module(model)
    if not isinstance(normalization, str):
        raise TypeError(
            f"normalization must be a str ({' or '.join(map(repr, NORMALIZATIONS))}), "
            f"got {type(normalization).__name__}"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {', '.join(map(repr, NORMALIZATIONS))}, "
            f"got {normalization!r}"
        )
    if ignore_1d is None:
        ignore_1d = normalization == "filter"
    if not isinstance(ignore_1d, bool):
        raise TypeError(f"ignore_1d must be a bool or None, got {type(ignore_1d).__name__}")
    direction = []
    with torch.no_grad():
        for p in model.parameters():
            if (ignore_1d and p.dim() < 2) or p.numel() == 0:
                direction.append(torch.zeros_like(p))
                continue
            gen_device = generator.device if generator is not None else p.device
            d = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=gen_device)
            d = d.to(p.device)
            if normalization == "unit":
                rows, d_rows = p.reshape(1, -1), d.reshape(1, -1)
                target = torch.ones(1, 1, dtype=p.dtype, device=p.device)
            else:
                rows = p.reshape(p.shape[0], -1) if p.dim() >= 2 else p.reshape(1, -1)
                d_rows = d.reshape(rows.shape)
                target = rows.norm(dim=1, keepdim=True)
            d_norm = d_rows.norm(dim=1, keepdim=True)
            scale = torch.where(d_norm > 0, target / d_norm, 0.0)
            direction.append((d_rows * scale).reshape(p.shape))
    return direction
