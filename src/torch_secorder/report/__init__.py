"""The curvature report: ``python -m torch_secorder report`` (see :mod:`torch_secorder.report.cli`).

:func:`compute_report` computes the numbers (a :class:`CurvatureReport`) of a model,
a loss and data with the library's public functions; :func:`write_report` draws the
figures with :mod:`torch_secorder.plot` and writes ``report.html`` (self-contained),
the PNGs and ``report.json``; :func:`main` is the command.
"""

from torch_secorder.report._default import default_problem
from torch_secorder.report.cli import main
from torch_secorder.report.compute import CurvatureReport, ReportOptions, compute_report
from torch_secorder.report.render import FIGURES, write_report

__all__ = [
    "FIGURES",
    "CurvatureReport",
    "ReportOptions",
    "compute_report",
    "default_problem",
    "main",
    "write_report",
]
