r"""Hessian-vector products of a closure or a model's loss, and the HVP-based trace.

.. math::
    H v = \nabla_\theta \big( \nabla_\theta L(\theta)^\top v \big).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.func._tree import tree_ravel, tree_unravel
from torch_secorder.problems._batch_checks import check_batch_device
from torch_secorder.problems._ggn import problem_ggn_matmat
from torch_secorder.problems._inputs import (
    as_vector_list,
    check_chunk_size,
    check_generator,
    check_num_samples,
)
from torch_secorder.problems._problem import (
    LossProblem,
    closure_problem,
    model_output_problem,
    module_problem,
)

__all__ = [
    "exact_hvp",
    "model_hvp",
    "hessian_trace",
    "problem_hvp",
    "approximate_hvp",
    "gauss_newton_product",
]


def problem_hvp(problem: LossProblem, v: list[Tensor], strategy: str = "auto") -> list[Tensor]:
    """``H v`` of a problem, ``v`` in the user's list format, result likewise."""
    if not problem.active:
        return [torch.zeros_like(p) for p in problem.params]
    active_v = [v[i] for i in problem.active]
    flat = tree_ravel(active_v).unsqueeze(0)
    product = problem.matmat(strategy)(flat)[0]
    return problem.expand(tree_unravel(product, list(problem.primals)))


def _single_or_list(values: list[Tensor]) -> Tensor | list[Tensor]:
    return values[0] if len(values) == 1 else values


def exact_hvp(
    func: Callable[[], Tensor],
    params: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
    *,
    strategy: str = "auto",
) -> Tensor | list[Tensor]:
    r"""Exact Hessian-vector product :math:`\nabla^2 L\, v` of the closure ``func()``.

    Args:
        func: Zero-argument closure returning a scalar loss; it reads ``params``.
        params: A tensor or list of tensors.
        v: Tensor (one parameter) or list of tensors shaped like ``params``.
        create_graph: Make the result differentiable.
        strategy: ``"auto"``, ``"vmap"`` (forward-over-reverse) or ``"graph"``
            (double backward).

    Returns:
        One tensor for a single parameter, else a list (0.0.1 returned a tuple).
        A tensor that does not require grad gets zeros.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> exact_hvp(lambda: (x ** 3).sum(), [x], torch.ones(2))
        tensor([ 6., 12.])
    """
    with closure_problem(func, params, create_graph=create_graph) as problem:
        vectors = as_vector_list(v, problem.params)
        return _single_or_list(problem_hvp(problem, vectors, strategy))


def model_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Any,
    y: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
    *,
    strategy: str = "auto",
) -> Tensor | list[Tensor]:
    r"""Hessian-vector product of ``loss_fn(model(x), y)`` w.r.t. ``model.parameters()``.

    ``v`` has one tensor per parameter (or one tensor for a one-parameter model).
    The model is left exactly as it was.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> x, y = torch.ones(4, 1), torch.zeros(4, 1)
        >>> model_hvp(model, torch.nn.functional.mse_loss, x, y, [torch.ones(1, 1)])
        tensor([[2.]])
    """
    with module_problem(model, loss_fn, x, y, create_graph=create_graph) as problem:
        vectors = as_vector_list(v, problem.params)
        return _single_or_list(problem_hvp(problem, vectors, strategy))


