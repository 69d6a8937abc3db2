"""``torch_secorder.plot``: each function draws the numbers it is given (issue 11).

The drawn data are read back from the artists and compared with the library's
results (the SLQ density of a diagonal matrix, eigenpairs of a dense Hessian, an
exact Hessian diagonal, loss surfaces); a figure a function creates saves as a PNG
of ``FIGSIZE * dpi`` pixels with the Agg renderer; bad shapes raise errors naming
the argument; without matplotlib the ImportError names the extra.
"""

from __future__ import annotations

import io
import struct
import sys

import pytest
import torch
from conftest import assert_close, dense_hessian, seeded_tanh_mlp_problem

from torch_secorder import (
    compute_loss_surface_1d,
    compute_loss_surface_2d,
    create_random_direction,
    model_hessian_diagonal,
)
from torch_secorder import plot as tplot
from torch_secorder.linalg import lanczos_eigsh, stochastic_lanczos_quadrature

pytest.importorskip("matplotlib", reason="torch_secorder.plot needs matplotlib (test extra)")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _problem():
    model, x, y = seeded_tanh_mlp_problem(0, 12, 3, 4, 2, "mse")
    return model, torch.nn.MSELoss(), x, y


def test_spectral_density_draws_the_density_and_marks_the_eigenvalues():
    A = torch.diag(torch.tensor([-1.0, 0.5, 0.5, 2.0, 3.0], dtype=torch.float64))
    density = stochastic_lanczos_quadrature(
        lambda V: V @ A, 5, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    ax = tplot.plot_spectral_density(
        density, eigenvalues={"top": [3.0, 2.0], "bottom": torch.tensor([-1.0])}, num_points=200
    )
    line = ax.get_lines()[0]
    grid = density.grid(200)
    expected = density.density(grid)
    expected = expected.clamp_min(1e-8 * float(expected.max()))
    assert_close(torch.as_tensor(line.get_xdata()), grid)
    assert_close(torch.as_tensor(line.get_ydata()), expected)
    assert ax.get_yscale() == "log"
    marks = sorted(float(l.get_xdata()[0]) for l in ax.get_lines()[1:])  # noqa: E741
    assert marks == [-1.0, 2.0, 3.0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["SLQ density", "top", "bottom"]


def test_eigenvalues_with_residual_bars_of_a_dense_hessian():
    model, loss_fn, x, y = _problem()
    params = dict(model.named_parameters())
    H = dense_hessian(lambda p: loss_fn(torch.func.functional_call(model, p, (x,)), y), params)
    res = lanczos_eigsh(lambda V: V @ H, H.shape[0], 3, which="LA", dtype=torch.float64)
    ax = tplot.plot_eigenvalues(res.eigenvalues, res.residuals)
    points = ax.get_lines()[0]
    assert_close(torch.as_tensor(points.get_ydata()), torch.linalg.eigvalsh(H).flip(0)[:3], 1e-8)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["λ1", "λ2", "λ3"]
    with pytest.raises(ValueError, match=r"residuals must have the shape of eigenvalues"):
        tplot.plot_eigenvalues([1.0, 2.0], [0.1])


def test_eigenvalue_history_one_line_per_eigenvalue():
    steps = [0, 10, 20]
    values = torch.tensor([[3.0, 1.0], [4.0, 1.5], [5.0, 2.0]])
    ax = tplot.plot_eigenvalue_history(steps, values)
    lines = ax.get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[3.0, 4.0, 5.0], [1.0, 1.5, 2.0]]
    assert list(lines[0].get_xdata()) == steps
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \(len\(steps\), k\)"):
        tplot.plot_eigenvalue_history([0, 1], values)


def test_parameter_traces_and_diagonal_statistics_of_the_exact_diagonal():
    model, loss_fn, x, y = _problem()
    diag = model_hessian_diagonal(model, loss_fn, x, y, progress=False)
    names = [name for name, _ in model.named_parameters()]
    H = dense_hessian(
        lambda p: loss_fn(torch.func.functional_call(model, dict(zip(names, p)), (x,)), y),
        list(model.parameters()),
    )
    blocks = torch.split(H.diagonal(), [p.numel() for p in model.parameters()])

    ax = tplot.plot_parameter_traces(diag, names)
    heights = torch.tensor([bar.get_height() for bar in ax.patches], dtype=torch.float64)
    assert_close(heights, torch.stack([b.sum() for b in blocks]))
    assert [t.get_text() for t in ax.get_xticklabels()] == names

    ax = tplot.plot_diagonal_statistics(dict(zip(names, diag)))
    means = torch.tensor([bar.get_height() for bar in ax.patches], dtype=torch.float64)
    assert_close(means, torch.stack([b.mean() for b in blocks]))
    segments = ax.collections[0].get_segments()  # the min-to-max ranges
    lows = torch.tensor([s[0][1] for s in segments], dtype=torch.float64)
    highs = torch.tensor([s[1][1] for s in segments], dtype=torch.float64)
    assert_close(lows, torch.stack([b.min() for b in blocks]))
    assert_close(highs, torch.stack([b.max() for b in blocks]))
    with pytest.raises(ValueError, match=r"names must have one entry per diagonal \(4\), got 1"):
        tplot.plot_parameter_traces(diag, ["w"])
    with pytest.raises(ValueError, match=r"at least one parameter"):
        tplot.plot_diagonal_statistics({})


def test_loss_1d_and_2d_draw_the_surfaces():
    model, loss_fn, x, y = _problem()
    g = torch.Generator().manual_seed(1)
    d1 = create_random_direction(model, normalization="filter", generator=g)
    d2 = create_random_direction(model, normalization="filter", generator=g)
    alphas, losses = compute_loss_surface_1d(model, loss_fn, x, y, d1, (-1.0, 1.0), 7)
    ax = tplot.plot_loss_1d(alphas, losses, label="d1")
    assert_close(torch.as_tensor(ax.get_lines()[0].get_ydata()), losses)
    assert_close(torch.as_tensor(ax.get_lines()[0].get_xdata()), alphas)

    a, b, surface = compute_loss_surface_2d(model, loss_fn, x, y, d1, d2, num_points=5)
    ax = tplot.plot_loss_2d(a, b, surface, levels=8)
    filled = ax.collections[0]
    levels = torch.as_tensor(filled.levels)
    # the contour levels span the surface's values
    assert float(levels.min()) <= float(surface.min()) and float(levels.max()) >= float(
        surface.max()
    )
    assert ax.get_xlim() == (float(a[0]), float(a[-1]))
    assert ax.get_ylim() == (float(b[0]), float(b[-1]))
    with pytest.raises(ValueError, match=r"losses must have shape \(len\(alphas\), len\(betas\)\)"):
        tplot.plot_loss_2d(a, b[:3], surface)
    with pytest.raises(ValueError, match=r"losses must have the shape of alphas"):
        tplot.plot_loss_1d(alphas, losses[:3])
    with pytest.raises(TypeError, match=r"alphas must be a tensor or a sequence of numbers"):
        tplot.plot_loss_1d(object(), losses)


def test_a_new_figure_saves_with_agg_at_its_size():
    ax = tplot.plot_loss_1d([0.0, 1.0], [1.0, 2.0])
    buffer = io.BytesIO()
    ax.figure.savefig(buffer, format="png", dpi=50)
    assert _png_size(buffer.getvalue()) == (350, 210)  # FIGSIZE (7, 4.2) inches at 50 dpi
    assert type(ax.figure.canvas).__name__ == "FigureCanvasBase"  # no GUI backend involved


def test_user_axes_are_drawn_on_not_replaced():
    left = tplot.new_axes()
    fig = left.figure
    right = fig.add_subplot(1, 2, 2)
    assert tplot.plot_loss_1d([0.0, 1.0], [1.0, 2.0], ax=right) is right
    assert right.figure is fig and len(right.get_lines()) == 2  # the data and the line at 0


def test_without_matplotlib_an_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install torch-secorder\[plot\]"):
        tplot.plot_loss_1d([0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ImportError, match=r"pip install torch-secorder\[plot\]"):
        tplot.require_matplotlib()
