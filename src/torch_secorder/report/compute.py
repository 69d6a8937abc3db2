r"""The numbers of the curvature report, computed with the library's public API.

:func:`compute_report` takes a model, a loss and data (one ``(inputs, targets)``
batch or a re-iterable of batches) and returns a :class:`CurvatureReport`:

* the Hessian :math:`H` of the loss over all the data is a
  :class:`~torch_secorder.operators.HessianOperator`;
* its trace and diagonal are exact (:meth:`~torch_secorder.operators.CurvatureOperator.diagonal`)
  when the model has at most ``exact_limit`` parameters (``trace="auto"``), else
  estimated: the trace by :func:`~torch_secorder.linalg.hutchinson_adaptive` (stopped
  at a relative standard error ``trace_rtol``), the diagonal by
  :func:`~torch_secorder.linalg.hutchinson_diagonal`;
* the ``top_k`` largest and the ``bottom_k`` smallest (most negative) eigenvalues by
  :func:`~torch_secorder.linalg.lanczos_eigsh` (``which="LA"`` and ``"SA"``), with
  the residual norms :math:`\|Hy - \theta y\|` of the returned pairs;
* the spectral density by :func:`~torch_secorder.linalg.stochastic_lanczos_quadrature`;
* the loss along one and two directions through the parameters
  (:func:`~torch_secorder.analysis.compute_loss_surface_1d` and ``_2d``, batch by
  batch, weighted as the operator weights them): filter-normalised random
  directions (Li et al. 2018) or the top eigenvectors.

Every random draw comes from a generator seeded with ``seed`` (one per step, so a
step gives the same numbers whatever other steps run), so the same seed gives the
same report.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import torch_secorder
from torch_secorder.analysis.landscape import (
    compute_loss_surface_1d,
    compute_loss_surface_2d,
    create_random_direction,
)
from torch_secorder.linalg import (
    EigenResult,
    SpectralDensity,
    hutchinson_adaptive,
    hutchinson_diagonal,
    lanczos_eigsh,
    stochastic_lanczos_quadrature,
)
from torch_secorder.operators import HessianOperator

__all__ = ["CurvatureReport", "ReportOptions", "compute_report", "step_generator"]

TRACE_MODES = ("auto", "exact", "estimate")
DIRECTIONS = ("random", "eigen")

#: Offsets of the per-step seeds (``seed + offset``): one generator per step.
SEED_OFFSETS = {"top": 1, "bottom": 2, "slq": 3, "trace": 4, "diagonal": 5, "directions": 6}


@dataclass
class ReportOptions:
    """What the report computes and how much it spends (the command's options).

    Attributes:
        top_k: Largest eigenvalues.
        bottom_k: Smallest (most negative) eigenvalues (0: none).
        eig_tol: Relative residual tolerance of the eigensolver.
        eig_max_iter: Largest number of Hessian-vector products per eigensolver run.
        slq_steps: Lanczos steps per SLQ probe.
        slq_probes: SLQ probes.
        trace: ``"auto"`` (exact up to ``exact_limit`` parameters), ``"exact"``
            or ``"estimate"``.
        exact_limit: Largest parameter count for the exact trace under ``"auto"``.
        trace_rtol: Relative standard error at which the trace estimate stops.
        trace_max_matvecs: Largest number of products of the trace estimate.
        diag_samples: Probes of the diagonal estimate (when not exact).
        directions: ``"random"`` (filter-normalised) or ``"eigen"`` (top eigenvectors).
        span: The landscapes cover coefficients in ``[-span, span]``.
        points_1d: Points of each 1D landscape.
        points_2d: Points along each axis of the 2D landscape.
    """

    top_k: int = 5
    bottom_k: int = 1
    eig_tol: float = 1e-5
    eig_max_iter: int = 300
    slq_steps: int = 40
    slq_probes: int = 6
    trace: str = "auto"
    exact_limit: int = 100_000
    trace_rtol: float = 1e-2
    trace_max_matvecs: int = 1000
    diag_samples: int = 64
    directions: str = "random"
    span: float = 1.0
    points_1d: int = 41
    points_2d: int = 21

    def check(self) -> None:
        """ValueError naming the first option out of range."""
        counts = {
            "top_k": 1,
            "bottom_k": 0,
            "eig_max_iter": 1,
            "slq_steps": 1,
            "slq_probes": 1,
            "exact_limit": 0,
            "trace_max_matvecs": 8,
            "diag_samples": 1,
            "points_1d": 2,
            "points_2d": 2,
        }
        for name, low in counts.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("eig_tol", "trace_rtol", "span"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.trace not in TRACE_MODES:
            raise ValueError(f"trace must be one of {TRACE_MODES}, got {self.trace!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {self.directions!r}")


@dataclass
class CurvatureReport:
    """Everything the report shows.

    Attributes:
        title: What was analysed (the model's description).
        names: Names of the parameters the Hessian is over (those requiring grad).
        shapes: Their shapes.
        num_params: :math:`n`.
        num_samples: Samples of the data.
        num_batches: Batches of the data.
        loss: The loss over the data at the parameters (the landscapes' centre).
        trace: The Hessian trace (exact or estimated).
        trace_std_error: Its standard error (0 when exact).
        trace_method: How it was computed.
        trace_matvecs: Hessian-vector products of the estimate (0 when exact).
        diagonals: The Hessian diagonal, one tensor per parameter of ``names``.
        diagonal_exact: Whether ``diagonals`` is exact (else a Hutchinson estimate).
        top: The ``top_k`` largest eigenpairs (``which="LA"``).
        bottom: The ``bottom_k`` smallest eigenpairs (``which="SA"``), or ``None``.
        density: The SLQ spectral density.
        direction_kind: ``"random"`` or ``"eigen"``.
        direction_labels: What the two directions are.
        landscape_1d: ``{label: (alphas, losses)}`` along each direction.
        landscape_2d: ``(alphas, betas, losses)`` on the plane of both.
        timings: Seconds per step (each run once: first-call costs included).
        environment: Versions, device, seed, dtype, threads.
        options: The :class:`ReportOptions` used.
    """

    title: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    num_params: int
    num_samples: int
    num_batches: int
    loss: float
    trace: float
    trace_std_error: float
    trace_method: str
    trace_matvecs: int
    diagonals: list[Tensor]
    diagonal_exact: bool
    top: EigenResult
    bottom: EigenResult | None
    density: SpectralDensity
    direction_kind: str
    direction_labels: tuple[str, str]
    landscape_1d: dict[str, tuple[Tensor, Tensor]]
    landscape_2d: tuple[Tensor, Tensor, Tensor]
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    options: ReportOptions = field(default_factory=ReportOptions)


def step_generator(seed: int, step: str, device: torch.device) -> torch.Generator:
    """The generator of one step of the report: seeded with ``seed + SEED_OFFSETS[step]``."""
    return torch.Generator(device=device).manual_seed(seed + SEED_OFFSETS[step])


def environment(device: torch.device, seed: int, dtype: torch.dtype) -> dict[str, str]:
    """Library and torch versions, Python, platform, device, seed, dtype, threads."""
    if device.type == "cuda":
        device_text = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        device_text = f"{device} ({platform.processor() or platform.machine()})"
    return {
        "torch-secorder": torch_secorder.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_text,
        "CPU threads": str(torch.get_num_threads()),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": str(seed),
    }


class _Steps:
    """Times the report's steps and drives its outer progress bar."""

    def __init__(self, total: int, progress: bool):
        self.timings: dict[str, float] = {}
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="curvature report", unit="step", file=sys.stderr)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(data: Any) -> Any:
    return [data] if isinstance(data, tuple) else data


def _landscape(
    H: HessianOperator,
    data: Any,
    surface: Callable[..., tuple[Tensor, ...]],
    directions: list[list[Tensor]],
    **kwargs: Any,
) -> tuple[Tensor, ...]:
    """``surface`` over all batches, weighted as the operator weights them."""
    total: tuple[Tensor, ...] | None = None
    weighted = H.reduction == "mean" and H.batches.num_batches > 1
    for batch in _batches(data):
        inputs, targets = batch
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        out = surface(H.model, H.loss_fn, inputs, targets, *directions, **kwargs)
        size = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
        losses = out[-1] * (size / H.num_samples) if weighted else out[-1]
        total = (*out[:-1], losses) if total is None else (*out[:-1], total[-1] + losses)
    assert total is not None
    return total


#: Basis vectors of the eigensolver (fewer restarts than its default for the bottom end of a
#: Hessian spectrum, where the bulk sits close), unless 2 * ncv * n exceeds :data:`BASIS_ENTRIES`.
EIGEN_NCV = 80
BASIS_ENTRIES = 2**27


def _basis_size(n: int, *ks: int) -> int | None:
    """``ncv`` for :func:`lanczos_eigsh`: :data:`EIGEN_NCV` where it fits, else its default."""
    ncv = max(EIGEN_NCV, *(3 * k + 2 for k in ks))
    if 2 * ncv * n > BASIS_ENTRIES:
        return None
    return min(n, ncv)


def _random_direction(
    H: HessianOperator, model: nn.Module, generator: torch.Generator
) -> list[Tensor]:
    """A filter-normalised random direction, zero on the parameters the Hessian is not over."""
    direction = create_random_direction(model, normalization="filter", generator=generator)
    names = set(H.names)
    return [
        d if name in names else torch.zeros_like(d)
        for (name, _), d in zip(model.named_parameters(), direction)
    ]


def _eigen_direction(H: HessianOperator, row: Tensor, model: nn.Module) -> list[Tensor]:
    """An eigenvector as a direction over ``model.parameters()``, scaled to the norm of
    the parameters (so that a coefficient 1 is a step as long as the parameter vector)."""
    by_name = dict(zip(H.names, H.unflatten(row)))
    params = list(model.named_parameters())
    norm = torch.sqrt(sum(p.detach().pow(2).sum() for _, p in params))
    scale = norm / row.norm()
    return [by_name[name] * scale if name in by_name else torch.zeros_like(p) for name, p in params]


def compute_report(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Any,
    *,
    title: str = "model",
    seed: int = 0,
    options: ReportOptions | None = None,
    reduction: str | None = None,
    progress: bool = True,
) -> CurvatureReport:
    """Compute every number of the report (see the module doc).

    Args:
        model: The network (left as it was: the library's functions do not change it).
        loss_fn: ``loss_fn(model(inputs), targets)``.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches, on the
            model's device.
        title: A description of the model for the report.
        seed: Seed of every random draw.
        options: What to compute (default :class:`ReportOptions`).
        reduction: ``"mean"``/``"sum"`` for a loss function that declares none.
        progress: Progress bars over the steps and over the library's long loops.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> options = ReportOptions(top_k=1, bottom_k=1, slq_steps=2, slq_probes=1,
        ...                         points_1d=3, points_2d=2)
        >>> report = compute_report(model, torch.nn.MSELoss(), (x, y), options=options,
        ...                         progress=False)
        >>> report.trace, report.trace_method  # H = x^T x = diag(1, 4) for this mean loss
        (5.0, 'exact (sum of the exact diagonal)')
        >>> [round(float(v), 10) for v in (report.top.eigenvalues[0], report.bottom.eigenvalues[0])]
        [4.0, 1.0]
    """
    options = options or ReportOptions()
    options.check()
    H = HessianOperator(model, loss_fn, data, reduction=reduction, progress=progress)
    n = H.shape[0]
    device, dtype = H.device, H.dtype
    names = list(H.names)
    shapes = [tuple(p.shape) for p in H.params]
    exact = options.trace == "exact" or (options.trace == "auto" and n <= options.exact_limit)
    steps = _Steps(5 + (options.bottom_k > 0) + (not exact), progress)
    try:
        with steps.step("trace and diagonal" if exact else "trace estimate"):
            if exact:
                diagonal = H.diagonal()
                trace = float(diagonal.sum())
                trace_se, trace_mv = 0.0, 0
                method = "exact (sum of the exact diagonal)"
            else:
                est = hutchinson_adaptive(
                    H.matmat,
                    n,
                    rtol=options.trace_rtol,
                    max_matvecs=options.trace_max_matvecs,
                    generator=step_generator(seed, "trace", device),
                    dtype=dtype,
                    device=device,
                    progress=progress,
                )
                trace = float(est.estimate)
                trace_se = float(est.std_error) if est.std_error is not None else math.nan
                trace_mv = est.matvecs
                method = (
                    f"Hutchinson estimate, Rademacher probes, stopped at a relative standard "
                    f"error of {options.trace_rtol:g} or {options.trace_max_matvecs} products"
                )
        if not exact:
            with steps.step("diagonal estimate"):
                diagonal = hutchinson_diagonal(
                    H.matmat,
                    n,
                    options.diag_samples,
                    generator=step_generator(seed, "diagonal", device),
                    dtype=dtype,
                    device=device,
                    progress=progress,
                ).estimate
        eig_kwargs = dict(
            max_iter=options.eig_max_iter,
            tol=options.eig_tol,
            dtype=dtype,
            device=device,
            ncv=_basis_size(n, options.top_k, options.bottom_k),
        )
        with steps.step(f"top {options.top_k} eigenvalues"):
            top = lanczos_eigsh(
                H.matmat,
                n,
                min(options.top_k, n),
                which="LA",
                generator=step_generator(seed, "top", device),
                **eig_kwargs,
            )
        bottom = None
        if options.bottom_k:
            with steps.step(f"bottom {options.bottom_k} eigenvalues"):
                bottom = lanczos_eigsh(
                    H.matmat,
                    n,
                    min(options.bottom_k, n),
                    which="SA",
                    generator=step_generator(seed, "bottom", device),
                    **eig_kwargs,
                )
        with steps.step("spectral density"):
            density = stochastic_lanczos_quadrature(
                H.matmat,
                n,
                options.slq_steps,
                options.slq_probes,
                generator=step_generator(seed, "slq", device),
                dtype=dtype,
                device=device,
                progress=progress,
            )
        gen = step_generator(seed, "directions", device)
        if options.directions == "eigen":
            d1 = _eigen_direction(H, top.eigenvectors[0], model)
            if top.eigenvectors.shape[0] > 1:
                d2 = _eigen_direction(H, top.eigenvectors[1], model)
                labels = ("top eigenvector", "second eigenvector")
            else:
                d2 = _random_direction(H, model, gen)
                labels = ("top eigenvector", "random, filter-normalised")
        else:
            d1 = _random_direction(H, model, gen)
            d2 = _random_direction(H, model, gen)
            labels = ("random 1, filter-normalised", "random 2, filter-normalised")
        span = (-float(options.span), float(options.span))
        with steps.step("1D landscapes"):
            landscape_1d = {
                label: _landscape(
                    H,
                    data,
                    compute_loss_surface_1d,
                    [d],
                    alpha_range=span,
                    num_points=options.points_1d,
                )
                for label, d in zip(labels, (d1, d2))
            }
        with steps.step("2D landscape"):
            landscape_2d = _landscape(
                H,
                data,
                compute_loss_surface_2d,
                [d1, d2],
                alpha_range=span,
                beta_range=span,
                num_points=options.points_2d,
            )
            centre = _landscape(
                H, data, compute_loss_surface_1d, [d1], alpha_range=(0.0, 0.0), num_points=1
            )[1]
    finally:
        steps.close()
    return CurvatureReport(
        title=title,
        names=names,
        shapes=shapes,
        num_params=n,
        num_samples=H.num_samples,
        num_batches=H.batches.num_batches,
        loss=float(centre[0]),
        trace=trace,
        trace_std_error=trace_se,
        trace_method=method,
        trace_matvecs=trace_mv,
        diagonals=H.unflatten(diagonal),
        diagonal_exact=exact,
        top=top,
        bottom=bottom,
        density=density,
        direction_kind=options.directions,
        direction_labels=labels,
        landscape_1d=landscape_1d,
        landscape_2d=landscape_2d,
        timings=steps.timings,
        environment=environment(device, seed, dtype),
        options=options,
    )
