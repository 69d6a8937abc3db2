"""The rebuilt 0.0.1 API (core.gvp, core.hvp extras, per-layer curvature, utils) vs 0.0.1.

One process, same model and data for both: the tanh MLP 20-64-32-5 (3,589
parameters, batch 64: 320 outputs) of ``_models.mlp_few_thousand``.  Prints the
median time of each call and the ratio ``0.0.1 / ours`` (above 1: ours faster),
and, where both compute the same quantity, the largest difference of the results.

    python benchmarks/bench_api_001.py [--device cuda] [--dtype float64] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import mlp_few_thousand  # noqa: E402
from _peers import load_secorder_001  # noqa: E402
from _timing import busy_warning, print_table, time_call  # noqa: E402

import torch_secorder as ours  # noqa: E402


def max_diff(a, b) -> float:
    a = [a] if isinstance(a, torch.Tensor) else list(a.values()) if isinstance(a, dict) else a
    b = [b] if isinstance(b, torch.Tensor) else list(b.values()) if isinstance(b, dict) else b
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


def paired_times(mine, theirs, repeats: int) -> tuple[list[float], list[float]]:
    """Times of both, measured alternately so that machine load hits both alike."""
    mine()
    if repeats > 1:
        theirs()
    ours_t, old_t = [], []
    for i in range(max(repeats, 3)):
        ours_t.append(time_call(mine, repeats=1, warmup=0))
        if i < repeats:
            old_t.append(time_call(theirs, repeats=1, warmup=0))
    return ours_t, old_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vectors", type=int, default=8, help="batch of vectors for batch_*")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    old, why = load_secorder_001()
    if old is None:
        print(f"torch-secorder 0.0.1 unavailable: {why}")
        return
    warning = busy_warning()
    if warning:
        print(warning)

    prob = mlp_few_thousand(batch=args.batch, dtype=dtype, device=args.device)
    model, loss_fn, x, y = prob.model, prob.loss_fn, prob.inputs, prob.targets
    params = list(model.parameters())
    g = torch.Generator(device=args.device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype, device=args.device)

    out_shape = model(x).shape
    v = [randn(*p.shape) for p in params]
    u = randn(*out_shape)
    B = args.vectors
    V = [randn(B, *p.shape) for p in params]
    U = randn(B, *out_shape)

    def output():
        return model(x)

    def loss():
        return loss_fn(model(x), y)

    ce = mlp_few_thousand(batch=args.batch, dtype=dtype, device=args.device, loss="ce")

    # (label, ours, 0.0.1, repeats, compare results?)
    cases = [
        (
            "jvp",
            lambda: ours.jvp(output, params, v),
            lambda: old.gvp.jvp(output, params, v),
            3,
            True,
        ),
        (
            "vjp",
            lambda: ours.vjp(output, params, u),
            lambda: old.gvp.vjp(output, params, u),
            20,
            True,
        ),
        (
            "model_jvp",
            lambda: ours.model_jvp(model, x, v),
            lambda: old.gvp.model_jvp(model, x, v),
            3,
            True,
        ),
        (
            "model_vjp",
            lambda: ours.model_vjp(model, x, u),
            lambda: old.gvp.model_vjp(model, x, u),
            20,
            True,
        ),
        (
            f"batch_jvp ({B} vectors)",
            lambda: ours.batch_jvp(output, params, V),
            lambda: old.gvp.batch_jvp(output, params, V),
            1,
            True,
        ),
        (
            f"batch_vjp ({B} vectors)",
            lambda: ours.batch_vjp(output, params, U),
            lambda: old.gvp.batch_vjp(output, params, U),
            10,
            True,
        ),
        (
            "full_jacobian",
            lambda: ours.full_jacobian(output, params),
            lambda: old.gvp.full_jacobian(output, params),
            2,
            True,
        ),
        (
            "approximate_hvp",
            lambda: ours.approximate_hvp(loss, params, v),
            lambda: old.hvp.approximate_hvp(loss, params, v),
            20,
            False,  # 0.0.1's one-sided difference with step 1e-6 is inaccurate: see below
        ),
        (
            "gauss_newton_product (mse)",
            lambda: ours.gauss_newton_product(model, loss_fn, x, y, v),
            lambda: old.hvp.gauss_newton_product(model, loss_fn, x, y, v),
            2,
            True,
        ),
        (
            "gauss_newton_product (ce)",
            lambda: ours.gauss_newton_product(ce.model, ce.loss_fn, ce.inputs, ce.targets, v),
            lambda: old.hvp.gauss_newton_product(ce.model, ce.loss_fn, ce.inputs, ce.targets, v),
            2,
            True,
        ),
        (
            "per_layer_hessian_diagonal",
            lambda: ours.per_layer_hessian_diagonal(model, loss_fn, x, y, [nn.Linear]),
            lambda: old.per_layer_curvature.per_layer_hessian_diagonal(
                model, loss_fn, x, y, [nn.Linear]
            ),
            1,
            True,
        ),
        (
            "per_layer_fisher_diagonal",
            lambda: ours.per_layer_fisher_diagonal(model, loss_fn, x, y, [nn.Linear]),
            lambda: old.per_layer_curvature.per_layer_fisher_diagonal(
                model, loss_fn, x, y, [nn.Linear]
            ),
            10,
            False,  # 0.0.1 squared the batch gradient: a different (wrong) quantity
        ),
        (
            "flatten_params",
            lambda: ours.flatten_params(params),
            lambda: old.utils.flatten_params(params),
            200,
            True,
        ),
        (
            "unflatten_params",
            lambda: ours.unflatten_params(flat, shapes),
            lambda: old.utils.unflatten_params(flat, shapes),
            200,
            True,
        ),
    ]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    shapes = [p.shape for p in params]
    stats_input = ours.per_layer_hessian_diagonal(model, loss_fn, x, y, [nn.Linear])
    cases.append(
        (
            "get_layer_curvature_stats",
            lambda: ours.get_layer_curvature_stats(stats_input),
            lambda: old.per_layer_curvature.get_layer_curvature_stats(stats_input),
            200,
            False,  # ours reports more statistics (norm, abs_mean, sum)
        )
    )

    n = sum(p.numel() for p in params)
    print(
        f"tanh MLP 20-64-32-5, n={n}, batch {args.batch} ({out_shape.numel()} outputs), "
        f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = []
    for label, mine, theirs, repeats, compare in cases:
        t_ours, t_old = paired_times(mine, theirs, repeats)
        row = {"case": label, "ours": statistics.median(t_ours), "0.0.1": statistics.median(t_old)}
        row["_min_ratio"] = min(t_old) / min(t_ours)
        if compare:
            row["max |ours - 0.0.1|"] = None
            row["_diff"] = max_diff(mine(), theirs())
        rows.append(row)
    printable = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    for r in printable:
        r.pop("max |ours - 0.0.1|", None)
    print("median times, (0.0.1 / ours):")
    print_table(printable, ours="ours")
    print("\nratio of the fastest runs, 0.0.1 / ours (less sensitive to machine load):")
    for r in rows:
        print(f"  {r['case']}: {r['_min_ratio']:.2f}x")
    print("\nagreement where both compute the same quantity (max abs difference):")
    for r in rows:
        if "_diff" in r:
            print(f"  {r['case']}: {r['_diff']:.2e}")

    exact = ours.exact_hvp(loss, params, v)
    err_ours = max_diff(ours.approximate_hvp(loss, params, v), exact)
    err_old = max_diff(old.hvp.approximate_hvp(loss, params, v), exact)
    scale = max(float(e.abs().max()) for e in exact)
    print(
        f"\napproximate_hvp error vs exact_hvp (max abs, |Hv|max={scale:.3g}): "
        f"ours {err_ours:.2e}, 0.0.1 {err_old:.2e}"
    )


if __name__ == "__main__":
    main()
