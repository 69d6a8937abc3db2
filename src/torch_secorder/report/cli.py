"""``python -m torch_secorder report``: a curvature report of a model, as HTML and PNGs.

Without ``--model`` the report is of a built-in problem (a small tanh network
briefly trained on synthetic data: no download, well under a minute on two CPU
cores).  With ``--model package.module:factory`` and ``--data
package.module:factory`` it is of the user's model: the model factory returns an
``nn.Module``, the data factory an ``(inputs, targets)`` pair of tensors or a
``DataLoader`` of such pairs (the Hessian is that of the loss over all of it).
Both are called without arguments, after ``torch.manual_seed(--seed)``.

The report (``--out``, default ``./curvature_report``): ``report.html`` (self-contained,
the figures embedded), the figures as PNG files, ``report.json`` with the numbers.
It states the Hessian trace (exact where affordable, else an estimate with its
error bar and the method), the largest and the most negative eigenvalues with their
residual norms, the spectral density (SLQ, log scale, the Lanczos eigenvalues
marked), the trace and diagonal statistics per parameter, the loss along one and
two directions (filter-normalised random directions, or the top eigenvectors with
``--directions eigen``), and how long each step took, with the library and torch
versions, the device and the seed.  Matplotlib is needed: ``pip install
torch-secorder[plot]``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from collections.abc import Sequence

import torch

from torch_secorder._cli_args import int_at_least, positive_float, seed_below
from torch_secorder.report._default import DEFAULT_TRAIN_STEPS, default_problem
from torch_secorder.report._loading import (
    LOSSES,
    FactoryError,
    LoadError,
    load_data,
    load_loss,
    load_model,
    place,
)
from torch_secorder.report.compute import DIRECTIONS, TRACE_MODES, ReportOptions, compute_report
from torch_secorder.report.render import FIGURES, write_report

__all__ = ["build_parser", "main"]

PROG = "python -m torch_secorder report"


_int_at_least = int_at_least
_positive_float = positive_float
#: seeds up to 2**63 - 16: each step seeds its own generator with seed + k
_seed = seed_below(2**63 - 16)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module doc as written, and each option's default (if it has one) after its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the report command."""
    d = ReportOptions()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=_Formatter)
    what = p.add_argument_group("what to analyse")
    what.add_argument(
        "--model",
        metavar="package.module:factory",
        help="a callable returning the nn.Module (without it: the built-in problem)",
    )
    what.add_argument(
        "--data",
        metavar="package.module:factory",
        help="a callable returning an (inputs, targets) pair or a DataLoader (with --model)",
    )
    what.add_argument(
        "--loss",
        metavar="NAME",
        help=f"{' or '.join(sorted(LOSSES))} or package.module:name (a function "
        "loss_fn(outputs, targets) or an nn.Module class); cross_entropy if not given",
    )
    what.add_argument(
        "--reduction",
        choices=["mean", "sum"],
        help="how a loss function that does not say reduces a batch (needed for a DataLoader)",
    )
    what.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (without it: where the model is)")
    what.add_argument(
        "--dtype", choices=["float32", "float64"], help="cast model and data (without it: as given)"
    )
    what.add_argument(
        "--train-steps",
        type=_int_at_least(0),
        default=DEFAULT_TRAIN_STEPS,
        help="Adam steps of the built-in model before the report",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", default="curvature_report", metavar="DIR", help="output directory")
    out.add_argument("--seed", type=_seed, default=0, help="seed of every random draw")
    out.add_argument("--quiet", action="store_true", help="no progress bars, no summary")
    how = p.add_argument_group("what to compute")
    how.add_argument("--top-k", type=_int_at_least(1), default=d.top_k, help="largest eigenvalues")
    how.add_argument(
        "--bottom-k", type=_int_at_least(0), default=d.bottom_k, help="most negative eigenvalues"
    )
    how.add_argument(
        "--eig-tol", type=_positive_float, default=d.eig_tol, help="relative residual tolerance"
    )
    how.add_argument(
        "--eig-iters",
        type=_int_at_least(1),
        default=d.eig_max_iter,
        help="most Hessian-vector products per eigensolver run",
    )
    how.add_argument(
        "--trace",
        choices=TRACE_MODES,
        default=d.trace,
        help="exact trace and diagonal, or estimates",
    )
    how.add_argument(
        "--exact-limit",
        type=_int_at_least(0),
        default=d.exact_limit,
        help="--trace auto: exact up to this many parameters, else estimated",
    )
    how.add_argument(
        "--slq-steps", type=_int_at_least(1), default=d.slq_steps, help="Lanczos steps per probe"
    )
    how.add_argument(
        "--slq-probes", type=_int_at_least(1), default=d.slq_probes, help="spectral density probes"
    )
    how.add_argument(
        "--directions",
        choices=DIRECTIONS,
        default=d.directions,
        help="landscape directions: filter-normalised random ones, or the top eigenvectors",
    )
    how.add_argument(
        "--span", type=_positive_float, default=d.span, help="landscape range [-span, span]"
    )
    how.add_argument(
        "--points-1d", type=_int_at_least(2), default=d.points_1d, help="points of a 1D landscape"
    )
    how.add_argument(
        "--points-2d", type=_int_at_least(2), default=d.points_2d, help="points per axis in 2D"
    )
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report command; return the exit status (argparse errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together (neither: the built-in problem)")
    device = None
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"argument --device: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device!r}, but CUDA is not available")
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        from torch_secorder.plot import require_matplotlib

        require_matplotlib()
    except ImportError as exc:
        return _fail(str(exc))

    torch.manual_seed(args.seed)
    try:
        if args.model is None:
            model, loss_fn, data = default_problem(args.seed, args.train_steps)
            title = (
                "built-in tanh MLP 16-32-32-4 on 512 synthetic samples "
                f"({args.train_steps} Adam steps)"
            )
            if args.loss is not None:
                loss_fn = load_loss(args.loss)
        else:
            model = load_model(args.model)
            data = load_data(args.data)
            loss_fn = load_loss(args.loss or "cross_entropy")
            title = f"{args.model} on {args.data}"
    except LoadError as exc:
        parser.error(str(exc))
    except FactoryError as exc:
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        return _fail(str(exc))

    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
        data = place(data, device, dtype)
    options = ReportOptions(
        top_k=args.top_k,
        bottom_k=args.bottom_k,
        eig_tol=args.eig_tol,
        eig_max_iter=args.eig_iters,
        slq_steps=args.slq_steps,
        slq_probes=args.slq_probes,
        trace=args.trace,
        exact_limit=args.exact_limit,
        directions=args.directions,
        span=args.span,
        points_1d=args.points_1d,
        points_2d=args.points_2d,
    )
    try:
        report = compute_report(
            model,
            loss_fn,
            data,
            title=title,
            seed=args.seed,
            options=options,
            reduction=args.reduction,
            progress=not args.quiet,
        )
    except (ValueError, TypeError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    command = " ".join([PROG, *map(shlex.quote, argv)])
    page = write_report(report, args.out, command)
    if not args.quiet:
        trace = f"{report.trace:.10g}" + (
            " (exact)" if report.diagonal_exact else f" ± {report.trace_std_error:.3g} (estimate)"
        )
        print(f"{title}: {report.num_params:,} parameters, {report.num_samples:,} samples")
        print(f"Hessian trace: {trace}")
        print(f"largest eigenvalue: {float(report.top.eigenvalues[0]):.10g}")
        if report.bottom is not None:
            print(f"most negative eigenvalue: {float(report.bottom.eigenvalues[0]):.10g}")
    print(f"report: {page}")
    print("figures: " + ", ".join(str(page.parent / name) for name in FIGURES))
    print(f"numbers: {page.parent / 'report.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
