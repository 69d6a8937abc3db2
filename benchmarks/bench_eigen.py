"""Extreme eigenpairs: our thick-restart Lanczos against scipy's ``eigsh`` (ARPACK).

Both solvers get the same product (one function ``V -> V A``; ARPACK through a
``scipy.sparse.linalg.LinearOperator`` whose ``matvec`` calls it), the same start
vector and the same tolerance ``tol``; each counts its products with ``A``.  After
the run the true residuals ``||A v - lambda v|| / |lambda|`` of both answers are
computed with uncounted products and printed (``res`` columns), so a solver that
stops early on an optimistic estimate shows it.

Problems:

* ``dense-n``: dense symmetric ``n x n`` matrices with a Hessian-like spectrum (a
  few outliers up to 50 and down to -2 over a bulk of ``n - 14`` eigenvalues
  concentrated near 0 with both signs), float64;
* ``mlp``: the Hessian of the 784-256-256-10 tanh MLP (269,322 parameters,
  cross-entropy, batch 32), float64;
* ``cnn``: the Hessian of the small tanh CNN (43,738 parameters, batch 16), float64.

For each: top-k (``which="LA"``) and bottom-k (``"SA"``) for k = 1, 5, 10.  The
matvec ratio is eigsh / ours (above 1: ours uses fewer products); the time ratio
likewise, in the same process, one run each after a warm-up of both (the product
dominates on the models).
scipy's default ``ncv = max(2k + 1, 20)`` is used (ARPACK's recommended size); the
``--eigsh-ncv same`` option gives it our basis size instead.

    python benchmarks/bench_eigen.py [--threads 2] [--tol 1e-8] [--problems dense-500,mlp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

# ARPACK's own work is vector operations of length n; numpy's BLAS threads would
# spin beside torch's on a small machine and slow every product of eigsh (measured
# 10x on 2 cores).  One BLAS thread for numpy; torch keeps --threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import mlp_784_256_256_10, tanh_cnn  # noqa: E402
from benchmarks._timing import busy_warning  # noqa: E402
from torch_secorder.linalg.eigen import _default_ncv, lanczos_eigsh  # noqa: E402

DT = torch.float64


def hessian_like(n: int, seed: int = 0) -> Tensor:
    """Dense symmetric matrix: outliers 50, 30, 20, 12, 8, 5, 3, 2, 1.5, 1.2, -0.5, -1, -1.5, -2
    over a bulk ``0.05 * g**3`` (g standard normal), in a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([50.0, 30, 20, 12, 8, 5, 3, 2, 1.5, 1.2, -0.5, -1, -1.5, -2], dtype=DT)
    bulk = 0.05 * torch.randn(n - len(outliers), generator=g, dtype=DT) ** 3
    values = torch.cat([outliers, bulk])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return (Q * values) @ Q.T


def dense_matmat(n: int) -> tuple[Callable[[Tensor], Tensor], int]:
    A = hessian_like(n)
    return (lambda V: V @ A), n


def model_matmat(problem) -> tuple[Callable[[Tensor], Tensor], int]:
    """Hessian products of the mini-batch loss by forward-over-reverse (torch.func)."""
    model, loss_fn, x, y = problem
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return loss_fn(out, y)

    grad = torch.func.grad(loss, argnums=tuple(range(len(params))))

    def hvp(v: Tensor) -> Tensor:
        tangents = tuple(t.reshape(s) for t, s in zip(v.split(sizes), shapes, strict=True))
        _, out = torch.func.jvp(grad, params, tangents)
        return torch.cat([o.reshape(-1) for o in out])

    def matmat(V: Tensor) -> Tensor:
        return torch.stack([hvp(v) for v in V])

    return matmat, sum(sizes)


def true_residuals(matmat, values: Tensor, vectors: Tensor) -> Tensor:
    """``||A v - lambda v|| / |lambda|`` for the rows of ``vectors`` (uncounted products)."""
    with torch.no_grad():
        AV = matmat(vectors)
    return (AV - values[:, None] * vectors).norm(dim=1) / values.abs()


def run_ours(matmat, n, k, which, tol, v0, max_matvecs):
    calls = [0]

    def counted(V):
        calls[0] += V.shape[0]
        return matmat(V)

    start = time.perf_counter()
    res = lanczos_eigsh(counted, n, k, which=which, tol=tol, v0=v0, max_iter=max_matvecs)
    elapsed = time.perf_counter() - start
    return res.eigenvalues, res.eigenvectors, calls[0], elapsed, bool(res.converged.all())


