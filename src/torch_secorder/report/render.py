"""The report's figures (PNG files) and its self-contained HTML page.

:func:`write_report` draws each figure with :mod:`torch_secorder.plot`, saves it
as a PNG of a fixed size (:data:`FIGURES`, pixels) in the output directory, and
writes ``report.html`` with every PNG embedded (base64 ``data:`` URIs: the page
needs no other file) and ``report.json`` with the numbers.  Every number the page
states is also in a ``data-value`` attribute at full precision.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import torch

from torch_secorder import plot
from torch_secorder.report.compute import CurvatureReport

__all__ = ["DPI", "FIGURES", "write_report"]

#: Dots per inch of the PNGs.
DPI = 100

#: File name -> (width, height) in inches of each figure; the PNG is ``DPI`` times that.
FIGURE_INCHES: dict[str, tuple[float, float]] = {
    "spectral_density.png": (7.0, 4.2),
    "eigenvalues.png": (7.0, 4.2),
    "parameters.png": (10.0, 4.2),
    "landscape_1d.png": (7.0, 4.2),
    "landscape_2d.png": (6.0, 5.0),
}

#: File name -> (width, height) in pixels of each PNG.
FIGURES: dict[str, tuple[int, int]] = {
    name: (round(w * DPI), round(h * DPI)) for name, (w, h) in FIGURE_INCHES.items()
}


def _figure(name: str) -> Any:
    import matplotlib.figure

    return matplotlib.figure.Figure(figsize=FIGURE_INCHES[name], dpi=DPI, layout="constrained")


def _draw(report: CurvatureReport) -> dict[str, Any]:
    """One matplotlib figure per file of :data:`FIGURES`."""
    figs = {}
    marks = {"top eigenvalues (Lanczos)": report.top.eigenvalues}
    if report.bottom is not None:
        marks["most negative (Lanczos)"] = report.bottom.eigenvalues

    fig = _figure("spectral_density.png")
    plot.plot_spectral_density(report.density, eigenvalues=marks, ax=fig.add_subplot())
    figs["spectral_density.png"] = fig

    fig = _figure("eigenvalues.png")
    values, residuals = [report.top.eigenvalues], [report.top.residuals]
    labels = [f"λ{i + 1}" for i in range(len(report.top.eigenvalues))]
    if report.bottom is not None:
        values.append(report.bottom.eigenvalues)
        residuals.append(report.bottom.residuals)
        labels += ["λmin"] + [f"λmin+{i}" for i in range(1, len(report.bottom.eigenvalues))]
    ax = plot.plot_eigenvalues(
        torch.cat(values), torch.cat(residuals), labels=labels, ax=fig.add_subplot()
    )
    ax.set_title("Largest and most negative eigenvalues (bars: residual norms)")
    figs["eigenvalues.png"] = fig

    fig = _figure("parameters.png")
    left, right = fig.subplots(1, 2)
    diagonals = dict(zip(report.names, report.diagonals))
    plot.plot_parameter_traces(diagonals, ax=left)
    plot.plot_diagonal_statistics(diagonals, ax=right)
    if not report.diagonal_exact:
        left.set_title("Hessian trace per parameter (estimated)")
        right.set_title("Hessian diagonal per parameter (estimated)")
    figs["parameters.png"] = fig

    fig = _figure("landscape_1d.png")
    ax = fig.add_subplot()
    for label, (alphas, losses) in report.landscape_1d.items():
        plot.plot_loss_1d(alphas, losses, label=label, ax=ax)
    ax.set_title("Loss along each direction")
    figs["landscape_1d.png"] = fig

    fig = _figure("landscape_2d.png")
    ax = plot.plot_loss_2d(*report.landscape_2d, ax=fig.add_subplot())
    ax.set_xlabel(f"α ({report.direction_labels[0]})")
    ax.set_ylabel(f"β ({report.direction_labels[1]})")
    figs["landscape_2d.png"] = fig
    return figs


def _num(value: float, name: str, digits: int = 10) -> str:
    """A number as text, with its full value in ``data-value`` under ``data-name``."""
    text = f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return (
        f'<span class="num" data-name="{html.escape(name)}" '
        f'data-value="{float(value)!r}">{text}</span>'
    )


def _eigen_rows(result: Any, prefix: str, label: str) -> str:
    rows = []
    for i, (v, r, c) in enumerate(
        zip(result.eigenvalues.tolist(), result.residuals.tolist(), result.converged.tolist())
    ):
        rows.append(
            f"<tr><td>{label}{i + 1 if label == 'λ' else ('' if i == 0 else f'+{i}')}</td>"
            f"<td>{_num(v, f'{prefix}{i}')}</td><td>{_num(r, f'{prefix}_residual{i}', 3)}</td>"
            f"<td>{'yes' if c else 'no'}</td></tr>"
        )
    return "\n".join(rows)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1060px; margin: 2em auto; color: #222;
       background: #fff; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f3f3f3; } td .num { font-family: ui-monospace, monospace; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.92em; max-width: 900px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.summary { font-size: 1.1em; } .muted { color: #666; }
"""

