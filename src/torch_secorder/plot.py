r"""Figures of curvature, one function per figure, from the numbers the library returns.

Each function takes plain results (tensors, lists, a
:class:`~torch_secorder.linalg.SpectralDensity`), draws on ``ax`` (a matplotlib
``Axes``; default: a new figure of its own) and returns that ``Axes``
(``ax.figure`` is the figure), so the plots go into the user's own figures:

* :func:`plot_spectral_density`: the SLQ spectral density on a log scale, with
  eigenvalues marked (PyHessian's figure);
* :func:`plot_eigenvalues`: extreme eigenvalues with their residual norms;
* :func:`plot_eigenvalue_history`: top eigenvalues against training progress;
* :func:`plot_parameter_traces` and :func:`plot_diagonal_statistics`: the
  trace and the diagonal's mean, minimum and maximum per parameter tensor;
* :func:`plot_loss_1d` and :func:`plot_loss_2d`: loss landscapes along one
  or two directions (Li et al. 2018), the 2D one as a contour plot.

Matplotlib is an optional dependency (``pip install torch-secorder[plot]``),
imported only when a function runs.  A new figure is a bare
``matplotlib.figure.Figure`` (no pyplot, no global state, no window): save it
with ``ax.figure.savefig(path)`` (the Agg renderer), or show it in a notebook.

Example:
    >>> import torch
    >>> from torch_secorder.plot import plot_loss_1d
    >>> alphas = torch.linspace(-1, 1, 5, dtype=torch.float64)
    >>> ax = plot_loss_1d(alphas, alphas**2, label="a parabola")
    >>> ax.get_xlabel(), ax.get_lines()[0].get_ydata().tolist()
    ('α', [1.0, 0.25, 0.0, 0.25, 1.0])
    >>> ax.figure.get_size_inches().tolist()
    [7.0, 4.2]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

    from torch_secorder.linalg.slq import SpectralDensity

__all__ = [
    "FIGSIZE",
    "new_axes",
    "plot_diagonal_statistics",
    "plot_eigenvalue_history",
    "plot_eigenvalues",
    "plot_loss_1d",
    "plot_loss_2d",
    "plot_parameter_traces",
    "plot_spectral_density",
    "require_matplotlib",
]

#: Size in inches of a figure a function creates (``ax=None``).
FIGSIZE = (7.0, 4.2)

#: The message of the ImportError raised without matplotlib.
MISSING_MATPLOTLIB = (
    "torch_secorder.plot needs matplotlib, an optional dependency: "
    "pip install torch-secorder[plot]  (or: pip install matplotlib)"
)


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or an ImportError naming the extra to install.

    Raises:
        ImportError: matplotlib is not installed; the message says
            ``pip install torch-secorder[plot]``.
    """
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(MISSING_MATPLOTLIB) from exc
    return matplotlib


def new_axes(figsize: tuple[float, float] = FIGSIZE, dpi: float = 100) -> Axes:
    """One ``Axes`` on a new ``matplotlib.figure.Figure`` (constrained layout, no pyplot).

    Args:
        figsize: Width and height in inches.
        dpi: Dots per inch; a saved PNG is ``figsize * dpi`` pixels.
    """
    mpl = require_matplotlib()
    fig = mpl.figure.Figure(figsize=figsize, dpi=dpi, layout="constrained")
    return fig.add_subplot()


def _axes(ax: Axes | None) -> Axes:
    return new_axes() if ax is None else ax


def _array(values: Any, name: str, ndim: int | None = 1) -> Any:
    """``values`` (a tensor or a sequence of numbers) as a float64 NumPy array."""
    import numpy as np

    if isinstance(values, Tensor):
        out = values.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            out = np.asarray(
                [float(v) if isinstance(v, Tensor) else v for v in values], dtype=np.float64
            )
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} must be a tensor or a sequence of numbers, got {type(values).__name__}"
            ) from None
    if ndim is not None and out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(out.shape)}")
    return out


