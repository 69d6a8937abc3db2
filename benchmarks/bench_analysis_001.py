"""Approximations (Fisher, GGN) and analysis (eigensolvers, landscapes) vs torch-secorder 0.0.1.

One process, same model and data for both: the tanh MLP 20-64-32-5 (3,589
parameters, batch 64) of ``_models.mlp_few_thousand`` (MSE, and cross-entropy
for the type-2 Fisher).  Prints the median time of each call and the ratio
``0.0.1 / ours`` (above 1: ours faster).  Most 0.0.1 functions here compute a
different (wrong) quantity: the "what" column says what each side computes, so a
ratio compares the cost of the call a user makes, not equal work.  For the
eigensolvers, the error of the top eigenvalues against a tight reference run is
printed too.

    python benchmarks/bench_analysis_001.py [--device cuda] [--dtype float64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import mlp_few_thousand  # noqa: E402
from _peers import load_secorder_001  # noqa: E402
from _timing import busy_warning, print_table, time_call  # noqa: E402

import torch_secorder as ours  # noqa: E402


def paired(mine, theirs, repeats: int) -> tuple[float, float]:
    """Median times, measured alternately so that machine load hits both alike."""
    mine()
    theirs()
    a, b = [], []
    for _ in range(repeats):
        a.append(time_call(mine, repeats=1, warmup=0))
        b.append(time_call(theirs, repeats=1, warmup=0))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)

    old, why = load_secorder_001()
    if old is None:
        print(f"torch-secorder 0.0.1 skipped: {why}")
        return
    warning = busy_warning()
    if warning:
        print(warning)

    model, loss_fn, x, y = mlp_few_thousand(args.batch, dtype=dtype, device=dev)
    cmodel, closs, cx, cy = mlp_few_thousand(args.batch, dtype=dtype, device=dev, loss="ce")
    n = sum(p.numel() for p in model.parameters())
    print(f"model: 20-64-32-5 tanh MLP, n={n}, batch {args.batch}, {args.dtype} on {dev}")
    rows = []
    notes = []

    def case(name, what, mine, theirs, repeats=args.repeats):
        t_ours, t_old = paired(mine, theirs, repeats)
        rows.append({"case": name, "ours": t_ours, "0.0.1": t_old})
        print(f"  ... {name}: ours {t_ours * 1e3:.3g} ms, 0.0.1 {t_old * 1e3:.3g} ms", flush=True)
        notes.append(f"  {name}: {what}")

    # ---- approximations -------------------------------------------------------------
    case(
        "empirical_fisher_diagonal",
        "ours: mean of per-sample squared gradients (vmap); 0.0.1: squared batch gradient",
        lambda: ours.empirical_fisher_diagonal(model, loss_fn, x, y),
        lambda: old.empirical_fisher_diagonal(model, loss_fn, x, y),
    )
    case(
        "empirical_fisher_trace",
        "ours: exact (1/N) sum ||g_i||^2; 0.0.1: ||batch gradient||^2",
        lambda: ours.empirical_fisher_trace(model, loss_fn, x, y),
        lambda: old.empirical_fisher_trace(model, loss_fn, x, y),
    )
    case(
        "generalized_fisher_diagonal (CE)",
        "ours: exact type-2 Fisher, C=5 backward rows per sample through the batch graph; "
        "0.0.1: squared gradient of the observed log-likelihood",
        lambda: ours.generalized_fisher_diagonal(cmodel, cmodel(cx), cy),
        lambda: old.generalized_fisher_diagonal(cmodel, cmodel(cx), cy),
    )
    case(
        "generalized_fisher_diagonal (CE, MC 1)",
        "ours: Monte Carlo, one sampled label per sample; 0.0.1: as above",
        lambda: ours.generalized_fisher_diagonal(cmodel, cmodel(cx), cy, num_samples=1),
        lambda: old.generalized_fisher_diagonal(cmodel, cmodel(cx), cy),
    )
    case(
        "generalized_fisher_trace (CE)",
        "ours: exact type-2 Fisher trace; 0.0.1: as its diagonal, summed",
        lambda: ours.generalized_fisher_trace(cmodel, cmodel(cx), cy),
        lambda: old.generalized_fisher_trace(cmodel, cmodel(cx), cy),
    )
    case(
        "gauss_newton_matrix_approximation",
        "ours: exact diag of the GGN J^T H J; 0.0.1: diag(J^T J) by one backward per output (320)",
        lambda: ours.gauss_newton_matrix_approximation(model, loss_fn, x, y),
        lambda: old.gauss_newton_matrix_approximation(model, loss_fn, x, y),
        repeats=max(1, args.repeats // 2),
    )

    # ---- eigensolvers -----------------------------------------------------------------
    def lf(m, data, target):
        return loss_fn(m(data), target)

    ref, _ = ours.model_eigenvalues(model, lf, x, y, 3, "lanczos", 400, 1e-10)
    accuracy = []
    for method in ("lanczos", "power_iteration"):
        for k in (1, 3):
            results = {}

            def mine(method=method, k=k, results=results):
                g = torch.Generator(device=dev).manual_seed(0)
                results["ours"] = ours.model_eigenvalues(
                    model, lf, x, y, k, method, 100, 1e-6, generator=g
                )[0]

            def theirs(method=method, k=k, results=results):
                results["old"] = old.estimate_eigenvalues(model, lf, x, y, k, method, 100, 1e-6)[0]

            case(
                f"model_eigenvalues {method} k={k}",
                "ours: stops on Ritz residuals (tol 1e-6); 0.0.1: "
                + ("100 steps, no reorthogonalisation" if method == "lanczos" else "|dlambda|<tol"),
                mine,
                theirs,
                repeats=max(1, args.repeats // 2),
            )
            err = {
                key: float(((val.to(ref) - ref[:k]).abs() / ref[:k].abs()).max())
                for key, val in results.items()
            }
            accuracy.append(
                f"  {method} k={k}: max relative error of top-{k} vs a tol-1e-10 run: "
                f"ours {err['ours']:.1e}, 0.0.1 {err['old']:.1e}"
            )

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    spectrum = torch.cat([torch.tensor([50.0, -40.0, 30.0]), torch.randn(n - 3, generator=g)])
    A = ((Q * spectrum.to(dtype)) @ Q.T).to(dev)
    case(
        "lanczos (dense matvec, k=3)",
        f"plain {n}x{n} symmetric matrix, num_iterations=100, tol=1e-6",
        lambda: ours.lanczos(lambda v: A @ v, n, 100, 3, 1e-6, dev, dtype=dtype),
        lambda: old.eigensolvers.lanczos(lambda v: A @ v, n, 100, 3, 1e-6, dev),
    )
    case(
        "power_iteration (dense matvec, k=3)",
        "same matrix, num_iterations=100, tol=1e-6",
        lambda: ours.power_iteration(lambda V: A @ V, n, 100, 3, 1e-6, dev, dtype=dtype),
        lambda: old.power_iteration(lambda V: A @ V, n, 100, 3, 1e-6, dev),
    )

    # ---- landscape --------------------------------------------------------------------
    d1 = ours.create_random_direction(model)
    d2 = ours.create_random_direction(model)
    case(
        "create_random_direction",
        "ours: filter-normalised (Li et al.); 0.0.1: unit norm per parameter",
        lambda: ours.create_random_direction(model),
        lambda: old.landscape.create_random_direction(model),
    )
    case(
        "compute_loss_surface_1d (50 points)",
        "same quantity; ours vmapped in chunks, 0.0.1 a loop writing p.data",
        lambda: ours.compute_loss_surface_1d(model, loss_fn, x, y, d1),
        lambda: old.compute_loss_surface_1d(model, loss_fn, x, y, d1),
    )
    case(
        "compute_loss_surface_2d (25x25)",
        "same quantity",
        lambda: ours.compute_loss_surface_2d(model, loss_fn, x, y, d1, d2),
        lambda: old.compute_loss_surface_2d(model, loss_fn, x, y, d1, d2),
        repeats=max(1, args.repeats // 2),
    )
    a_ours = ours.compute_loss_surface_2d(model, loss_fn, x, y, d1, d2)[2]
    a_old = old.compute_loss_surface_2d(model, loss_fn, x, y, d1, d2)[2]
    diff = float((a_ours.cpu().float() - a_old.float()).abs().max())

    print_table(rows)
    print("what each side computes:")
    for line in notes:
        print(line)
    print("eigenvalue accuracy:")
    for line in accuracy:
        print(line)
    print(f"  loss surface 2d: max |ours - 0.0.1| = {diff:.2e}")


if __name__ == "__main__":
    main()