def run_eigsh(matmat, n, k, which, tol, v0, max_matvecs, ncv=None):
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    calls = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        return matmat(v[None])[0].numpy()

    op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    # ARPACK's maxiter counts restarts, each of about ncv - k products
    restarts = max(1, max_matvecs // max(1, (ncv or min(n, max(2 * k + 1, 20))) - k))
    start = time.perf_counter()
    try:
        vals, vecs = eigsh(op, k=k, which=which, tol=tol, v0=v0.numpy(), ncv=ncv, maxiter=restarts)
        ok = True
    except ArpackNoConvergence as err:
        vals, vecs, ok = err.eigenvalues, err.eigenvectors, False
    elapsed = time.perf_counter() - start
    values = torch.from_numpy(vals)
    vectors = torch.from_numpy(np.ascontiguousarray(vecs.T))
    return values, vectors, calls[0], elapsed, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--which", default="LA,SA")
    parser.add_argument("--problems", default="dense-500,dense-1500,dense-3000,mlp,cnn")
    parser.add_argument("--eigsh-ncv", choices=["default", "same"], default="default")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each solver, interleaved (ours, eigsh, ours, ...); median times",
    )
    parser.add_argument(
        "--max-matvecs",
        type=int,
        default=3000,
        help="cap on products (eigsh: maxiter = cap // (ncv - k) restarts)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warning = busy_warning()
    if warning:
        print(warning)
    print(
        f"tol={args.tol}, threads={args.threads}, torch {torch.__version__}, "
        f"eigsh ncv={args.eigsh_ncv}"
    )
    header = (
        f"{'problem':<11}{'which':<6}{'k':>3}  {'mv ours':>8}{'mv eigsh':>9}{'ratio':>7}  "
        f"{'t ours':>8}{'t eigsh':>9}{'ratio':>7}  {'res ours':>9}{'res eigsh':>10}"
    )
    print(header)
    for name in args.problems.split(","):
        if name.startswith("dense-"):
            matmat, n = dense_matmat(int(name.split("-")[1]))
        elif name == "mlp":
            matmat, n = model_matmat(mlp_784_256_256_10(batch=32, loss="ce", dtype=DT))
        elif name == "cnn":
            matmat, n = model_matmat(tanh_cnn(batch=16, loss="ce", dtype=DT))
        else:
            raise ValueError(f"unknown problem {name!r}")
        v0 = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DT)
        run_ours(matmat, n, 1, "LA", 1e-2, v0, 50)  # warm-ups (first-call overheads)
        run_eigsh(matmat, n, 1, "LA", 1e-2, v0, 50)
        for which in args.which.split(","):
            for k in (int(s) for s in args.ks.split(",")):
                cap = args.max_matvecs
                ncv = _default_ncv(n, k, 1) if args.eigsh_ncv == "same" else None
                times_o, times_e = [], []
                for _ in range(args.repeats):
                    vo, Vo, mo, to, ok = run_ours(matmat, n, k, which, args.tol, v0, cap)
                    ve, Ve, me, te, oke = run_eigsh(matmat, n, k, which, args.tol, v0, cap, ncv)
                    times_o.append(to)
                    times_e.append(te)
                to, te = statistics.median(times_o), statistics.median(times_e)
                ro = float(true_residuals(matmat, vo, Vo).max())
                re = float(true_residuals(matmat, ve, Ve).max())
                gap = float((vo.sort().values - ve.sort().values).abs().max())
                flag = "" if ok else "  (ours: not converged)"
                flag += "" if oke else "  (eigsh: not converged)"
                if len(ve) < len(vo):
                    flag += f"  (eigsh: {len(ve)} of {k} pairs)"
                    vo = vo[torch.argsort(vo, descending=which == "LA")][: len(ve)]
                if gap > 1e-6 * float(vo.abs().max()):
                    flag += f"  (eigenvalues differ by {gap:.2e})"
                print(
                    f"{name:<11}{which:<6}{k:>3}  {mo:>8}{me:>9}{me / mo:>7.2f}  "
                    f"{to:>8.3f}{te:>9.3f}{te / to:>7.2f}  {ro:>9.1e}{re:>10.1e}{flag}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