def hessian_trace(
    func: Callable[[], Tensor],
    params: Any,
    num_samples: int = 10,
    create_graph: bool = False,
    sparse: bool = False,
    *,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    progress: bool = True,
) -> float | Tensor:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}(H)` from Hessian-vector products.

    .. math::
        \widehat{\operatorname{tr}}(H) = \frac{1}{m}\sum_{j=1}^m v_j^\top H v_j

    with Rademacher probes, or with ``sparse=True`` sparse probes whose entries
    are :math:`\pm 1/\sqrt{0.1}` with probability 0.1 and 0 otherwise, so that
    :math:`E[vv^\top] = I` and the estimate stays unbiased (0.0.1 forgot the
    rescaling and was biased by a factor 0.1).

    Args:
        func: Zero-argument closure returning a scalar loss.
        params: A tensor or list of tensors.
        num_samples: Number of probes (>= 1).
        create_graph: Return a differentiable 0-dim tensor instead of a float.
        sparse: Use sparse rescaled Rademacher probes.
        generator: Source of the probes.
        strategy: How products are batched (see :func:`exact_hvp`).
        chunk_size: Probes per batched call.
        progress: Show a progress bar for long runs.

    Returns:
        A Python float, as in 0.0.1 (a 0-dim tensor when ``create_graph=True``).
        For the error bar use
        :func:`torch_secorder.core.hessian_trace.hessian_trace_estimate`.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_trace(lambda: x.pow(2).sum(), [x], num_samples=5)
        4.0
    """
    check_chunk_size(chunk_size)
    check_num_samples(num_samples)
    with closure_problem(func, params, create_graph=create_graph) as problem:
        check_generator(generator, problem.params[0].device)
        if not problem.active:
            return 0.0
        estimate = problem.hutchinson(
            num_samples,
            distribution="sparse_rademacher" if sparse else "rademacher",
            generator=generator,
            chunk_size=chunk_size,
            strategy=strategy,
            progress=progress,
        ).estimate
    return estimate if create_graph else float(estimate)


# ------------------------------------------------------------------ finite differences


def _check_damping(damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        if isinstance(damping, Tensor) and damping.numel() == 1:
            damping = float(damping)
        else:
            raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    if not math.isfinite(damping):
        raise ValueError(f"damping must be finite, got {damping}")
    return float(damping)


#: Largest accepted ``richardson_levels`` of :func:`approximate_hvp`: the finest
#: step is :math:`h/2^{k-1}`, and past a few levels rounding, not truncation,
#: dominates the error.
MAX_RICHARDSON_LEVELS = 8


#: Most step halvings of the kink guard of :func:`approximate_hvp`.
MAX_KINK_HALVINGS = 24
#: Safety factor of the kink guard over the expected truncation and rounding errors.
KINK_TOLERANCE = 100.0


def check_richardson_levels(levels: Any, name: str = "richardson_levels") -> int:
    """An int number of Richardson levels in ``[1, MAX_RICHARDSON_LEVELS]``."""
    if isinstance(levels, bool) or not isinstance(levels, int):
        raise TypeError(f"{name} must be an int, got {type(levels).__name__}")
    if not 1 <= levels <= MAX_RICHARDSON_LEVELS:
        raise ValueError(
            f"{name} must be between 1 and {MAX_RICHARDSON_LEVELS}, got {levels} (the number "
            "of central differences at halved steps combined by Richardson extrapolation)"
        )
    return levels


def fd_step(theta_norm: float, v_norm: float, dtype: torch.dtype, levels: int = 1) -> float:
    r"""Step :math:`h` of the central difference along ``v`` (see :func:`approximate_hvp`).

    :math:`h = \varepsilon^{1/(2k+1)} (1 + \|\theta\|) / \|v\|` with
    :math:`\varepsilon` the machine epsilon of ``dtype`` and :math:`k` the
    number of Richardson levels.
    """
    eps = torch.finfo(dtype).eps
    return eps ** (1.0 / (2 * levels + 1)) * (1.0 + theta_norm) / v_norm


def problem_fd_hvp(problem: LossProblem, v: list[Tensor], levels: int = 1) -> list[Tensor]:
    """Central-difference ``H v`` at the problem's point, Richardson over ``levels`` levels."""
    levels = check_richardson_levels(levels, "levels")
    if not problem.active:
        return [torch.zeros_like(p) for p in problem.params]
    like = [p.detach() for p in problem.primals]
    theta = tree_ravel(like)
    direction = tree_ravel([v[i].detach() for i in problem.active]).to(theta.dtype)
    v_norm = float(direction.norm())
    if v_norm == 0.0:
        return problem.expand([torch.zeros_like(p) for p in like])
    h = fd_step(float(theta.norm()), v_norm, theta.dtype, levels)
    vs = [v[i].detach().to(theta.dtype) for i in problem.active]

    def gradient(step: float) -> Tensor:
        # The shifted point is made of new leaf tensors substituted for the user's
        # parameters while the loss runs: the parameters themselves are never written.
        shifted = tuple((p + step * d).requires_grad_(True) for p, d in zip(like, vs, strict=True))
        with torch.enable_grad():
            loss = problem.pure(shifted)
            if not loss.requires_grad:  # func does not depend on the tensors
                return torch.zeros_like(theta)
            grads = torch.autograd.grad(loss, shifted, allow_unused=True)
        pieces = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]
        return tree_ravel(pieces)

    eps = torch.finfo(theta.dtype).eps
    diffs: list[Tensor] = []  # D(h / 2**j), computed as needed
    grad_norms: list[float] = []

    def central(j: int) -> Tensor:
        while len(diffs) <= j:
            step = h / 2 ** len(diffs)
            g_plus, g_minus = gradient(step), gradient(-step)
            grad_norms.append(max(float(g_plus.norm()), float(g_minus.norm())))
            diffs.append((g_plus - g_minus) / (2 * step))
        return diffs[j]

    def extrapolated(first: int) -> Tensor:
        # Richardson: D(h) = Hv + c1 h^2 + c2 h^4 + ...; each column removes one power.
        table: list[Tensor] = []
        for j in range(levels):
            row = [central(first + j)]
            for m in range(1, j + 1):
                row.append(row[m - 1] + (row[m - 1] - table[m - 1]) / (4**m - 1))
            table = row
        return table[-1]

    # Kink guard: the estimate from steps h/2**s, ... must agree with the one from
    # the steps halved once more.  On a smooth loss they differ by the truncation
    # and rounding errors; a kink of a piecewise-linear activation (ReLU, max
    # pooling) between the shifted points makes the gradient jump, and the
    # difference quotient is then off by jump / (2 h), which halving exposes.
    # The first agreeing pair gives the estimate (s = 0 on smooth losses: the
    # estimate of the step h, at the price of one more difference).
    first = extrapolated(0)
    for shift in range(MAX_KINK_HALVINGS + 1):
        coarse, fine = extrapolated(shift), extrapolated(shift + 1)
        finest = h / 2 ** (shift + levels)
        rounding = 2**levels * eps * max(grad_norms) / finest
        truncation = eps ** (2 * levels / (2 * levels + 1)) * float(fine.norm())
        if float((coarse - fine).norm()) <= KINK_TOLERANCE * (rounding + truncation):
            return problem.expand(tree_unravel(coarse.detach(), like))
    warnings.warn(
        "approximate_hvp: the central differences did not settle when the step was "
        f"halved {MAX_KINK_HALVINGS} times (the loss is not smooth along v, e.g. a ReLU "
        "kink at the point); returning the estimate of the first step. exact_hvp gives "
        "the exact product",
        stacklevel=3,
    )
    return problem.expand(tree_unravel(first.detach(), like))


def approximate_hvp(
    func: Callable[[], Tensor],
    params: Any,
    v: Tensor | list[Tensor],
    num_samples: int = 1,
    damping: float = 0.0,
    *,
    richardson_levels: int = 1,
) -> Tensor | list[Tensor]:
    r"""Finite-difference Hessian-vector product plus damping, :math:`(H + \lambda I) v`.

    Central differences of the gradient along :math:`v`:

    .. math::
        D(h) = \frac{\nabla L(\theta + h v) - \nabla L(\theta - h v)}{2h}
             = H v + O(h^2),
        \qquad h = \varepsilon^{1/3} \frac{1 + \|\theta\|}{\|v\|},

    with :math:`\varepsilon` the machine epsilon of the parameters' dtype.  The
    step balances the truncation error :math:`O(h^2 \|v\|^3)` against the
    rounding error :math:`O(\varepsilon \|\nabla L\| / h)` of the difference,
    whose minimum is at :math:`h\|v\| \propto \varepsilon^{1/3}` times the scale
    of :math:`\theta` (:math:`1 + \|\theta\|`, so that the perturbation is
    relative to the parameters and still defined at :math:`\theta = 0`): the
    error is :math:`O(\varepsilon^{2/3})` relative, about :math:`4\cdot10^{-11}`
    in float64 and :math:`2\cdot10^{-5}` in float32.

    ``richardson_levels`` = :math:`k` central differences at steps
    :math:`h, h/2, \dots, h/2^{k-1}` combined by Richardson extrapolation,
    which cancels the error terms :math:`h^2, \dots, h^{2k-2}`; the step is then
    :math:`h = \varepsilon^{1/(2k+1)} (1 + \|\theta\|)/\|v\|`.

    Kink guard: the estimate is accepted only if the estimate from the steps
    halved once more agrees with it within :data:`KINK_TOLERANCE` times the
    expected truncation and rounding errors.  A kink of a piecewise-linear
    activation (ReLU, max pooling) between :math:`\theta \pm h v` makes the
    gradient jump and the quotient wrong by jump / :math:`2h`; the step is then
    halved (up to :data:`MAX_KINK_HALVINGS` times) until two estimates agree,
    and if they never do (a kink at :math:`\theta` itself) the first estimate
    is returned with a warning.  Cost: :math:`2k + 2` gradients on a smooth loss,
    two more per halving.  Use :func:`exact_hvp` for the exact product at the
    cost of about two gradients.

    Differences from 0.0.1: 0.0.1 took a one-sided difference with a fixed
    step ``1e-6`` whatever the dtype (about 10% error in float32), moved the
    parameters in place, and averaged ``num_samples`` identical copies of it.
    Here the gradients at the shifted points are evaluated on new tensors
    substituted for ``params``: the parameters stay bit for bit as they were.
    0.0.1's one-sided difference straddled ReLU kinks less often (its step was
    tiny) but lost about 10% to rounding in float32.
    ``num_samples`` keeps 0.0.1's meaning: the average of that many identical
    differences is the difference itself, so it is validated and computed once
    (any value gives the same result, at the cost of one).  Richardson
    extrapolation is the new keyword ``richardson_levels``.  ``damping * v`` is
    added for any ``damping`` (0.0.1: only when positive).

    Args:
        func: Zero-argument closure returning a scalar loss; it reads ``params``.
        params: A tensor or list of tensors.
        v: Tensor (one parameter) or list of tensors shaped like ``params``.
        num_samples: 0.0.1's number of identical samples to average, an int
            :math:`\ge 1`; it does not change the result (see above).
        damping: :math:`\lambda`, added as :math:`\lambda v`.
        richardson_levels: Richardson levels :math:`k`, an int with
            :math:`1 \le k \le` :data:`MAX_RICHARDSON_LEVELS` (1: plain central
            difference).  Beyond a few levels the finest step is so small that
            rounding dominates: :math:`k = 2` or :math:`3` is usually the best.

    Returns:
        One tensor for a single parameter, else a list.  A tensor that does not
        require grad gets ``damping * v`` (its Hessian block counts as zero).

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hv = approximate_hvp(lambda: (x ** 3).sum(), [x], torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(hv, torch.tensor([6.0, 12.0], dtype=torch.float64), rtol=1e-9)
        True
        >>> x2 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hv2 = approximate_hvp(
        ...     lambda: (x2 ** 4).sum(), x2, torch.ones(2, dtype=torch.float64), richardson_levels=3
        ... )
        >>> torch.allclose(hv2, 12 * x2.detach() ** 2, rtol=1e-12)
        True
    """
    check_num_samples(num_samples)
    levels = check_richardson_levels(richardson_levels)
    damping = _check_damping(damping)
    with closure_problem(func, params) as problem:
        vectors = as_vector_list(v, problem.params)
        product = problem_fd_hvp(problem, vectors, levels)
    return _single_or_list(
        [hv + damping * vi.detach() for hv, vi in zip(product, vectors, strict=True)]
    )


# ------------------------------------------------------------------ Gauss-Newton


def problem_ggn_product(
    problem: LossProblem, loss_fn: Callable[[Tensor, Tensor], Tensor], y: Any, v: list[Tensor]
) -> list[Tensor]:
    """``J^T H_out J v`` of an output problem, ``v`` in the user's list format (one row)."""
    if not problem.active:
        return [torch.zeros_like(p) for p in problem.params]
    row = tree_ravel([v[i] for i in problem.active]).unsqueeze(0)
    product = problem_ggn_matmat(problem, loss_fn, y, row)[0]
    return problem.expand(list(tree_unravel(product, list(problem.primals))))


def gauss_newton_product(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Any,
    y: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
) -> Tensor | list[Tensor]:
    r"""Generalised Gauss-Newton product :math:`G v = J^\top H_{\text{out}} J v`.

    :math:`J` is the Jacobian of the model output :math:`z = \text{model}(x)`
    with respect to the parameters and :math:`H_{\text{out}} = \nabla_z^2
    \ell(z, y)` the Hessian of ``loss_fn`` with respect to the output.  Three
    matrix-free steps: one forward-mode JVP (:math:`u = J v`), one
    Hessian-vector product of the loss in output space
    (:math:`w = H_{\text{out}} u`, forward-over-reverse), one VJP
    (:math:`J^\top w`).  For MSE and cross-entropy :math:`H_{\text{out}}` is
    positive semi-definite, and so is :math:`G`.

    Differences from 0.0.1: 0.0.1 built :math:`J v` with one backward pass per
    output entry, then detached the output before its last VJP and so returned
    zeros for every parameter.

    Args:
        model: The network (``torch.nn.Module``; anything else raises ``TypeError``).
        loss_fn: ``loss_fn(outputs, y)`` returning a scalar.
        x: Model input (a tuple is unpacked into positional arguments).
        y: Targets, the second argument of ``loss_fn``.
        v: One tensor per parameter of ``model.parameters()`` (a tensor for a
            one-parameter model).
        create_graph: Make the result differentiable.

    Returns:
        One tensor for a one-parameter model, else a list shaped like the parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> x, y = torch.ones(4, 1), torch.zeros(4, 1)
        >>> gauss_newton_product(model, torch.nn.functional.mse_loss, x, y, [torch.ones(1, 1)])
        tensor([[2.]])
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    with model_output_problem(model, x, create_graph) as problem:
        check_batch_device(problem.params, targets=y)
        vectors = as_vector_list(v, problem.params)
        return _single_or_list(problem_ggn_product(problem, loss_fn, y, vectors))