_CAPTIONS = {
    "eigenvalues.png": (
        "The largest eigenvalues and the most negative ones, with their residual norms as "
        "error bars."
    ),
    "spectral_density.png": (
        "Stochastic Lanczos quadrature (<code>stochastic_lanczos_quadrature</code>): "
        "{probes} Rademacher probes, {steps} Lanczos steps each, Gaussian smoothing of width "
        "σ = {sigma:.3g}; log scale.  Dashed lines: the eigenvalues found by Lanczos above."
    ),
    "parameters.png": (
        "Left: trace of each parameter's Hessian block.  Right: mean of its diagonal (bar) "
        "and the range from the smallest to the largest entry."
    ),
    "landscape_1d.png": "The loss along d₁ and d₂ ({points} points each).",
    "landscape_2d.png": (
        "Contours of the loss on the plane of d₁ and d₂ ({points} × {points} points); "
        "the star marks θ."
    ),
}

_DIRECTIONS_NOTE = {
    "random": (
        "(Li et al. 2018: each filter of a random direction scaled to the norm of the same "
        "filter of the weights; biases fixed)"
    ),
    "eigen": "(unit eigenvectors scaled to the norm of the parameter vector)",
}


def _html(report: CurvatureReport, images: dict[str, bytes], command: str) -> str:
    opts = report.options
    esc = html.escape
    env = report.environment
    if report.diagonal_exact:
        trace_text = f"{_num(report.trace, 'trace', 12)} (exact)"
    else:
        error = _num(report.trace_std_error, "trace_std_error", 3)
        trace_text = (
            f"{_num(report.trace, 'trace', 8)} ± {error} (1 standard error, "
            f"{report.trace_matvecs} Hessian-vector products)"
        )

    def fig(name: str, **fields: Any) -> str:
        data = base64.b64encode(images[name]).decode("ascii")
        w, h = FIGURES[name]
        caption = _CAPTIONS[name].format(**fields)
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(name)}" '
            f'width="{w}" height="{h}" data-file="{esc(name)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    def row(*cells: str, head: bool = False) -> str:
        tag = "th" if head else "td"
        return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"

    summary = [
        row("parameters", f"{report.num_params:,}"),
        row("data", f"{report.num_samples:,} samples in {report.num_batches} batch(es)"),
        row("loss", _num(report.loss, "loss")),
        row("Hessian trace", trace_text),
        row("method", esc(report.trace_method)),
        row("largest eigenvalue", _num(float(report.top.eigenvalues[0]), "top_max")),
    ]
    eigen_rows = _eigen_rows(report.top, "top", "λ")
    if report.bottom is not None:
        lowest = _num(float(report.bottom.eigenvalues[0]), "bottom_min")
        summary.append(row("most negative eigenvalue", lowest))
        eigen_rows += "\n" + _eigen_rows(report.bottom, "bottom", "λmin")
    params = [
        row("parameter", "shape", "trace of block", "mean of diagonal", "min", "max", head=True)
    ]
    for name, shape, d in zip(report.names, report.shapes, report.diagonals):
        params.append(
            row(
                esc(name),
                esc(str(shape)),
                _num(float(d.sum()), f"block_trace:{name}", 6),
                _num(float(d.mean()), f"diag_mean:{name}", 4),
                _num(float(d.min()), f"diag_min:{name}", 4),
                _num(float(d.max()), f"diag_max:{name}", 4),
            )
        )
    timings = [row(esc(k), f"{_num(t, f'time:{k}', 3)} s") for k, t in report.timings.items()]
    environment = [row(esc(k), esc(v)) for k, v in env.items()]
    diag_kind = (
        "exact"
        if report.diagonal_exact
        else f"estimated by Hutchinson's diagonal estimator ({opts.diag_samples} probes)"
    )
    density = report.density
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Curvature report: {esc(report.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Curvature report: {esc(report.title)}</h1>",
        f'<p class="muted">torch-secorder {esc(env.get("torch-secorder", ""))}, '
        f"torch {esc(env.get('torch', ''))}, {esc(env.get('device', ''))}, "
        f"seed {esc(env.get('seed', ''))}.  Command: <code>{esc(command)}</code></p>",
        "<h2>Summary</h2>",
        '<table class="summary">',
        *summary,
        "</table>",
        "<h2>Extreme eigenvalues</h2>",
        "<p>Thick-restart Lanczos (<code>torch_secorder.linalg.lanczos_eigsh</code>) on "
        f"Hessian-vector products, relative tolerance {opts.eig_tol:g}, at most "
        f"{opts.eig_max_iter} products per run.  The residual norm ‖Hy − θy‖ of a returned "
        "pair bounds the distance from θ to an eigenvalue of H.</p>",
        "<table>",
        row("", "eigenvalue", "residual norm", "converged", head=True),
        eigen_rows,
        "</table>",
        fig("eigenvalues.png"),
        "<h2>Spectral density</h2>",
        fig(
            "spectral_density.png",
            probes=density.num_probes,
            steps=density.nodes.shape[1],
            sigma=density.default_sigma(),
        ),
        "<h2>Curvature per parameter</h2>",
        f"<p>The Hessian diagonal is {esc(diag_kind)}; a block's trace is the sum of its "
        "diagonal entries.</p>",
        fig("parameters.png"),
        "<table>",
        *params,
        "</table>",
        "<h2>Loss landscape</h2>",
        f"<p>The loss at θ + α d₁ + β d₂ over all the data, for α, β in [−{opts.span:g}, "
        f"{opts.span:g}].  Directions: {esc(report.direction_labels[0])} (d₁) and "
        f"{esc(report.direction_labels[1])} (d₂) {_DIRECTIONS_NOTE[report.direction_kind]}.</p>",
        fig("landscape_1d.png", points=opts.points_1d),
        fig("landscape_2d.png", points=opts.points_2d),
        "<h2>Timings</h2>",
        '<p class="muted">Each step ran once (first-call costs included).</p>',
        "<table>",
        *timings,
        "</table>",
        "<h2>Environment</h2>",
        "<table>",
        *environment,
        "</table>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _json(report: CurvatureReport, command: str) -> dict[str, Any]:
    def eig(res: Any) -> dict[str, Any] | None:
        if res is None:
            return None
        return {
            "eigenvalues": res.eigenvalues.tolist(),
            "residuals": res.residuals.tolist(),
            "converged": res.converged.tolist(),
            "matvecs": res.iterations,
        }

    return {
        "title": report.title,
        "command": command,
        "num_params": report.num_params,
        "num_samples": report.num_samples,
        "num_batches": report.num_batches,
        "loss": report.loss,
        "trace": report.trace,
        "trace_std_error": report.trace_std_error,
        "trace_method": report.trace_method,
        "trace_exact": report.diagonal_exact,
        "top": eig(report.top),
        "bottom": eig(report.bottom),
        "parameters": [
            {
                "name": name,
                "shape": list(shape),
                "trace": float(d.sum()),
                "diag_mean": float(d.mean()),
                "diag_min": float(d.min()),
                "diag_max": float(d.max()),
            }
            for name, shape, d in zip(report.names, report.shapes, report.diagonals)
        ],
        "timings_s": report.timings,
        "environment": report.environment,
        "options": vars(report.options),
        "figures": {name: list(size) for name, size in FIGURES.items()},
    }


def write_report(report: CurvatureReport, out_dir: str | Path, command: str = "") -> Path:
    """Write the PNGs, ``report.html`` and ``report.json`` into ``out_dir``; return the HTML path.

    Args:
        report: From :func:`~torch_secorder.report.compute.compute_report`.
        out_dir: Directory (created if missing); files of the same names are replaced.
        command: The command line to state in the page.

    Raises:
        ImportError: matplotlib is missing (the message names ``torch-secorder[plot]``).

    Example:
        >>> import tempfile, torch
        >>> from torch_secorder.report.compute import ReportOptions, compute_report
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> options = ReportOptions(top_k=2, bottom_k=1, slq_steps=3, slq_probes=2,
        ...                         points_1d=3, points_2d=3)
        >>> report = compute_report(model, torch.nn.MSELoss(), (x, y), options=options,
        ...                         progress=False)
        >>> page = write_report(report, tempfile.mkdtemp())
        >>> sorted(p.name for p in page.parent.iterdir())  # doctest: +NORMALIZE_WHITESPACE
        ['eigenvalues.png', 'landscape_1d.png', 'landscape_2d.png', 'parameters.png',
         'report.html', 'report.json', 'spectral_density.png']
    """
    plot.require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, fig in _draw(report).items():
        path = out / name
        fig.savefig(path, dpi=DPI, format="png")
        images[name] = path.read_bytes()
    page = out / "report.html"
    page.write_text(_html(report, images, command), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(_json(report, command), indent=2) + "\n")
    return page