def plot_spectral_density(
    density: SpectralDensity,
    *,
    eigenvalues: Mapping[str, Any] | Any = None,
    sigma: float | None = None,
    num_points: int = 1000,
    log: bool = True,
    floor: float = 1e-8,
    ax: Axes | None = None,
) -> Axes:
    r"""The smoothed SLQ density :math:`\hat\phi_\sigma(t)`, on a log scale by default.

    Args:
        density: From :func:`~torch_secorder.linalg.stochastic_lanczos_quadrature`.
        eigenvalues: Values to mark with vertical lines: a tensor/sequence, or a
            mapping ``{label: values}`` (one colour per label), e.g. the top and
            the most negative eigenvalues from Lanczos.
        sigma: Gaussian width (default :meth:`SpectralDensity.default_sigma`).
        num_points: Points of the grid (:meth:`SpectralDensity.grid`).
        log: Logarithmic density axis; values below ``floor`` times the peak are
            drawn at that floor (the Gaussian tails vanish numerically).
        floor: See ``log``.
        ax: Axes to draw on (default: a new figure).
    """
    ax = _axes(ax)
    grid = density.grid(num_points, sigma)
    values = _array(density.density(grid, sigma), "density")
    t = _array(grid, "grid")
    if log:
        peak = float(values.max()) if values.size else 1.0
        values = values.clip(min=floor * peak if peak > 0 else floor)
        ax.set_yscale("log")
    ax.plot(t, values, color="C0", lw=1.5, label="SLQ density")
    if eigenvalues is not None:
        groups = eigenvalues if isinstance(eigenvalues, Mapping) else {"eigenvalues": eigenvalues}
        for i, (label, vals) in enumerate(groups.items()):
            for j, v in enumerate(_array(vals, f"eigenvalues[{label!r}]")):
                ax.axvline(v, color=f"C{i + 1}", ls="--", lw=1, label=label if j == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density" + (" (log scale)" if log else ""))
    ax.set_title(
        f"Spectral density (SLQ: {density.num_probes} probes, {density.nodes.shape[1]} steps)"
    )
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_eigenvalues(
    eigenvalues: Any,
    residuals: Any = None,
    *,
    labels: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    r"""Eigenvalues as points, with the residual norms :math:`\|Hy - \theta y\|` as error bars.

    For a symmetric matrix an eigenvalue lies within the residual norm of its
    Ritz value, so the bars are rigorous intervals.

    Args:
        eigenvalues: ``(k,)`` values (e.g. ``EigenResult.eigenvalues``).
        residuals: ``(k,)`` residual norms (``EigenResult.residuals``), or ``None``.
        labels: Tick labels (default ``λ1 .. λk``).
        ax: Axes to draw on (default: a new figure).
    """
    ax = _axes(ax)
    vals = _array(eigenvalues, "eigenvalues")
    errs = None if residuals is None else _array(residuals, "residuals")
    if errs is not None and errs.shape != vals.shape:
        raise ValueError(
            f"residuals must have the shape of eigenvalues {vals.shape}, got {errs.shape}"
        )
    x = list(range(len(vals)))
    ax.errorbar(x, vals, yerr=errs, fmt="o", color="C0", capsize=3)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xticks(x, labels if labels is not None else [f"λ{i + 1}" for i in x])
    ax.set_ylabel("eigenvalue")
    ax.set_title("Extreme eigenvalues (bars: residual norms)")
    return ax


def plot_eigenvalue_history(
    steps: Any, eigenvalues: Any, *, ax: Axes | None = None, label: str = "λ"
) -> Axes:
    """Top eigenvalues against training progress: one line per eigenvalue.

    Args:
        steps: ``(T,)`` training steps (or epochs) at which they were computed.
        eigenvalues: ``(T, k)`` (or ``(T,)``) eigenvalues at each step.
        ax: Axes to draw on (default: a new figure).
        label: Prefix of the legend entries.
    """
    ax = _axes(ax)
    x = _array(steps, "steps")
    vals = _array(eigenvalues, "eigenvalues", ndim=None)
    if vals.ndim == 1:
        vals = vals[:, None]
    if vals.ndim != 2 or vals.shape[0] != x.shape[0]:
        raise ValueError(
            f"eigenvalues must have shape (len(steps), k) = ({x.shape[0]}, k), "
            f"got {tuple(vals.shape)}"
        )
    for i in range(vals.shape[1]):
        ax.plot(x, vals[:, i], marker="o", ms=3, label=f"{label}{i + 1}")
    ax.set_xlabel("training step")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Top eigenvalues during training")
    ax.legend(fontsize="small")
    return ax


def _named(diagonals: Mapping[str, Any] | Sequence[Any], names: Sequence[str] | None):
    if isinstance(diagonals, Mapping):
        items = list(diagonals.items())
    else:
        diagonals = list(diagonals)
        if names is None:
            names = [f"param {i}" for i in range(len(diagonals))]
        if len(names) != len(diagonals):
            raise ValueError(
                f"names must have one entry per diagonal ({len(diagonals)}), got {len(names)}"
            )
        items = list(zip(names, diagonals))
    if not items:
        raise ValueError("diagonals must hold at least one parameter's diagonal")
    return [(str(n), _array(d, f"diagonals[{n!r}]", ndim=None).reshape(-1)) for n, d in items]


def _symlog_if_wide(ax: Axes, values: Any) -> None:
    """A symmetric log scale where the bars span several orders of magnitude."""
    mags = [abs(float(v)) for v in values if v != 0 and math.isfinite(float(v))]
    if mags and max(mags) / min(mags) > 1e3:
        ax.set_yscale("symlog", linthresh=max(mags) * 1e-4)


def plot_parameter_traces(
    diagonals: Mapping[str, Any] | Sequence[Any],
    names: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
) -> Axes:
    r"""The trace of each parameter's Hessian block, :math:`\sum_i H_{ii}` over its entries.

    Args:
        diagonals: ``{name: diagonal}`` or one diagonal per parameter (as
            :func:`~torch_secorder.core.hessian_diagonal.model_hessian_diagonal`
            returns), any shapes.
        names: Names for a sequence (e.g. from ``model.named_parameters()``).
        ax: Axes to draw on (default: a new figure).
    """
    ax = _axes(ax)
    items = _named(diagonals, names)
    traces = [float(d.sum()) for _, d in items]
    x = list(range(len(items)))
    ax.bar(x, traces, color=["C0" if t >= 0 else "C3" for t in traces])
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xticks(x, [n for n, _ in items], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("trace of the block")
    ax.set_title("Hessian trace per parameter")
    _symlog_if_wide(ax, traces)
    return ax


def plot_diagonal_statistics(
    diagonals: Mapping[str, Any] | Sequence[Any],
    names: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
) -> Axes:
    """The mean of each parameter's Hessian diagonal (bar) and its range (min to max).

    Args:
        diagonals: As :func:`plot_parameter_traces`.
        names: As :func:`plot_parameter_traces`.
        ax: Axes to draw on (default: a new figure).
    """
    ax = _axes(ax)
    items = _named(diagonals, names)
    means = [float(d.mean()) if d.size else 0.0 for _, d in items]
    lows = [float(d.min()) if d.size else 0.0 for _, d in items]
    highs = [float(d.max()) if d.size else 0.0 for _, d in items]
    x = list(range(len(items)))
    ax.bar(x, means, color="C0", alpha=0.7, label="mean")
    ax.vlines(x, lows, highs, color="k", lw=1.2, label="min to max")
    ax.scatter(x, lows, marker="_", color="k", s=60)
    ax.scatter(x, highs, marker="_", color="k", s=60)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xticks(x, [n for n, _ in items], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("diagonal entries")
    ax.set_title("Hessian diagonal per parameter")
    ax.legend(fontsize="small")
    _symlog_if_wide(ax, means + lows + highs)
    return ax


def plot_loss_1d(
    alphas: Any,
    losses: Any,
    *,
    label: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    r"""The loss along a line :math:`\theta + \alpha d` (``compute_loss_surface_1d``'s output).

    Args:
        alphas: ``(p,)`` coefficients.
        losses: ``(p,)`` losses.
        label: Legend entry (e.g. the direction's name); draw several lines on one ``ax``.
        ax: Axes to draw on (default: a new figure).
    """
    ax = _axes(ax)
    a = _array(alphas, "alphas")
    y = _array(losses, "losses")
    if a.shape != y.shape:
        raise ValueError(f"losses must have the shape of alphas {a.shape}, got {y.shape}")
    ax.plot(a, y, marker="o", ms=2.5, label=label)
    ax.axvline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    ax.set_title("Loss along a direction")
    if label is not None:
        ax.legend(fontsize="small")
    return ax


def plot_loss_2d(
    alphas: Any,
    betas: Any,
    losses: Any,
    *,
    levels: int = 20,
    filled: bool = True,
    ax: Axes | None = None,
) -> Axes:
    r"""Contours of the loss on a plane :math:`\theta + \alpha d_1 + \beta d_2`.

    Args:
        alphas: ``(p,)`` coefficients of :math:`d_1` (horizontal axis).
        betas: ``(q,)`` coefficients of :math:`d_2` (vertical axis).
        losses: ``(p, q)`` with ``losses[i, j]`` at :math:`(\alpha_i, \beta_j)`, as
            ``compute_loss_surface_2d`` returns.
        levels: Number of contour levels.
        filled: Filled contours with a colour bar (else lines with labels).
        ax: Axes to draw on (default: a new figure).
    """
    ax = _axes(ax)
    a = _array(alphas, "alphas")
    b = _array(betas, "betas")
    z = _array(losses, "losses", ndim=2)
    if z.shape != (a.size, b.size):
        raise ValueError(
            f"losses must have shape (len(alphas), len(betas)) = ({a.size}, {b.size}), "
            f"got {z.shape}"
        )
    if filled:
        cs = ax.contourf(a, b, z.T, levels=levels, cmap="viridis")
        ax.contour(a, b, z.T, levels=levels, colors="k", linewidths=0.3)
        ax.figure.colorbar(cs, ax=ax, label="loss")
    else:
        cs = ax.contour(a, b, z.T, levels=levels, cmap="viridis")
        ax.clabel(cs, fontsize="x-small")
    ax.plot([0.0], [0.0], marker="*", color="w", mec="k", ms=10)
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title("Loss on a plane")
    return ax
