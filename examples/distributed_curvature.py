"""Hessian trace and top eigenvalues of a built-in model over a sharded synthetic data set.

Every rank builds the same model (same seed) and the same synthetic data set, keeps
its own contiguous shard of it (unequal shards when the sizes do not divide), and
builds a :class:`~torch_secorder.operators.HessianOperator` on its shard: under
``torchrun`` the default process group is initialised, so the operator is that of the
union of the shards, and every product, the exact trace and the eigensolver's steps
are collectives.  Two CPU processes (gloo)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_curvature.py --model mlp

Without ``torchrun`` it runs in one process on the whole data set (the same numbers).
``--check`` also computes them on rank 0 alone, on the whole data set, and prints
the differences.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from torch_secorder.__main__ import MODELS
from torch_secorder.linalg import lanczos_eigsh
from torch_secorder.operators import HessianOperator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--k", type=int, default=3, help="top eigenvalues")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with one process")
    args = parser.parse_args()

    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = (
        torch.device("cuda", rank % torch.cuda.device_count())
        if (dist.is_initialized() and dist.get_backend() == "nccl")
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # the same replica of the model on every rank
    model, loss_fn, inputs, targets = MODELS[args.model](
        torch.Generator().manual_seed(args.seed), torch.float64
    )
    model = model.to(device, torch.float64)
    inputs, targets = inputs.to(device), targets.to(device)
    mine = torch.arange(inputs.shape[0]).tensor_split(world)[rank]  # this rank's shard
    x, y = inputs[mine], targets[mine]
    shard = [
        (x[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, x.shape[0], args.batch_size)
    ]

    start = time.perf_counter()
    H = HessianOperator(model, loss_fn, shard)  # group=None: the default group, if any
    trace = H.trace()
    top = lanczos_eigsh(
        H.matmat,
        H.shape[0],
        args.k,
        which="LA",
        tol=1e-8,
        dtype=H.dtype,
        device=H.device,
        generator=torch.Generator(device).manual_seed(args.seed),  # same start on every rank
    )
    seconds = time.perf_counter() - start
    if rank == 0:
        print(
            f"{args.model}: n = {H.shape[0]} parameters, {H.num_samples} samples on {world} "
            f"rank(s) (this rank: {x.shape[0]})"
        )
        print(f"exact Hessian trace: {trace.item():.10g}")
        print(f"top {args.k} eigenvalues: {[f'{v:.10g}' for v in top.eigenvalues.tolist()]}")
        print(f"({top.iterations} products, converged: {top.converged.tolist()}, {seconds:.2f} s)")
    if args.check and rank == 0:
        alone = HessianOperator(model, loss_fn, (inputs, targets), group=False)
        ref = lanczos_eigsh(
            alone.matmat,
            alone.shape[0],
            args.k,
            which="LA",
            tol=1e-8,
            dtype=alone.dtype,
            device=alone.device,
            generator=torch.Generator(device).manual_seed(args.seed),
        )
        trace_gap = abs(alone.trace() - trace).item()
        eigen_gap = (ref.eigenvalues - top.eigenvalues).abs().max().item()
        print(
            f"one process, whole data set: trace differs by {trace_gap:.2e}, "
            f"eigenvalues by {eigen_gap:.2e}"
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
