"""Which exact route the fast diagonal should take: each route forced, timed side by side.

The calibration behind the graph route's cost model (``COST_RATIO``, ``CONV_WORK`` in
``torch_secorder.func._graph``): on one problem, the default plan, the graph route
forced (every origin of columns kept), the tangent route forced (every origin
declined) and the one-hot sweep, each timed once after a warm-up call, float64, with
the graph route's estimated sweep / graph work ratio for the most expensive origin.
The ratio columns are sweep / route: above 1, the route beats the sweep.

    python benchmarks/bench_diagonal_routes.py                       # tanh ResNet, transformer
    python benchmarks/bench_diagonal_routes.py --case transformer64  # 64 tokens (minutes)

Cases: ``tanh_resnet`` and ``transformer`` are bench_diagonal_architectures.py's;
``transformer64`` is the same transformer on 64 tokens, batch 4 (its attention's
residual columns exceed ``RESIDUAL_ENTRIES``, so "graph forced" crosses it by tangents
too).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import diagonal_settings as ds  # noqa: E402

import torch_secorder.func._graph as graph  # noqa: E402
from benchmarks._timing import busy_warning  # noqa: E402
from benchmarks.bench_diagonal_architectures import (  # noqa: E402
    TokenTransformer,
    sweep,
    tanh_resnet,
    transformer,
)
from torch_secorder.func import diagonal_plan, fast_hessian_diagonal  # noqa: E402
from torch_secorder.func._tape import record  # noqa: E402
from torch_secorder.func.fast_diagonal import _find_sites  # noqa: E402

CASES = ("tanh_resnet", "transformer", "transformer64")


def transformer64() -> ds.Built:
    torch.manual_seed(0)
    model = TokenTransformer().to(torch.float64).eval()
    idx = torch.randint(0, 128, (4, 64))
    return ds.Built(model, torch.nn.CrossEntropyLoss(), idx, torch.randint(0, 10, (4,)))


def _once(run: Callable[[], object]) -> float:
    run()  # warm-up (first-call imports, allocator)
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _forced(cost_ratio: float, small_cost: float, run: Callable[[], object]):
    def forced() -> object:
        saved = graph.COST_RATIO, graph.SMALL_COST
        graph.COST_RATIO, graph.SMALL_COST = cost_ratio, small_cost
        try:
            return run()
        finally:
            graph.COST_RATIO, graph.SMALL_COST = saved

    return forced


def _estimate(f, params) -> float:
    """The smallest sweep / graph work ratio over the origins of the unblocked plan."""
    calls, value = record(f, params)
    leaves = list(params.values())
    plan = graph._Plan(calls, value, _find_sites(calls, leaves), 0)
    saved = graph.SMALL_COST
    graph.SMALL_COST = -1.0
    try:
        costs = plan.origin_costs()
    finally:
        graph.SMALL_COST = saved
    return min((sweep_work / cost for _, cost, sweep_work in costs), default=float("inf"))


def case(label: str, built: ds.Built) -> dict:
    model, loss_fn, x, y = built
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    routes = sorted(set(diagonal_plan(f, params).values()))
    times = {
        "default": _once(lambda: fast_hessian_diagonal(f, params)),
        "graph": _once(_forced(0.0, 1e8, lambda: fast_hessian_diagonal(f, params))),
        "tangent": _once(_forced(1e9, -1.0, lambda: fast_hessian_diagonal(f, params))),
    }
    estimate = _estimate(f, params)
    times["sweep"] = _once(sweep(built))
    row = {"case": f"{label} ({'+'.join(routes)})"}
    for key in ("default", "graph", "tangent"):
        row[key] = f"{times[key]:.4g} ms ({times['sweep'] / times[key]:.2f}x)"
    row["sweep"] = f"{times['sweep']:.4g} ms"
    row["estimate"] = f"{estimate:.2f}"
    print("  done:", row, file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", choices=CASES, help="repeatable")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    makers = {
        "tanh_resnet": tanh_resnet,
        "transformer": transformer,
        "transformer64": transformer64,
    }
    rows = [case(name, makers[name]()) for name in args.case or ["tanh_resnet", "transformer"]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, CPU")
    warning = busy_warning()
    if warning:
        print(warning)
    for row in rows:
        print("  ".join(f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
