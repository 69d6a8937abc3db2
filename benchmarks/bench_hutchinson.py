"""Hutchinson trace: time per probe, ours (every strategy) against the peers, one process.

Issue 2's target: on the 2-core CPU, per-probe time at most the fastest of
PyHessian 0.1, curvlinops 3.0.1 and torch-secorder 0.0.1, on the 784-256-256-10
tanh MLP (batch 256) and a small tanh CNN (two 3x3 convolutions, batch 64).

Every implementation runs the whole estimate (gradient graph or forward pass
included, as a user would call it) with ``m`` probes; the table shows the time
per probe and peer/ours ratios (above 1: ours is faster).

    python benchmarks/bench_hutchinson.py [--threads 2] [--probes 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import mlp_784_256_256_10, tanh_cnn  # noqa: E402
from benchmarks._peers import load_curvlinops, load_pyhessian, load_secorder_001  # noqa: E402
from benchmarks._timing import print_table, time_call  # noqa: E402
from torch_secorder.core.hessian_trace import model_hessian_trace_estimate  # noqa: E402


def ours(problem, probes: int, strategy: str, chunk: int | None):
    gen = torch.Generator().manual_seed(0)
    return lambda: model_hessian_trace_estimate(
        problem.model,
        problem.loss_fn,
        problem.inputs,
        problem.targets,
        probes,
        generator=gen,
        strategy=strategy,
        chunk_size=chunk,
        progress=False,
    )


def peers(problem, probes: int, device: str = "cpu") -> dict:
    """The peers' Hutchinson runs on ``problem`` (a skip reason where a peer is missing)."""
    out: dict = {}
    pyhessian = load_pyhessian()
    if pyhessian.module is None:
        out["pyhessian"] = pyhessian.reason
    else:
        from pyhessian import hessian

        def run_pyhessian():
            h = hessian(
                problem.model,
                problem.loss_fn,
                data=(problem.inputs, problem.targets),
                cuda=device.startswith("cuda"),
            )
            return h.trace(maxIter=probes, tol=float("-inf"))

        out["pyhessian"] = run_pyhessian
    curvlinops = load_curvlinops()
    if curvlinops.module is None:
        out["curvlinops"] = curvlinops.reason
    else:
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.hutchinson import hutchinson_trace

        def run_curvlinops():
            H = HessianLinearOperator(
                problem.model,
                problem.loss_fn,
                problem.params,
                [(problem.inputs, problem.targets)],
                check_deterministic=False,
            )
            return hutchinson_trace(H, probes)

        out["curvlinops"] = run_curvlinops
    old = load_secorder_001()
    if old.module is None:
        out["secorder-0.0.1"] = old.reason
    else:
        out["secorder-0.0.1"] = lambda: old.module.hvp.hessian_trace(
            problem.loss, problem.params, num_samples=probes
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problems = {
        "mlp 784-256-256-10 b256": mlp_784_256_256_10(batch=256, device=args.device),
        "tanh cnn b64": tanh_cnn(batch=64, device=args.device),
    }
    rows = []
    for name, problem in problems.items():
        row: dict = {"case": f"{name} (n={problem.n_params:,})"}
        candidates = {
            "auto": ours(problem, args.probes, "auto", None),
            "graph": ours(problem, args.probes, "graph", None),
            "graph_batched/8": ours(problem, args.probes, "graph_batched", 8),
            "vmap/8": ours(problem, args.probes, "vmap", 8),
            "vmap/32": ours(problem, args.probes, "vmap", 32),
        }
        runners = {}
        for label, fn in {**candidates, **peers(problem, args.probes)}.items():
            if isinstance(fn, str):
                row[label] = fn
            else:
                runners[label] = fn
        # Interleaved rounds in a shuffled order, so that no implementation always
        # runs first (allocator and cache warm-up) or last; median over rounds.
        times: dict[str, list[float]] = {label: [] for label in runners}
        order = list(runners)
        rng = random.Random(0)
        for label in order:  # warm-up
            runners[label]()
        for _ in range(args.repeats):
            rng.shuffle(order)
            for label in order:
                times[label].append(time_call(runners[label], repeats=1, warmup=0))
        for label, values in times.items():
            row[label] = statistics.median(values) / args.probes
        rows.append(row)
    print(
        f"Hutchinson, seconds per probe ({args.probes} probes, {args.threads} threads, "
        f"{args.device}, float32); ratios are peer/auto"
    )
    print_table(rows, ours="auto")


if __name__ == "__main__":
    main()
