"""``python -m torch_secorder``: the Hessian trace and diagonal of a built-in model.

On a small tanh network and synthetic data (no download) it prints the exact
Hessian trace, Hutchinson's estimate with its standard error, a summary of the
exact diagonal per parameter, and how long each took: the time of a warm call
(each computation runs once before it is timed) and, in brackets, that of the
first call (which includes one-time costs: lazy initialisation, allocations).
``--help`` lists options.

``python -m torch_secorder report [options]`` writes a curvature report (HTML and
PNGs: trace, eigenvalues, spectral density, per-parameter curvature, loss
landscapes) of the built-in problem or of a user's model; ``report --help`` lists
its options (see :mod:`torch_secorder.report.cli`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from torch_secorder._cli_args import int_at_least, seed_below
from torch_secorder.core.hessian_diagonal import model_hessian_diagonal
from torch_secorder.core.hessian_trace import model_hessian_trace, model_hessian_trace_estimate


def _mlp(generator: torch.Generator, dtype: torch.dtype):
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    inputs = torch.randn(256, 32, generator=generator, dtype=dtype)
    targets = torch.randint(0, 10, (256,), generator=generator)
    return model, nn.functional.cross_entropy, inputs, targets


def _cnn(generator: torch.Generator, dtype: torch.dtype):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 12 * 12, 10),
    )
    inputs = torch.randn(32, 3, 16, 16, generator=generator, dtype=dtype)
    targets = torch.randint(0, 10, (32,), generator=generator)
    return model, nn.functional.cross_entropy, inputs, targets


def _transformer(generator: torch.Generator, dtype: torch.dtype):
    model = nn.Sequential(
        nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        ),
        nn.Flatten(),
        nn.Linear(16 * 8, 1),
    )
    inputs = torch.randn(16, 8, 16, generator=generator, dtype=dtype)
    targets = torch.randn(16, 1, generator=generator, dtype=dtype)
    return model, nn.functional.mse_loss, inputs, targets


MODELS: dict[str, Callable] = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}


def _timed(fn: Callable) -> tuple[object, float, float]:
    """``(result, warm seconds, first-call seconds)``: ``fn`` runs twice, the second is timed."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, first


def _seconds(warm: float, first: float) -> str:
    return f"({warm:.3f} s warm; first call {first:.3f} s)"


#: argparse types (a bad value is an argparse error, exit status 2)
_positive_int = int_at_least(1)
_seed = seed_below(2**63)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from torch_secorder.report.cli import main as report_main

        return report_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m torch_secorder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument(
        "--samples", type=_positive_int, default=100, help="Hutchinson probes (an int >= 1)"
    )
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (an int >= 0)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model, loss_fn, inputs, targets = MODELS[args.model](generator, dtype)
    model = model.to(dtype)
    n = sum(p.numel() for p in model.parameters())
    progress = not args.no_progress
    print(
        f"model: {args.model}, {n:,} parameters, inputs {tuple(inputs.shape)}, {args.dtype}, "
        f"{torch.get_num_threads()} threads"
    )

    exact, t_exact, first_exact = _timed(
        lambda: model_hessian_trace(model, loss_fn, inputs, targets, progress=progress)
    )
    print(f"exact trace:       {exact.item(): .10g}   {_seconds(t_exact, first_exact)}")

    est, t_est, first_est = _timed(
        lambda: model_hessian_trace_estimate(
            model,
            loss_fn,
            inputs,
            targets,
            num_samples=args.samples,
            generator=torch.Generator().manual_seed(args.seed),
            progress=progress,
        )
    )
    if args.samples > 1:
        z = ((est.estimate - exact) / est.std_error).item()
        error_bar = f"+- {est.std_error.item():.3g} (1 s.e.; off by {z:+.2f} s.e.)"
    else:
        error_bar = "(one probe: no error bar)"
    print(
        f"Hutchinson ({args.samples} probes): {est.estimate.item(): .6g} {error_bar}   "
        f"{_seconds(t_est, first_est)}"
    )

    diag, t_diag, first_diag = _timed(
        lambda: model_hessian_diagonal(model, loss_fn, inputs, targets, progress=progress)
    )
    print(f"exact diagonal:    {_seconds(t_diag, first_diag)}")
    print(f"  {'parameter':<28}{'shape':<16}{'sum':>13}{'mean':>13}{'min':>13}{'max':>13}")
    for (name, p), d in zip(model.named_parameters(), diag):
        print(
            f"  {name:<28}{str(tuple(p.shape)):<16}{d.sum().item():>13.5g}"
            f"{d.mean().item():>13.5g}{d.min().item():>13.5g}{d.max().item():>13.5g}"
        )
    total = sum(d.sum() for d in diag)
    print(f"  sum of the diagonal = {total.item():.10g} (= exact trace)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
