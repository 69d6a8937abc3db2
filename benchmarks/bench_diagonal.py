"""Exact Hessian diagonal: ours (model and closure form) against BackPACK, 0.0.1, the sweep.

Side by side in one process, same data, same dtype; every timing is a median
(:func:`benchmarks._timing.time_call`; ours in the model and in the closure form
interleaved call by call, so that load on a shared machine hits both alike) and
every other result is checked against ours (max abs difference printed).  Ratios
in the table are peer / ours, ours being the model form
``model_hessian_diagonal(model, loss_fn, x, y)`` (above 1: ours is faster).
Below the table, the closure form ``hessian_diagonal(lambda: loss_fn(model(x), y),
params)``, the documented 0.0.1 API, against the model form and the peers.

    python benchmarks/bench_diagonal.py            # all cases
    python benchmarks/bench_diagonal.py --quick    # fewer repeats

Cases (float64, tanh MLPs with cross-entropy unless said):

* ``mlp_30_30_10`` (n = 1,240, batch 64): vs 0.0.1 ``hessian_diagonal``.
* ``mlp_100_100_10`` (n = 11,110, batch 64): vs BackPACK 1.7.1 ``DiagHessian``.
* ``mlp_784_256_256_10`` (MSE, batch 256): vs BackPACK.
* a small tanh CNN and a small transformer block: vs the generic sweep
  (:func:`torch_secorder.func.hessian_diagonal`) and, for the CNN, BackPACK.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._models import (  # noqa: E402
    mlp,
    mlp_784_256_256_10,
    tanh_cnn,
    tiny_transformer_block,
)
from benchmarks._peers import load_backpack, load_secorder_001  # noqa: E402
from benchmarks._timing import busy_warning, print_table, sync, time_call  # noqa: E402
from torch_secorder.core import hessian_diagonal as closure_hessian_diagonal  # noqa: E402
from torch_secorder.core import model_hessian_diagonal  # noqa: E402
from torch_secorder.func import diagonal_plan, hessian_diagonal  # noqa: E402
from torch_secorder.problems._problem import module_problem  # noqa: E402


def ours(problem):
    model, loss_fn, x, y = problem
    return lambda: model_hessian_diagonal(model, loss_fn, x, y, progress=False)


def closure_form(problem):
    model, loss_fn, x, y = problem
    params = list(model.parameters())
    return lambda: closure_hessian_diagonal(lambda: loss_fn(model(x), y), params, progress=False)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, the calls alternating (one of each per round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sweep(problem):
    model, loss_fn, x, y = problem

    def run():
        with module_problem(model, loss_fn, x, y) as p:
            return list(hessian_diagonal(p.pure, p.primals))

    return run


def backpack_diag(problem):
    bp = load_backpack()
    if not bp:
        return None, bp.reason
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model, loss_fn, x, y = problem
    model, loss_fn = extend(model), extend(loss_fn)

    def run():
        model.zero_grad()
        with backpack(DiagHessian()):
            loss_fn(model(x), y).backward()
        return [p.diag_h.detach().clone() for p in model.parameters()]

    return run, None


def old_diag(problem):
    old = load_secorder_001()
    if not old:
        return None, old.reason
    model, loss_fn, x, y = problem
    params = list(model.parameters())

    def run():
        return old.module.hessian_diagonal(lambda: loss_fn(model(x), y), params)

    return run, None


def max_diff(a, b) -> float:
    pairs = zip(a, b, strict=True)
    return max(float((u.reshape(-1) - v.reshape(-1)).abs().max()) for u, v in pairs)


def plan(problem) -> str:
    model, loss_fn, x, y = problem
    with module_problem(model, loss_fn, x, y) as p:
        routes = diagonal_plan(p.pure, p.primals)
    return ",".join(sorted(set(routes)))


def main() -> None:  # noqa: C901 - one loop over the cases and their peers
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    reps = 3 if args.quick else 9
    dt = torch.float64
    rows, notes, closure_notes = [], [], []

    cases = [
        ("mlp_30_30_10 ce (b64)", mlp((30, 30, 10), 64, "ce", dt), ["0.0.1"]),
        ("mlp_100_100_10 ce (b64)", mlp((100, 100, 10), 64, "ce", dt), ["backpack"]),
        ("mlp_784_256_256_10 (b256)", mlp_784_256_256_10(dtype=dt, batch=256), ["backpack"]),
        (
            "tanh_cnn c4 8x8 (b16)",
            tanh_cnn(dtype=dt, batch=16, size=8, channels=4),
            ["sweep", "backpack"],
        ),
        (
            "transformer d16 s8 (b8)",
            tiny_transformer_block(dtype=dt, batch=8, seq=8, d=16, heads=2),
            ["sweep"],
        ),
    ]
    for name, problem, peers in cases:
        mine, closure = ours(problem), closure_form(problem)
        reference = mine()
        timed = interleaved({"ours": mine, "closure": closure}, reps)
        row = {"case": name, "ours": timed["ours"], "closure": timed["closure"]}
        notes.append(f"{name}: n = {problem.n_params:,}, routes: {plan(problem)}")
        notes.append(f"{name}: max |ours - closure| = {max_diff(reference, closure()):.1e}")
        for peer in peers:
            if peer == "sweep":
                fn, why = sweep(problem), None
            elif peer == "backpack":
                fn, why = backpack_diag(problem)
            else:
                fn, why = old_diag(problem)
            if fn is None:
                row[peer] = why
                continue
            slow = peer in ("sweep", "0.0.1")
            # The sweep's first call pays a one-off warm-up of the vmapped kernels
            # (about 2 s for the CNN): warm it up like ours; 0.0.1 is too slow for that.
            row[peer] = time_call(
                fn, repeats=1 if slow else reps, warmup=0 if peer == "0.0.1" else 1
            )
            notes.append(f"{name}: max |ours - {peer}| = {max_diff(reference, fn()):.1e}")
        rows.append(row)
        line = f"{name}: closure / model = {row['closure'] / row['ours']:.2f}"
        for peer in peers:
            if isinstance(row.get(peer), float):
                line += f", {peer} / closure = {row[peer] / row['closure']:.2f}"
        closure_notes.append(line)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, CPU")
    warning = busy_warning()
    if warning:
        print(warning)
    print_table(rows)
    for n in notes:
        print(" ", n)
    print("closure form (hessian_diagonal(closure, params)) against the model form and the peers:")
    for n in closure_notes:
        print(" ", n)


if __name__ == "__main__":
    main()
