"""TF32 accuracy (issue 12): HVP, Hutchinson trace and top eigenvalue against float64.

For the three models of ``bench_gpu.py`` (MLP 784-1024-1024-10, tanh ResNet width 32,
2-layer GPT d = 128), the same quantities in three precisions:

* ``float64``: the reference (a float64 copy of the model and data);
* ``float32``: strict float32 (on CUDA under ``tf32(False)``: torch's default lets
  cuDNN convolutions use TF32);
* ``tf32``: float32 with TF32 products, under :func:`torch_secorder.precision.tf32`
  on CUDA, or emulated on the CPU by :func:`torch_secorder.precision.emulate_tf32`
  (operands of every float32 matrix product and convolution rounded to 10 mantissa
  bits, round to nearest even, then float32 arithmetic).

Printed: relative errors against float64 of one HVP (Gaussian ``v``,
``||Hv - Hv_64|| / ||Hv_64||``), of Hutchinson's trace estimate with the same
Rademacher probes in every precision (the arithmetic's error only, not the
statistical one), and of the largest eigenvalue (``lanczos_eigsh``, ``which="LA"``,
the same start vector, eigenvalue criterion; float64 to ``1e-8``, the others to
``--eig-tol``).  The last column is the bound of the module docs,
``2**-11 * sqrt(depth)`` (depth: matrix products along the longest path).

    python benchmarks/bench_tf32_accuracy.py                 # CPU: emulation
    python benchmarks/bench_tf32_accuracy.py --device cuda   # real TF32
    python benchmarks/bench_tf32_accuracy.py --quick         # smaller models

On the CPU the ResNet's batch is cut to ``--resnet-batch`` (default 16; 128 on
CUDA) to keep the float64 Lanczos runs short.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import Problem  # noqa: E402
from benchmarks._timing import busy_warning, sync  # noqa: E402
from torch_secorder.func.hvp import hessian_matmat, hvp  # noqa: E402
from torch_secorder.linalg import hutchinson, lanczos_eigsh  # noqa: E402
from torch_secorder.precision import TF32_UNIT_ROUNDOFF, emulate_tf32, tf32  # noqa: E402

#: Matrix products along the longest path of each model (forward): the "depth" of
#: the error bound.
DEPTHS = {"mlp 784-1024-1024-10": 3, "tanh resnet w32": 6, "gpt 2x128": 2 * 6 + 1}


def _pure(model: torch.nn.Module, problem: Problem, dtype: torch.dtype):
    x = problem.inputs.to(dtype) if problem.inputs.is_floating_point() else problem.inputs
    y = problem.targets.to(dtype) if problem.targets.is_floating_point() else problem.targets
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p):
        return problem.loss_fn(torch.func.functional_call(model, p, (x,)), y)

    return params, f


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tree.values()])


def _modes(device: str) -> dict[str, contextlib.AbstractContextManager]:
    if device.startswith("cuda"):
        return {"float32": tf32(False), "tf32": tf32(True)}
    return {"float32": contextlib.nullcontext(), "tf32": emulate_tf32()}


def quantities(problem: Problem, dtype: torch.dtype, mode, probes: int, eig_tol: float):
    """One HVP, the Hutchinson values and the top eigenvalue of ``problem`` in ``dtype``."""
    model = copy.deepcopy(problem.model).to(dtype)
    params, f = _pure(model, problem, dtype)
    n = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device
    g = torch.Generator().manual_seed(0)
    v = {
        k: torch.randn(p.shape, generator=g, dtype=torch.float64).to(device, dtype)
        for k, p in params.items()
    }
    v0 = torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype)
    matmat = hessian_matmat(f, params)
    tol = 1e-8 if dtype == torch.float64 else eig_tol
    with mode:
        start = time.perf_counter()
        out = hvp(f, params, v)
        sync()
        seconds = time.perf_counter() - start
        gen = torch.Generator(device=device).manual_seed(1)
        trace = hutchinson(
            matmat, n, probes, generator=gen, dtype=dtype, device=device, progress=False
        )
        eig = lanczos_eigsh(
            matmat, n, 1, which="LA", tol=tol, criterion="eigenvalue", v0=v0, max_iter=400
        )
    return {
        "hvp": _flat(out),
        "trace": float(trace.estimate),
        "eig": float(eig.eigenvalues[0]),
        "eig_products": int(eig.iterations),
        "eig_converged": bool(eig.converged[0]),
        "seconds": seconds,
        "n": n,
    }


def accuracy_table(
    cases: dict[str, Problem], device: str, probes: int = 8, eig_tol: float = 1e-5
) -> None:
    """Print the relative errors of float32 and TF32 against float64 for each case."""
    kind = "real TF32" if device.startswith("cuda") else "TF32 emulated by rounding"
    print(f"\nTF32 accuracy ({kind}), relative error against float64:")
    header = (
        f"{'model':<22} {'n':>9} {'prec':>8} {'HVP':>9} {'trace':>9} {'lambda_max':>10} "
        f"{'Lanczos':>8} {'bound':>9}"
    )
    print(header)
    for name, problem in cases.items():
        ref = quantities(problem, torch.float64, contextlib.nullcontext(), probes, eig_tol)
        bound = TF32_UNIT_ROUNDOFF * math.sqrt(DEPTHS.get(name, 1))
        for label, mode in _modes(device).items():
            got = quantities(problem, torch.float32, mode, probes, eig_tol)
            hvp_err = float((got["hvp"] - ref["hvp"]).norm() / ref["hvp"].norm())
            trace_err = abs(got["trace"] - ref["trace"]) / abs(ref["trace"])
            eig_err = abs(got["eig"] - ref["eig"]) / abs(ref["eig"])
            lanczos = f"{got['eig_products']}{'' if got['eig_converged'] else '*'}"
            print(
                f"{name:<22} {ref['n']:>9} {label:>8} {hvp_err:>9.2e} {trace_err:>9.2e} "
                f"{eig_err:>10.2e} {lanczos:>8} {bound:>9.2e}",
                flush=True,
            )
        print(
            f"{'':<22} {'':>9} {'float64':>8} trace {ref['trace']:.6g}, lambda_max "
            f"{ref['eig']:.6g} ({ref['eig_products']} products)"
        )
    print("Lanczos: products to the tolerance (* not converged within 400)")


def main() -> None:
    from benchmarks.bench_gpu import problems

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the smaller models of bench_gpu")
    parser.add_argument("--resnet-batch", type=int, default=None)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--eig-tol", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="run the models whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warning = busy_warning()
    if warning and args.device == "cpu":
        print(warning)
    cases = problems(args.device, args.quick)
    batch = args.resnet_batch or (128 if args.device.startswith("cuda") else 16)
    resnet = cases["tanh resnet w32"]
    cases["tanh resnet w32"] = resnet._replace(
        inputs=resnet.inputs[:batch], targets=resnet.targets[:batch]
    )
    if args.only:
        cases = {k: v for k, v in cases.items() if args.only in k}
    print(f"torch {torch.__version__}, device {args.device}, ResNet batch {batch}")
    accuracy_table(cases, args.device, args.probes, args.eig_tol)


if __name__ == "__main__":
    main()
